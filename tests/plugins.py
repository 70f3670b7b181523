"""Throwaway kuiper_pool plugins for tests, and the helpers that run and clean them up.

``make_plugin`` writes a complete plugin folder the way eKuiper installs one::

    <dir>/<name>/<name>.json      the plugin json (executable main.py, symbol lists)
    <dir>/<name>/main.py          PluginConfig + plugin.start (never returns)
    <dir>/<name>/kp_symbols.py    the symbol classes (the library below + your own texts)
    <dir>/<name>/kuiper_pool.yaml settings file (``yaml_settings``; empty otherwise)
    <dir>/<name>/sources/<sym>.yaml

Symbols map a name to a class: either one of the library texts below (``COUNTING_SOURCE``,
``RECORDING_SINK``, ``MODE_FUNCTION``, ``AGGREGATE_FUNCTION``), your own class source text
(its first ``class Name`` is used), or a bare class name defined in ``kp_symbols`` or
``main_code``. Every factory is ``lambda: Name()`` unless ``factories`` gives an expression.
Plugin, rule and symbol names must be unique per test (ipc paths in /tmp are global): build
them from the ``unique`` fixture.

The library classes record lifecycle events as JSON lines (``read_jsonl``) in
``<plugin>/events.jsonl`` (or the path in their config key ``events``); every event carries
``event`` and ``pid``. Misbehaviour on purpose goes through ``act(mode, arg)``: ``exit``
(os._exit), ``segv`` (ctypes.string_at(0)), ``raise``, ``loop`` (busy), ``hang`` (blocks
forever, GIL released), ``sleep``, ``stop`` (SIGSTOP itself), ``mem`` (keeps arg MB).

``HostRuns`` starts emulator Hosts and, at the end, closes them and proves nothing is left:
no process of any plugin tree it saw, no ``/tmp/kuiper_pool-<uid>/`` entry naming the
fragment (``/tmp/*.ipc`` files are the conftest ``ipc_leak_check`` fixture's job).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set

import psutil
import yaml

from kuiper_pool.tools.emulator import Host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- the symbol library (texts of kp_symbols.py) --------------------------------------------

LIB_HEADER = '''\
"""Symbols of a generated kuiper_pool test plugin."""
import ctypes, json, logging, os, signal, sys, threading, time
from {base} import Source, Sink, Function, Context

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
EVENTS = os.path.join(PLUGIN_DIR, "events.jsonl")
_HOG = []


def record(event, path=None, **fields):
    """Append one JSON line (a single O_APPEND write, so processes do not interleave)."""
    fields.update(event=event, pid=os.getpid())
    line = (json.dumps(fields, default=repr) + "\\n").encode()
    fd = os.open(path or EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def ctx_fields(ctx):
    return {{"rule": ctx.get_rule_id(), "op": ctx.get_op_id(), "instance": ctx.get_instance_id()}}


def act(mode, arg=None):
    """Misbehave on purpose; returns only for sleep and mem."""
    if mode == "exit":
        sys.stdout.flush()
        os._exit(int(arg) if arg is not None else 1)
    if mode == "segv":
        ctypes.string_at(0)
    if mode == "raise":
        raise RuntimeError(arg or "raised on purpose")
    if mode == "loop":
        while True:
            pass
    if mode == "hang":
        threading.Event().wait()
    if mode == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return "continued"
    if mode == "sleep":
        time.sleep(float(arg))
        return "slept"
    if mode == "mem":
        _HOG.append(b"x" * int(float(arg) * 1048576))
        return sum(len(b) for b in _HOG)
    raise ValueError("unknown mode %r" % (mode,))


class Opaque:
    """A result JSON cannot encode."""
'''

COUNTING_SOURCE = '''
class CountingSource(Source):
    """Emits {"n", "pid", "datasource", "rule", "op", "instance", "logger", "base"} every
    conf["interval"] seconds (default 0.01). Config keys: "count" (items before "then",
    0 = unlimited), "then" ("wait" (default) | "return" | any act() mode, with "then_arg"),
    "fail_configure" (configure raises ValueError(text)), "log" (text logged once at open
    through ctx.get_logger()), "meta" (meta of every item), "close_sleep" (seconds close
    takes), "ignore_close" (open never returns), "events" (event file)."""

    def __init__(self):
        self.stopped = threading.Event()
        self.datasource, self.conf = "", {}

    def configure(self, datasource, conf):
        self.datasource, self.conf = datasource, dict(conf)
        record("source_configure", self.conf.get("events"), datasource=datasource, conf=conf)
        if self.conf.get("fail_configure"):
            raise ValueError(self.conf["fail_configure"])

    def open(self, ctx):
        conf, logger, n = self.conf, ctx.get_logger(), 0
        record("source_open", conf.get("events"), **ctx_fields(ctx))
        if conf.get("log"):
            logger.info("%s", conf["log"])
        interval, count = float(conf.get("interval", 0.01)), int(conf.get("count", 0))
        while conf.get("ignore_close") or not self.stopped.is_set():
            if count and n >= count:
                then = conf.get("then", "wait")
                if then == "return":
                    return
                if then == "wait":
                    self.stopped.wait()
                    continue
                act(then, conf.get("then_arg"))
            n += 1
            ctx.emit({"n": n, "pid": os.getpid(), "datasource": self.datasource,
                      "logger": isinstance(logger, logging.Logger), "base": Source.__module__,
                      **ctx_fields(ctx)}, conf.get("meta"))
            if interval:
                self.stopped.wait(interval)

    def close(self, ctx):
        record("source_close", self.conf.get("events"), **ctx_fields(ctx))
        if self.conf.get("close_sleep"):
            time.sleep(float(self.conf["close_sleep"]))
        self.stopped.set()
'''

RECORDING_SINK = '''
class RecordingSink(Sink):
    """Appends {"event": "item", "data", "rule", "pid"} per item to conf["file"] (default
    <plugin>/items.jsonl), then acks: ack_error("rejected <data>") when conf["reject"] occurs
    in the item, else ack_ok. It acks even without requireAck (kuiper_pool must drop those);
    conf "ack": false sends none. conf "on": {substring: act mode or "mode:arg"} misbehaves
    for matching items before recording them; "fail_configure", "delay" (seconds per item),
    "events" as for CountingSource."""

    def configure(self, conf):
        self.conf = dict(conf)
        record("sink_configure", self.conf.get("events"), conf=conf)
        if self.conf.get("fail_configure"):
            raise ValueError(self.conf["fail_configure"])
        self.file = self.conf.get("file") or os.path.join(PLUGIN_DIR, "items.jsonl")
        self.rule = ""

    def open(self, ctx):
        self.rule = ctx.get_rule_id()
        record("sink_open", self.conf.get("events"), logger=isinstance(ctx.get_logger(), logging.Logger),
               base=Sink.__module__, **ctx_fields(ctx))

    def collect(self, ctx, data):
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        for needle, action in (self.conf.get("on") or {}).items():
            if needle in text:
                mode, _, arg = action.partition(":")
                act(mode, arg or None)
        if self.conf.get("delay"):
            time.sleep(float(self.conf["delay"]))
        record("item", self.file, data=text, rule=self.rule)
        if self.conf.get("ack", True):
            reject = self.conf.get("reject")
            if reject and reject in text:
                ctx.ack_error("rejected " + text)
            else:
                ctx.ack_ok()

    def close(self, ctx):
        record("sink_close", self.conf.get("events"), **ctx_fields(ctx))
'''

MODE_FUNCTION = '''
class ModeFunction(Function):
    """exec(args): args[0] is the mode, args[1] its argument:
    echo -> args[1]; pid -> os.getpid(); ctx -> {"rule", "op", "instance"};
    count -> {"count": calls seen with this very ctx object, "rule", "op", "instance"};
    calls -> calls of this object so far (this one included); base -> Function.__module__;
    log -> logs args[1] through ctx.get_logger(), returns whether it is a logging.Logger;
    modules -> the names in sys.modules that start with args[1], sorted; unjson -> an Opaque instance (not JSON); any act() mode (exit, segv, raise, loop, hang,
    sleep, stop, mem). validate: "" unless args[0] == "invalid" (then an error text naming
    args). is_aggregate: the class attribute AGGREGATE."""

    AGGREGATE = False

    def __init__(self):
        self.calls = 0
        self.per_ctx = {}
        self.keep = []

    def validate(self, args):
        if args and args[0] == "invalid":
            return "invalid arguments %s" % json.dumps(args[1:])
        return ""

    def exec(self, args, ctx):
        self.calls += 1
        mode = args[0] if args else "echo"
        arg = args[1] if len(args) > 1 else None
        if mode == "echo":
            return arg
        if mode == "pid":
            return os.getpid()
        if mode == "ctx":
            return ctx_fields(ctx)
        if mode == "count":
            if id(ctx) not in self.per_ctx:
                self.keep.append(ctx)  # the id stays valid while the object lives
            self.per_ctx[id(ctx)] = self.per_ctx.get(id(ctx), 0) + 1
            return dict(count=self.per_ctx[id(ctx)], **ctx_fields(ctx))
        if mode == "calls":
            return self.calls
        if mode == "base":
            return Function.__module__
        if mode == "log":
            logger = ctx.get_logger()
            logger.info("%s", arg)
            return isinstance(logger, logging.Logger)
        if mode == "modules":
            return sorted(m for m in sys.modules if m.startswith(arg))
        if mode == "unjson":
            return Opaque()
        return act(mode, arg)

    def is_aggregate(self):
        return self.AGGREGATE
'''

AGGREGATE_FUNCTION = '''
class AggregateFunction(ModeFunction):
    """ModeFunction whose is_aggregate() is True."""

    AGGREGATE = True
'''

LIBRARY = (COUNTING_SOURCE, RECORDING_SINK, MODE_FUNCTION, AGGREGATE_FUNCTION)

_CLASS = re.compile(r"^class\s+([A-Za-z_][A-Za-z0-9_]*)", re.M)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SDKS = ("kuiper_pool", "ekuiper")


def _class_name(value: str) -> str:
    if _IDENT.match(value):
        return value
    m = _CLASS.search(value)
    if not m:
        raise ValueError(f"neither a class name nor a class text: {value[:60]!r}")
    return m.group(1)


def make_plugin(dir: str, name: str, *, sources: Optional[Mapping[str, str]] = None,
                sinks: Optional[Mapping[str, str]] = None,
                functions: Optional[Mapping[str, str]] = None,
                settings: Optional[Mapping[str, Any]] = None,
                yaml_settings: Optional[Mapping[str, Any]] = None,
                extra_modules: Optional[Mapping[str, str]] = None,
                factories: Optional[Mapping[str, str]] = None,
                main_code: str = "", base: str = "kuiper_pool", config_class: str = "kuiper_pool",
                runner: str = "kuiper_pool") -> str:
    """Write plugin ``name`` into ``<dir>/<name>/`` and return that folder.

    ``sources``/``sinks``/``functions``: symbol -> class text or class name (module doc).
    ``settings``: PluginConfig(..., settings=) overrides in code; with ``config_class``
    "ekuiper" (whose PluginConfig has no settings) they go to kuiper_pool.yaml instead.
    ``yaml_settings``: written to kuiper_pool.yaml. ``extra_modules``: module name -> text,
    written next to main.py. ``factories``: symbol -> Python expression of a zero-argument
    callable (evaluated in main.py after ``main_code``; default ``lambda: Class()``).
    ``base``: where Source/Sink/Function come from ("kuiper_pool" or "ekuiper");
    ``config_class``: whose PluginConfig; ``runner``: whose ``plugin.start``.
    """
    for what, value in (("base", base), ("config_class", config_class), ("runner", runner)):
        if value not in SDKS:
            raise ValueError(f"{what} must be one of {SDKS}, got {value!r}")
    sources, sinks, functions = dict(sources or {}), dict(sinks or {}), dict(functions or {})
    factories = dict(factories or {})
    plugin_dir = os.path.join(dir, name)
    os.makedirs(os.path.join(plugin_dir, "sources"), exist_ok=True)

    texts = list(LIBRARY)
    for table in (sources, sinks, functions):
        for value in table.values():
            if not _IDENT.match(value) and value not in texts:
                texts.append(value)
    with open(os.path.join(plugin_dir, "kp_symbols.py"), "w") as f:
        f.write(LIB_HEADER.format(base=base) + "".join(texts))
    for mod, text in (extra_modules or {}).items():
        with open(os.path.join(plugin_dir, mod + ".py"), "w") as f:
            f.write(text)

    def table_expr(table: Dict[str, str]) -> str:
        items = [f"{sym!r}: {factories.get(sym) or f'lambda: {_class_name(v)}()'}"
                 for sym, v in table.items()]
        return "{" + ", ".join(items) + "}"

    yaml_values = dict(yaml_settings or {})
    settings_arg = ""
    if settings:
        if config_class == "kuiper_pool":
            settings_arg = f", settings={dict(settings)!r}"
        else:
            yaml_values.update(settings)
    main = (f'"""Generated kuiper_pool test plugin {name}."""\n'
            "import os\nimport sys\n"
            f"from {runner} import plugin\n"
            f"from {config_class} import PluginConfig\n"
            "from kp_symbols import *  # noqa: F401,F403\n"
            f"{main_code}\n\n"
            'if __name__ == "__main__":\n'
            f"    config = PluginConfig({name!r}, {table_expr(sources)}, {table_expr(sinks)},\n"
            f"                          {table_expr(functions)}{settings_arg})\n"
            "    plugin.start(config)\n")
    with open(os.path.join(plugin_dir, "main.py"), "w") as f:
        f.write(main)
    with open(os.path.join(plugin_dir, "kuiper_pool.yaml"), "w") as f:
        f.write(f"# settings of generated plugin {name}\n")
        if yaml_values:
            f.write(yaml.safe_dump(yaml_values, default_flow_style=False))
    with open(os.path.join(plugin_dir, name + ".json"), "w") as f:
        json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                   "sources": list(sources), "sinks": list(sinks), "functions": list(functions)}, f)
    for sym in sources:
        with open(os.path.join(plugin_dir, "sources", sym + ".yaml"), "w") as f:
            f.write("default:\n  interval: 0.01\n")
    return plugin_dir


# --- reading what plugins did ------------------------------------------------------------

def read_jsonl(path: str, event: str = "") -> List[dict]:
    """The complete JSON lines of ``path`` ([] if it does not exist), optionally one event kind.
    A line still being written (a multi-MiB append becomes visible page by page) is left out;
    every earlier line must be whole JSON."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    rows = [json.loads(line) for line in lines[:-2]]
    if len(lines) >= 2:
        try:
            rows.append(json.loads(lines[-2]))
        except ValueError:  # the last newline belongs to an append in progress
            pass
    return [r for r in rows if not event or r.get("event") == event]


