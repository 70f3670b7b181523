"""``kuiper-pool try <plugin-dir>``: run a tiny rule against a plugin through the
embedded eKuiper stand-in (:mod:`kuiper_pool.tools.emulator`).

The rule lives in ``rule.json`` in the plugin folder::

    {"id": "demo",                                   # required; letters, digits, _ and -
     "source": {"symbol": "pyjson",                  # required
                "datasource": "demo",                # optional, default ""
                "confKey": "fast",                   # optional section of sources/<symbol>.yaml
                "config": {"interval": 0.1}},        # optional, overrides the yaml
     "functions": [{"symbol": "revert",              # optional list, called in order
                    "args": ["$.name"],              # "$.field" (or "$.a.b") = field of the row
                    "as": "reverted"}],              # optional result key, default the symbol
     "sink": {"symbol": "print",                     # optional; without it rows are only printed
              "config": {"requireAck": true}},       # sink properties, as in a rule action
     "count": 5,                                     # optional, rows to process, default 5
     "timeout": 30}                                  # optional, seconds for the whole run, default 30

Without a source (a plugin of functions only) ``try`` calls functions instead, each once with
the arguments given (``--call SYMBOL '[args]'`` or a calls file), and prints the results.
With ``--keep-running`` the rule runs until Ctrl-C or SIGTERM instead of ``count`` rows.

Like eKuiper 2.x, the source gets its data source in ``config["datasource"]``
(next to ``format``, ``key``, ...; the top-level ``dataSource`` stays empty), the
sink gets each row as a JSON array of one object (a plain object when the sink
config sets ``sendSingle``), and symbols start in the order sink, functions, source.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import yaml

from .emulator import FolderError, FunctionHandle, Host, HostError, go_json

__all__ = ["RuleError", "Rule", "FunctionCall", "load_rule", "load_calls", "parse_call", "run_rule",
           "DEFAULT_RULE_FILE"]

DEFAULT_RULE_FILE = "rule.json"
_ID = re.compile(r"^[A-Za-z0-9_-]+$")


class RuleError(Exception):
    """An invalid rule file; the message is one line naming the key."""


@dataclass
class FunctionCall:
    symbol: str
    args: List[Any]
    as_: str


@dataclass
class Rule:
    id: str
    source_symbol: str
    datasource: str = ""
    conf_key: str = ""
    source_config: Dict[str, Any] = field(default_factory=dict)
    functions: List[FunctionCall] = field(default_factory=list)
    sink_symbol: Optional[str] = None
    sink_config: Dict[str, Any] = field(default_factory=dict)
    count: int = 5
    timeout: float = 30.0


def _check_keys(obj: Any, where: str, allowed: set, required: set = frozenset()) -> dict:
    if not isinstance(obj, dict):
        raise RuleError(f"{where} must be an object")
    for key in obj:
        if key not in allowed:
            raise RuleError(f"unknown key {where}.{key} (allowed: {', '.join(sorted(allowed))})"
                            if where != "rule" else
                            f"unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in obj:
            raise RuleError(f"missing required key {key!r}" if where == "rule"
                            else f"missing required key {where}.{key}")
    return obj


def _string(value: Any, where: str, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value):
        raise RuleError(f"{where} must be a{'' if empty_ok else ' non-empty'} string")
    return value


def _object(value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise RuleError(f"{where} must be an object")
    return dict(value)


def _symbol(value: Any, where: str, kind: str, plugin: Optional[dict]) -> str:
    name = _string(value, where)
    known = (plugin or {}).get(kind)
    if isinstance(known, list) and name not in known:
        raise RuleError(f"{where} {name!r} is not one of the plugin's {kind} "
                        f"({', '.join(map(str, known)) or 'none'})")
    return name


def load_rule(path: str, plugin: Optional[dict] = None) -> Rule:
    """Read and validate a rule file; ``plugin`` (the plugin json) lets symbols be checked."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RuleError(f"cannot read rule file {path}: {e.strerror or e}") from e
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise RuleError(f"{os.path.basename(path)} is not valid JSON: {e}") from e
    _check_keys(raw, "rule", {"id", "source", "functions", "sink", "count", "timeout"}, {"id", "source"})
    rule_id = _string(raw["id"], "id")
    if not _ID.match(rule_id):
        raise RuleError(f"id {rule_id!r} may only contain letters, digits, '_' and '-'")
    src = _check_keys(raw["source"], "source", {"symbol", "datasource", "confKey", "config"}, {"symbol"})
    rule = Rule(id=rule_id, source_symbol=_symbol(src["symbol"], "source.symbol", "sources", plugin),
                datasource=_string(src.get("datasource", ""), "source.datasource", empty_ok=True),
                conf_key=_string(src.get("confKey", ""), "source.confKey", empty_ok=True))
    rule.source_config = _object(src.get("config", {}), "source.config")
    funcs = raw.get("functions", [])
    if not isinstance(funcs, list):
        raise RuleError("functions must be a list")
    for i, fn in enumerate(funcs):
        where = f"functions[{i}]"
        _check_keys(fn, where, {"symbol", "args", "as"}, {"symbol"})
        symbol = _symbol(fn["symbol"], where + ".symbol", "functions", plugin)
        args = fn.get("args", [])
        if not isinstance(args, list):
            raise RuleError(f"{where}.args must be a list")
        rule.functions.append(FunctionCall(symbol, args, _string(fn.get("as", symbol), where + ".as")))
    if "sink" in raw:
        sink = _check_keys(raw["sink"], "sink", {"symbol", "config"}, {"symbol"})
        rule.sink_symbol = _symbol(sink["symbol"], "sink.symbol", "sinks", plugin)
        rule.sink_config = _object(sink.get("config", {}), "sink.config")
    count = raw.get("count", rule.count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise RuleError("count must be a positive integer")
    rule.count = count
    timeout = raw.get("timeout", rule.timeout)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise RuleError("timeout must be a positive number of seconds")
    rule.timeout = float(timeout)
    return rule


def source_config(plugin_dir: str, rule: Rule) -> Dict[str, Any]:
    """The source properties eKuiper 2.x sends (internal/topo/node/conf/source.go):
    yaml ``default`` section, the confKey section, the rule's config, then the
    stream options, including ``datasource``."""
    props: Dict[str, Any] = {}
    path = os.path.join(plugin_dir, "sources", rule.source_symbol + ".yaml")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                sections = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RuleError(f"cannot read {path}: {e}") from e
        if not isinstance(sections, dict):
            raise RuleError(f"{path} must map section names to properties")
        props.update(sections.get("default") or {})
        if rule.conf_key:
            section = sections.get(rule.conf_key.lower(), sections.get(rule.conf_key))
            if not isinstance(section, dict):
                raise RuleError(f"source.confKey {rule.conf_key!r} is not a section of {path}")
            props.update(section)
    elif rule.conf_key:
        raise RuleError(f"source.confKey {rule.conf_key!r} given but {path} does not exist")
    props.update(rule.source_config)
    props.update({"format": "json", "key": "", "datasource": rule.datasource, "schemaId": "",
                  "delimiter": "", "retainSize": 0, "strictValidation": False,
                  "timestamp": "", "timestampFormat": ""})
    return props


def _arg(expr: Any, row: Dict[str, Any]) -> Any:
    """``"$.a.b"`` is a field path into the row; anything else is a literal."""
    if isinstance(expr, str) and expr.startswith("$."):
        value: Any = row
        for part in expr[2:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value
    return expr


def _j(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def parse_call(symbol: str, args: str, where: str = "--call") -> FunctionCall:
    """``--call SYMBOL ARGS``: ARGS is a JSON array of the call's arguments."""
    try:
        value = json.loads(args)
    except ValueError as e:
        raise RuleError(f"{where} {symbol}: the arguments must be a JSON array, like "
                        f"'[\"text\", 1]' ({e})") from None
    if not isinstance(value, list):
        raise RuleError(f"{where} {symbol}: the arguments must be a JSON array, like '[\"text\", 1]'")
    return FunctionCall(symbol, value, symbol)


def load_calls(path: str) -> List[FunctionCall]:
    """A calls file: a JSON list of ``{"symbol": ..., "args": [...]}``."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise RuleError(f"cannot read calls file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise RuleError(f"{os.path.basename(path)} is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise RuleError(f"{os.path.basename(path)} must be a list of "
                        '{"symbol": ..., "args": [...]} objects')
    calls = []
    for i, item in enumerate(raw):
        where = f"{os.path.basename(path)}[{i}]"
        _check_keys(item, where, {"symbol", "args"}, {"symbol"})
        args = item.get("args", [])
        if not isinstance(args, list):
            raise RuleError(f"{where}.args must be a list")
        calls.append(FunctionCall(_string(item["symbol"], where + ".symbol"), args, item["symbol"]))
    return calls


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ kuiper_pool ")
RUNNER, PLUGIN, KUIPER_POOL = "try", "plugin", "kuiper_pool"


class Output:
    """The run's lines, each labelled with whose it is: ``try`` (this runner), ``plugin``
    (what the plugin's code prints) or ``kuiper_pool`` (the supervisor's and workers' log).
    Errors go to ``err`` unlabelled, as every ``kuiper-pool`` command writes them."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.lock = threading.Lock()

    def say(self, text: str, who: str = RUNNER) -> None:
        with self.lock:
            print(f"{who:<{len(KUIPER_POOL)}} | {text}", file=self.out, flush=True)

    def error(self, text: str) -> None:
        with self.lock:
            print(f"kuiper-pool try: {text}", file=self.err, flush=True)

    def relay(self, fd: int) -> threading.Thread:
        """Label every line the plugin's processes write to ``fd`` until they all close it."""
        def pump() -> None:
            with os.fdopen(fd, "rb") as pipe:
                for raw in pipe:
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    self.say(line, KUIPER_POOL if _LOG_LINE.match(line) else PLUGIN)

        thread = threading.Thread(target=pump, daemon=True, name="try-output")
        thread.start()
        return thread


class _Stop:
    """Ctrl-C and SIGTERM end a ``--keep-running`` run (cleanly: everything is stopped)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.saved: Dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, lambda *_: self.event.set())

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def run_rule(plugin_dir: str, rule_file: Optional[str] = None, out: TextIO = sys.stdout,
             python: str = sys.executable, err: TextIO = sys.stderr, keep_running: bool = False,
             calls: Sequence[FunctionCall] = ()) -> int:
    """Run the rule (or only ``calls``, a function-only plugin's way); print one labelled line
    per step. 0 when it ran, 1 when the plugin failed, 2 when the folder, the rule or the
    calls are wrong (one line on ``err`` each time). ``keep_running``: the rule runs until
    Ctrl-C or SIGTERM, so ``status``, ``restart``, ``reload`` and metrics can be tried on it."""
    output = Output(out, err)
    say = output.say
    host: Optional[Host] = None
    stop = _Stop() if keep_running else None
    relay: Optional[threading.Thread] = None
    try:
        host = Host(plugin_dir, python=python, own_session=True)
        rule = None
        if not calls:
            path = rule_file or os.path.join(plugin_dir, DEFAULT_RULE_FILE)
            if rule_file is None and not os.path.exists(path) and not host.meta.get("sources"):
                raise RuleError(f"plugin {host.name} has no source and {path} does not exist: call "
                                f"its functions with --call SYMBOL '[args]' or --calls FILE")
            rule = load_rule(path, host.meta)
        for call in calls:
            _symbol(call.symbol, "function", "functions", host.meta)
        read_fd, write_fd = os.pipe()
        host.stdout = write_fd
        relay = output.relay(read_fd)
        if rule is not None:
            host.init_timeout = min(host.init_timeout, rule.timeout)
        try:
            host.start()
        finally:
            os.close(write_fd)  # the plugin's processes hold it; the relay ends when they exit
        say(f"plugin {host.name}: started, pid {host.process.pid}")
        if keep_running:
            say(f"running until Ctrl-C or SIGTERM; meanwhile, in another shell: kuiper-pool status "
                f"{host.name}, kuiper-pool restart {host.name} [SYMBOL], kuiper-pool reload "
                f"{host.name}; for metrics start with KUIPER_POOL_METRICS_ADDRESS=127.0.0.1:<port>")
        if rule is not None:
            _run(host, rule, say, output.error, stop)
        else:
            if not _call(host, calls, say, output.error):
                return 1
            if stop is not None:
                stop.event.wait()
        return 0
    except (FolderError, RuleError) as e:
        output.error(str(e))
        return 2
    except (HostError, OSError) as e:  # OSError: a socket we could not make (TransportError too)
        output.error(str(e))
        return 1
    finally:
        if stop is not None:
            stop.restore()
        if host is not None:
            host.close()
        if relay is not None:
            relay.join(timeout=2)


def _call(host: Host, calls: Sequence[FunctionCall], say: Callable[[str], None],
          error: Callable[[str], None]) -> bool:
    """Call each function once with its arguments; print each result. False when one failed."""
    funcs: Dict[str, FunctionHandle] = {}
    ok = True
    for call in calls:
        if call.symbol not in funcs:
            funcs[call.symbol] = host.start_function(call.symbol)
            say(f"function {call.symbol}: started")
        shown = f"{call.symbol}({', '.join(_j(a) for a in call.args)})"
        valid = funcs[call.symbol].validate(call.args)
        reply = valid if not valid.get("state") else funcs[call.symbol].exec(call.args, rule="try", op="call")
        if reply.get("state"):
            say(f"{shown} -> {_j(reply.get('result'))}")
        else:
            what = "validate failed" if reply is valid else "failed"
            error(f"{shown}: {what}: {reply.get('result')}")
            ok = False
    return ok


def _run(host: Host, rule: Rule, say: Callable[[str], None], error: Callable[[str], None],
         stop: Optional[_Stop]) -> None:
    """The rule: start sink, functions, source; process ``rule.count`` rows (or, with ``stop``,
    rows until it is set: an error on one row is then shown and the run goes on)."""
    deadline = time.monotonic() + rule.timeout
    started = time.monotonic()
    sink = None
    if rule.sink_symbol:
        sink = host.start_sink(rule.sink_symbol, rule.id, op="sink", config=rule.sink_config)
        say(f"sink {rule.sink_symbol}: started (requireAck {_j(sink.require_ack)})")
    funcs: Dict[str, FunctionHandle] = {}
    for call in rule.functions:
        if call.symbol not in funcs:
            funcs[call.symbol] = host.start_function(call.symbol)
        fh = funcs[call.symbol]
        valid = fh.validate(call.args)
        if not valid.get("state"):
            raise HostError(f"function {call.symbol}: validate failed: {valid.get('result')}")
        agg = fh.is_aggregate()
        say(f"function {call.symbol}: started, validate ok, aggregate {_j(agg.get('result'))}")
    src = host.start_source(rule.source_symbol, rule.id, op="source",
                            config=source_config(host.plugin_dir, rule))
    say(f"source {rule.source_symbol}: started (datasource {_j(rule.datasource)})")
    single = bool(rule.sink_config.get("sendSingle", False))
    n = 0
    while (n < rule.count) if stop is None else not stop.event.is_set():
        if stop is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError(f"timeout: {n} of {rule.count} rows after {rule.timeout:g} s")
        else:
            left = 0.5  # look at the stop flag this often
        try:
            item = src.recv(timeout=left)
        except HostError as e:
            if stop is not None and host.alive():
                continue  # nothing within the slice (e.g. the source is being restarted)
            if time.monotonic() >= deadline:
                raise HostError(f"timeout: {n} of {rule.count} rows after {rule.timeout:g} s") from e
            raise
        if "message" not in item:
            say(f"   source error: {_j(item.get('error', item))}")
            continue
        n += 1
        try:
            _row(n, item, rule, funcs, sink, single, say, deadline if stop is None else None)
        except HostError as e:
            if stop is None or not host.alive():
                raise
            error(str(e))  # e.g. a call in flight while an operator restarted its worker
    src.stop()
    if sink is not None:
        sink.stop()
    say(f"done: {n} rows in {time.monotonic() - started:.2f} s")


def _row(n: int, item: Dict[str, Any], rule: Rule, funcs: Dict[str, FunctionHandle],
         sink: Any, single: bool, say: Callable[[str], None], deadline: Optional[float]) -> None:
    """One row through the rule's functions and its sink."""
    row = dict(item.get("message") or {})
    meta = item.get("meta")
    say(f"#{n} source {_j(row)}" + (f" meta {_j(meta)}" if meta else ""))
    for i, call in enumerate(rule.functions):
        args = [_arg(a, row) for a in call.args]
        reply = funcs[call.symbol].exec(args, rule=rule.id, op="project", instance=0, func_id=i)
        if not reply.get("state"):
            raise HostError(f"function {call.symbol} failed on row #{n}: {reply.get('result')}")
        row[call.as_] = reply.get("result")
        say(f"#{n} {call.symbol}({', '.join(_j(a) for a in args)}) -> {_j(row[call.as_])}")
    if sink is not None:
        data = go_json(row if single else [row])
        timeout = 5.0 if deadline is None else max(deadline - time.monotonic(), 0.1)
        ack = sink.collect(data, timeout=timeout)
        if ack is None:
            say(f"#{n} sink sent {data.decode('utf-8')} (no ack requested)")
        elif ack.get("error"):
            raise HostError(f"sink {rule.sink_symbol} rejected row #{n}: {ack['error']}")
        else:
            say(f"#{n} sink acked {_j(ack)}")