def events(plugin_dir: str, event: str = "") -> List[dict]:
    """The library classes' default event file of a plugin."""
    return read_jsonl(os.path.join(plugin_dir, "events.jsonl"), event)


# --- processes and runtime files ------------------------------------------------------------

def is_dead(pid: int) -> bool:
    """Gone, or a zombie (it ran its last instruction; only a parent's wait is missing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def descendants(pid: int) -> Set[int]:
    """Live (non-zombie) descendants of ``pid``."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    return {p.pid for p in procs if not is_dead(p.pid)}


def runtime_base() -> str:
    """kuiper_pool's private directory with the default ``runtime_dir``."""
    return os.path.join(tempfile.gettempdir(), f"kuiper_pool-{os.getuid()}")


def runtime_entries(fragment: str) -> List[str]:
    """Entries of the private directory whose name contains ``fragment``."""
    try:
        names = os.listdir(runtime_base())
    except FileNotFoundError:
        return []
    return sorted(os.path.join(runtime_base(), n) for n in names if fragment in n)


def unique_pysam(dst: str, unique: str, sdk: str = "kuiper_pool") -> Dict[str, str]:
    """This repo's pysam example in ``dst`` with every name eKuiper makes a path of (plugin,
    symbols, rule id) made unique: function sockets are named by symbol alone
    (``/tmp/func_<symbol>.ipc``), so a unique plugin name does not keep two tests or two jobs
    with a function ``revert`` apart. ``sdk="ekuiper"`` switches its imports back to the
    official SDK. Returns the example's names mapped to the unique ones."""
    shutil.copytree(os.path.join(REPO, "examples", "pysam"), dst,
                    ignore=shutil.ignore_patterns("__pycache__"))
    names = {n: f"{n}_{unique}" for n in ("pysam", "pyjson", "print", "revert")}

    def edit(path: str, change) -> None:
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(change(text))

    def port(text: str) -> str:
        return text if sdk == "kuiper_pool" else text.replace("from kuiper_pool import", "from ekuiper import")

    def rename(text: str) -> str:  # symbol names in the PluginConfig and the plugin json
        for old, new in names.items():
            text = text.replace(f'"{old}"', f'"{new}"')
        return text

    def rename_rule(text: str) -> str:
        rule = json.loads(text)
        rule["id"] = f"demo_{unique}"
        for part in [rule["source"], rule["sink"]] + rule["functions"]:
            part["symbol"] = names[part["symbol"]]
        return json.dumps(rule)

    for mod in ("pyjson.py", "print.py", "revert.py"):
        edit(os.path.join(dst, mod), port)
    edit(os.path.join(dst, "pysam.py"), lambda text: rename(port(text)))
    os.rename(os.path.join(dst, "pysam.json"), os.path.join(dst, names["pysam"] + ".json"))
    for kind, symbol, ext in (("sources", "pyjson", "yaml"), ("sources", "pyjson", "json"),
                              ("sinks", "print", "json"), ("functions", "revert", "json")):
        os.rename(os.path.join(dst, kind, f"{symbol}.{ext}"), os.path.join(dst, kind, f"{names[symbol]}.{ext}"))
    edit(os.path.join(dst, names["pysam"] + ".json"), rename)
    edit(os.path.join(dst, "rule.json"), rename_rule)
    return names


UNIQUE_TOKEN = re.compile(r"u[0-9a-f]{10}")  # what the `unique` fixture makes


def function_symbol_problem(symbol: str, test: str, owners: Dict[str, str]) -> str:
    """Why function ``symbol``, started by ``test``, could meet another test's or job's (eKuiper's
    function socket is ``/tmp/func_<symbol>.ipc``, whatever the plugin); "" when it cannot.
    ``owners`` maps each symbol seen to the test that started it first."""
    if not UNIQUE_TOKEN.search(symbol):
        return (f"function symbol {symbol!r} of {test} has no token of the `unique` fixture: its "
                f"socket /tmp/func_{symbol}.ipc is the same in every test and job that uses the name")
    owner = owners.setdefault(symbol, test)
    if owner != test:
        return f"function symbol {symbol!r} of {test} is also started by {owner}"
    return ""


class HostRuns:
    """Starts emulator Hosts and tears them down proving nothing is left behind.

    ``launch(plugin_dir, **Host kwargs)`` returns a started Host (its stdout goes to
    ``<plugin_dir>/stdout.log`` unless ``stdout`` is given; PYTHONPATH points at this repo).
    ``close()``: every Host is closed (handles stopped, plugin SIGKILLed, as eKuiper does);
    then every pid seen in a plugin's tree must be dead within ``timeout`` (stragglers are
    SIGKILLed and reported) and no runtime entry naming ``fragment`` may remain.
    """

    def __init__(self, fragment: str, timeout: float = 5.0) -> None:
        self.fragment = fragment
        self.timeout = timeout
        self.hosts: List[Host] = []
        self.pids: Set[int] = set()
        self.files: list = []

    def launch(self, plugin_dir: str, **kw: Any) -> Host:
        if "stdout" not in kw:
            f = open(os.path.join(plugin_dir, "stdout.log"), "ab")
            self.files.append(f)
            kw["stdout"] = f
        env = dict(kw.pop("env", None) or {})
        env.setdefault("PYTHONPATH", os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
        kw.setdefault("init_timeout", 30.0)
        host = Host(plugin_dir, env=env, **kw)
        self.hosts.append(host)
        host.start()
        self.track([host.process.pid])
        return host

    def track(self, pids: Iterable[int]) -> None:
        """Pids that must be dead at ``close`` (a plugin's tree is added automatically)."""
        self.pids.update(pids)

    def snapshot(self) -> None:
        for host in self.hosts:
            if host.process is not None:
                self.pids.add(host.process.pid)
                self.pids |= descendants(host.process.pid)

    def close(self) -> List[str]:
        """Tear down; return the problems found (empty when clean)."""
        problems: List[str] = []
        self.snapshot()
        for host in self.hosts:
            try:
                host.close()
            except Exception as e:  # noqa: BLE001 - keep tearing down
                problems.append(f"closing host {host.name}: {type(e).__name__}: {e}")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not all(is_dead(p) for p in self.pids):
            time.sleep(0.02)
        left = sorted(p for p in self.pids if not is_dead(p))
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        if left:
            problems.append(f"processes still alive {self.timeout:g} s after teardown: {left}")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and runtime_entries(self.fragment):
            time.sleep(0.02)
        entries = runtime_entries(self.fragment)
        for path in entries:
            try:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
            except OSError:
                pass
        if entries:
            problems.append(f"runtime entries left in {runtime_base()}: {entries}")
        for f in self.files:
            f.close()
        return problems
