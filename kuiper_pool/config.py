"""Settings: one declarative registry feeds validation, the defaults file and its docs.

Modelled on gunicorn's config.py: every setting is a single :class:`Setting` in
:data:`SETTINGS`. Precedence, lowest first: the registry defaults, the YAML file
(``$KUIPER_POOL_CONFIG`` or ``<script_dir>/kuiper_pool.yaml``), environment variables
``KUIPER_POOL_<NAME>``, then ``overrides`` from code. A bad value or an unknown key is
a :class:`ConfigError` whose message is one line.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple


ENV_PREFIX = "KUIPER_POOL_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
FILE_NAME = "kuiper_pool.yaml"


class ConfigError(ValueError):
    """A bad or unknown setting; ``str(e)`` is one line naming key, value, expectation and source."""


def _identity(value: Any) -> Any:
    return value


class Setting(NamedTuple):
    name: str
    section: str
    type: type  # bool, int, float or str: what YAML must hold and what env text is parsed as
    default: Any
    expected: str  # completes "<name> must be ..."
    description: str
    check: Callable[[Any], Any] = _identity  # returns the value to store; ValueError if unacceptable

    def validate(self, raw: Any, source: str) -> Any:
        """Check a value from YAML or code and return it coerced (an int is fine for a float)."""
        try:
            value = float(raw) if self.type is float and type(raw) is int else raw
            if type(value) is not self.type:
                raise ValueError
            return self.check(value)
        except (ValueError, OverflowError):  # OverflowError: an int too large for a float
            raise self.error(raw, source) from None

    def parse(self, text: str, source: str) -> Any:
        """Convert an environment variable's text to this setting's type, then validate it."""
        try:
            if self.type is bool:
                value: Any = {"true": True, "1": True, "false": False, "0": False}[text.strip().lower()]
            else:
                value = text if self.type is str else self.type(text.strip())
            return self.validate(value, source)
        except (KeyError, ValueError):  # ConfigError too, so the message shows the text as given
            raise self.error(text, source) from None

    def error(self, raw: Any, source: str) -> ConfigError:
        shown = repr(raw)
        shown = shown if len(shown) <= 60 else shown[:40] + f"... ({len(shown)} characters)"
        return ConfigError(f"kuiper_pool config: {self.name} must be {self.expected} (got {shown} from {source})")


def _num(section: str, name: str, kind: type, default: Any, description: str, *,
         ge: float, le: float) -> Setting:
    """A number in [ge, le]: every number has an upper bound too (a 400-digit heartbeat_misses
    or a heartbeat_interval of 1e-6 is a mistake, not a setting)."""
    bounds = [f"{op} {b}" for op, b in ((">=", ge), ("<=", le))]
    expected = ("a number " if kind is float else "an integer ") + " and ".join(bounds)

    def check(v: Any) -> Any:
        if (kind is float and not math.isfinite(v)) or not ge <= v <= le:
            raise ValueError
        return v
    return Setting(name, section, kind, default, expected, description, check)


def _choice(section: str, name: str, default: str, choices: Sequence[str], description: str,
            fold: bool = False) -> Setting:
    def check(v: str) -> str:
        v = v.upper() if fold else v
        if v not in choices:
            raise ValueError
        return v
    return Setting(name, section, str, default, "one of " + ", ".join(choices), description, check)


def is_loopback(address: str) -> bool:
    """Whether the host of ``host:port`` (``[v6]:port`` too) is this machine only."""
    host = address.rpartition(":")[0]
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    import ipaddress  # only when an address is given: every plugin start reads the settings

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an IP address
        return False


def _address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError
    return value


# Protobuf scalar types a served function's arguments and result may have (docs/serve.md);
# bytes only as an argument (eKuiper sends it base64-encoded).
SERVE_TYPES = ("string", "double", "int64", "bool", "bytes")


def _serve_args(value: str) -> str:
    types = [t.strip() for t in value.split(",")] if value.strip() else []
    if any(t not in SERVE_TYPES for t in types):
        raise ValueError
    return ",".join(types)


def _loopback_address(value: str) -> str:
    if value and not is_loopback(_address(value)):
        raise ValueError
    return value


SECTIONS: Dict[str, str] = {
    "workers": "how worker processes are made and stopped",
    "health": "heartbeats, call deadlines and resource sampling",
    "restart": "restarting crashed workers",
    "limits": "per-worker limits and sink flow control",
    "host": "the link to eKuiper",
    "operations": "logging, metrics and runtime files",
    "state": "instance state (ctx.put_state) kept across worker restarts and plugin restarts",
    "serve": "kuiper-pool serve: functions as an eKuiper external service (docs/serve.md)",
}

SETTINGS: Tuple[Setting, ...] = (
    _choice("workers", "start_method", "auto", ("auto", "fork", "spawn"),
            'How workers are made: "fork" from a zygote process forked before any nng socket exists '
            '(~2 ms a worker, plugin modules already loaded); "spawn" runs a fresh interpreter per '
            "worker and ships the plugin factories with cloudpickle (~60 ms), so libraries are "
            'imported after exec; "auto" forks unless the plugin has threads alive when it starts '
            "(thread pools that numpy, OpenCV or ONNX Runtime start at import: forking them is unsafe), "
            "then spawns and says which threads, once, at WARNING. A symbol with an env entry in "
            "symbols: always spawns, so its variables apply when its libraries are imported."),
    _num("workers", "threads_per_worker", int, 1,
         "Threads each worker's math libraries may use: OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, "
         "MKL_NUM_THREADS, NUMEXPR_NUM_THREADS and VECLIB_MAXIMUM_THREADS are set to it in workers "
         "where neither the environment nor the symbol's env sets them (0 = leave them unset). "
         "One thread per worker keeps N workers from running N x cores BLAS threads on a small "
         "box; it applies to libraries a worker imports (spawned workers import everything).", ge=0, le=1024),
    _choice("workers", "workers", "per_instance", ("per_instance", "per_symbol"),
            '"per_instance": one worker process per source and sink instance (the strongest '
            'isolation: ~2.6 MiB each). "per_symbol": one worker process per source or sink symbol '
            "holding all of its instances in threads, as the official SDK does (a few KiB per "
            "instance), still isolated from every other symbol and from the supervisor: its crash "
            "or hang restarts every instance in it, and memory_limit_mb applies to the process. "
            "Usually set per symbol. Functions always have one process per symbol (docs/operating.md)."),
    _num("workers", "stop_grace", float, 2.0,
         "Seconds a worker gets to run close() and exit after a stop, and after SIGTERM, before SIGKILL.",
         ge=0.01, le=3600),
    _num("health", "heartbeat_interval", float, 0.5, "Seconds between worker heartbeats.", ge=0.05, le=3600),
    _num("health", "heartbeat_misses", int, 4,
         "Missed heartbeats before a worker counts as hung and is killed "
         "(SIGTERM, then SIGKILL after stop_grace).", ge=1, le=1000),
    _num("health", "call_deadline", float, 4.0,
         "Longest a function Exec/Validate/IsAggregate call or a sink collect may run before the "
         "worker is killed and replaced; below eKuiper's 5 s receive timeout so eKuiper gets the "
         "error reply instead of its own timeout.", ge=0.01, le=86400),
    _num("health", "collect_deadline", float, 0.0,
         "Longest one sink collect may run before the worker is killed and the item redelivered "
         "(0 = off: eKuiper imposes no limit on sinks).", ge=0, le=86400),
    _num("health", "start_timeout", float, 30.0,
         "Longest a worker's start may take (factory, configure and a sink's open) before it is "
         "killed and the start refused.", ge=0.1, le=86400),
    _num("health", "sample_interval", float, 1.0,
         "Seconds between psutil samples of each worker's memory and CPU.", ge=0.05, le=3600),
    _num("restart", "restart_backoff_initial", float, 0.0,
         "Seconds before the first restart of a crashed worker.", ge=0, le=86400),
    _num("restart", "restart_backoff_min", float, 0.1,
         "Seconds the second restart waits; each later one doubles it.", ge=0.001, le=86400),
    _num("restart", "restart_backoff_max", float, 10.0,
         "Cap of the restart delay in seconds; at least restart_backoff_min.", ge=0.001, le=86400),
    _num("restart", "restart_jitter", float, 0.2,
         "Random fraction added to or removed from each delay so instances do not restart in lockstep.",
         ge=0, le=1),
    _num("restart", "flap_max_restarts", int, 5,
         "Restarts within flap_window after which the instance is marked failed (tried again after "
         "failed_retry_min).", ge=1, le=1000000),
    _num("restart", "flap_window", float, 60.0, "Seconds over which flap_max_restarts is counted.",
         ge=0.1, le=2592000),
    _num("restart", "failed_retry_min", float, 60.0,
         "Seconds after which a failed instance is tried again; each further failure doubles it.",
         ge=0.1, le=2592000),
    _num("restart", "failed_retry_max", float, 1800.0, "Cap of the failed-instance retry delay.",
         ge=0.1, le=2592000),
    _num("limits", "memory_limit_mb", float, 0.0,
         "Resident memory cap per worker in MB (0 = off); above it the worker is recycled gracefully "
         "(a fresh worker starts, the old one drains and stops). A shared worker (workers: "
         "per_symbol) is one worker: the cap is its whole process's.", ge=0, le=1000000000),
    _num("limits", "max_calls", int, 0, "Recycle a function worker after this many calls (0 = off).",
         ge=0, le=1000000000000000),
    _num("limits", "sink_window_mb", float, 128.0,
         "MiB of sink items (payload plus 128 bytes each) read from eKuiper and not yet finished; "
         "beyond it the supervisor stops reading (back-pressure). Large enough to keep reading at "
         "full rate through hang detection and a restart, so eKuiper's sends never time out meanwhile; "
         "a sink may hold up to twice this while its worker is stopped (the items and their frames "
         "queued to the worker).", ge=1, le=16384),
    _num("limits", "sink_max_deliveries", int, 3,
         "How many workers may crash while collecting one sink item before it is dropped as "
         "poison (logged; error ack when the rule requires acks).", ge=1, le=1000),
    _choice("host", "transport", "sp", ("sp", "nng"),
            'How eKuiper\'s sockets are spoken: "sp" natively (SP over ipc framing, no nng thread '
            'hand-offs; function workers answer eKuiper on its connection directly) or "nng" '
            "through pynng (the fallback: function calls are relayed by the supervisor)."),
    _num("host", "control_lost_timeout", float, 10.0,
         "Seconds the control channel to eKuiper may stay disconnected before the supervisor stops "
         "everything and exits.", ge=0.1, le=86400),
    _num("host", "dial_timeout", float, 5.0,
         "Seconds to keep dialing eKuiper's control socket at start, and a function's channel "
         "before its first start is refused, before giving up.", ge=0.1, le=3600),
    _num("host", "ekuiper_recv_timeout", float, 5.0,
         "eKuiper's portable.recvTimeout: how long it waits for a function reply. It re-sends a "
         "call only while it waits, so a call a dead worker had begun is recognised in a new "
         "connection only within this time of the call's start.", ge=0.1, le=3600),
    _choice("host", "source_datasource", "stream", ("stream", "empty"),
            'What a source\'s configure(datasource, conf) gets as datasource: "stream" the '
            "stream's DATASOURCE as eKuiper sends it; \"empty\" always \"\", as the official SDK "
            "passes (for sources written against that behaviour, e.g. ones that subscribe to "
            "whatever they get). Usually set per symbol."),
    _choice("operations", "log_level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"),
            "Log level, case-insensitive.", fold=True),
    Setting("metrics_address", "operations", str, "",
            '"" or "host:port" with a loopback host (127.x.x.x, ::1 or localhost) and port 1-65535',
            "Where this plugin's supervisor serves its Prometheus metrics over HTTP itself, one "
            'port per plugin ("" = not: `kuiper-pool metrics` serves every plugin\'s from their '
            "status sockets on one address).", _loopback_address),
    Setting("runtime_dir", "operations", str, "", "a string",
            'Where the private (0700) directory for internal sockets is made ("" = $TMPDIR if set, else /tmp); '
            "it and every directory above it must belong to this user or root and be writable by "
            "nobody else (a sticky directory such as /tmp is fine)."),
    Setting("state_dir", "state", str, "", "a string",
            'Directory where instance state (ctx.put_state) is kept so that it survives a restart of '
            'the plugin by eKuiper ("" = in the supervisor\'s memory only: it survives worker crashes, '
            "recycles and reloads). Made 0700 if missing; must be owned by the plugin's user and "
            "closed to group and others, and every directory on its path writable by nobody else "
            "(as the settings file's). A state file that cannot be read is moved aside "
            "(<name>.corrupt-<time>, one WARNING) and the instance starts with empty state."),
    _num("state", "state_max_bytes", int, 1048576,
         "Most bytes (keys plus encoded values) of state per source or sink instance, and per rule "
         "of a function; a put_state beyond it raises ValueError in the plugin code.", ge=1,
         le=1 << 30),
    _num("state", "state_flush_interval", float, 1.0,
         "Seconds between writes of changed state to state_dir (also written at stop and "
         "shutdown); what changed since the last write is lost if the supervisor is killed.", ge=0.01,
         le=3600),
    Setting("serve_listen", "serve", str, "127.0.0.1:9081", '"host:port" with port 1-65535',
            "Where kuiper-pool serve accepts eKuiper's REST calls. Loopback by default; name "
            "0.0.0.0:<port> (or another address) to serve other machines and pods.", _address),
    _num("serve", "serve_workers", int, 0,
         "Worker processes per function symbol under kuiper-pool serve; each call goes to an "
         "idle one (0 = the machine's cores). Usually set per symbol.", ge=0, le=1024),
    Setting("serve_args", "serve", str, "string",
            "a comma-separated list of " + ", ".join(SERVE_TYPES),
            "The protobuf type of each argument of a served function, in order (eKuiper converts "
            "SQL values to these before the call; docs/serve.md). Usually set per symbol.",
            _serve_args),
    _choice("serve", "serve_result", "string", SERVE_TYPES[:-1],
            "The protobuf type of a served function's result; with string, a result that is not "
            "a string arrives as its JSON text. Usually set per symbol."),
    _num("serve", "serve_drain", float, 10.0,
         "Seconds kuiper-pool serve keeps answering after SIGTERM (readiness is off meanwhile, "
         "so load balancers stop sending) before it stops; it stops sooner once no call has "
         "been in flight for a second.", ge=0, le=3600),
)


class Settings(NamedTuple):
    """The effective settings; fields mirror :data:`SETTINGS` in order (a test keeps them in step)."""
    start_method: str
    threads_per_worker: int
    workers: str
    stop_grace: float
    heartbeat_interval: float
    heartbeat_misses: int
    call_deadline: float
    collect_deadline: float
    start_timeout: float
    sample_interval: float
    restart_backoff_initial: float
    restart_backoff_min: float
    restart_backoff_max: float
    restart_jitter: float
    flap_max_restarts: int
    flap_window: float
    failed_retry_min: float
    failed_retry_max: float
    memory_limit_mb: float
    max_calls: int
    sink_window_mb: float
    sink_max_deliveries: int
    transport: str
    control_lost_timeout: float
    dial_timeout: float
    ekuiper_recv_timeout: float
    source_datasource: str
    log_level: str
    metrics_address: str
    runtime_dir: str
    state_dir: str
    state_max_bytes: int
    state_flush_interval: float
    serve_listen: str
    serve_workers: int
    serve_args: str
    serve_result: str
    serve_drain: float

    symbols: Mapping[str, Mapping[str, Any]] = {}  # shared default: a Settings is never changed

    def as_dict(self) -> Dict[str, Any]:
        return dict(self._asdict())

    def for_symbol(self, symbol: str) -> "Settings":
        """The settings of one symbol's instances: these, with its ``symbols:`` overrides."""
        overrides = {k: v for k, v in self.symbols.get(symbol, {}).items() if k != ENV_KEY}
        return self._replace(**overrides) if overrides else self

    def symbol_env(self) -> Dict[str, Dict[str, str]]:
        """``{symbol: {variable: value}}`` from the ``env`` entries of ``symbols:``."""
        return {sym: dict(table[ENV_KEY]) for sym, table in self.symbols.items() if ENV_KEY in table}

    def thread_env(self) -> Dict[str, str]:
        """The math-library thread variables every worker gets unless already set."""
        n = self.threads_per_worker
        return {var: str(n) for var in THREAD_VARS} if n else {}


# Read at import by OpenMP, OpenBLAS, MKL, numexpr and Accelerate to size their thread pools.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
# A symbol's environment variables: ``symbols: {infer: {env: {OMP_NUM_THREADS: "1"}}}``.
ENV_KEY = "env"


# What a ``symbols: {<symbol>: {...}}`` entry may override: everything that is decided per
# instance (how workers are made, the transport, logging and files are the plugin's).
PER_SYMBOL = frozenset((
    "stop_grace", "heartbeat_interval", "heartbeat_misses", "call_deadline", "collect_deadline",
    "start_timeout", "restart_backoff_initial", "restart_backoff_min", "restart_backoff_max",
    "restart_jitter", "flap_max_restarts", "flap_window", "failed_retry_min", "failed_retry_max",
    "memory_limit_mb", "max_calls", "sink_window_mb", "sink_max_deliveries", "source_datasource",
    "state_max_bytes", "serve_workers", "serve_args", "serve_result", "workers"))


_BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


def _did_you_mean(key: Any, known: Iterable[str]) -> str:
    import difflib  # only for a mistake

    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown(key: Any, source: str, known: Iterable[str]) -> ConfigError:
    return ConfigError(f"kuiper_pool config: unknown setting {key!s} (from {source})"
                       f"{_did_you_mean(key, known)}")


def _path_chain(path: str) -> List[str]:
    """Every directory whose entries decide where ``path`` leads (those holding each symlink
    on the way included), then the file or directory it finally names."""
    todo = os.path.abspath(path).split(os.sep)
    current, chain, hops = os.sep, [os.sep], 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        step = os.path.join(current, part)
        if os.path.islink(step):
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(step)
            todo = target.split(os.sep) + todo
            current = os.sep if target.startswith(os.sep) else current
            continue
        current = step
        chain.append(current)
    return chain


def check_trusted(path: str, what: str) -> None:
    """Refuse ``path`` (a settings file, the runtime dir) unless it and every directory on the
    way to it (symlinks followed) belong to this user or root and nobody else can write them,
    as ssh's StrictModes: otherwise another local user could choose our settings or swap a
    directory under us. A world-writable directory with the sticky bit (/tmp) is fine: nobody
    else can replace what is ours in it."""
    uid = os.getuid()
    try:
        for step in _path_chain(path):
            st = os.stat(step)
            if st.st_uid not in (uid, 0):
                why = f"{step} belongs to uid {st.st_uid}, not to uid {uid} or root"
            elif st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
                why = f"{step} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
            else:
                continue
            raise ConfigError(f"kuiper_pool config: refusing {what} {path}: {why}")
    except OSError as e:
        raise ConfigError(f"kuiper_pool config: cannot check {what} {path}: {e.strerror or e}") from None


def _read_yaml(path: str) -> Mapping[Any, Any]:
    import yaml  # only when there is a file to read: start-up time matters

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kuiper_pool config: cannot read {path}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"kuiper_pool config: {path} must be a mapping of setting: value "
                          f"(got a {type(data).__name__})")
    return data


def load_settings(script_dir: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                  environ: Optional[Mapping[str, str]] = None,
                  known_symbols: Optional[Sequence[str]] = None,
                  warn: Optional[Callable[[str], None]] = None) -> Settings:
    """Defaults < $KUIPER_POOL_CONFIG or <script_dir>/kuiper_pool.yaml < KUIPER_POOL_<NAME> < overrides.
    With ``known_symbols`` (the plugin's), a ``symbols:`` entry for any other name is an error.
    An unknown ``KUIPER_POOL_*`` variable is only a warning (``warn``, else the log): eKuiper's
    environment is every plugin's, and one left from another kuiper_pool version (a newer
    setting, after a rollback) must not stop them all."""
    env = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    sources = dict.fromkeys(values, "defaults")

    symbols: Dict[str, Dict[str, Any]] = {}
    symbol_sources: Dict[str, Dict[str, str]] = {}

    def put(key: Any, raw: Any, source: str) -> None:
        if key == "symbols":
            put_symbols(raw, source)
            return
        if key not in _BY_NAME:
            raise _unknown(key, source, list(_BY_NAME) + ["symbols"])
        values[key], sources[key] = _BY_NAME[key].validate(raw, source), source

    def put_symbols(raw: Any, source: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"kuiper_pool config: symbols must be a mapping of symbol name to "
                              f"settings (got {raw!r} from {source})")
        for symbol, table in raw.items():
            where = f"symbols.{symbol}"
            if not isinstance(symbol, str) or not isinstance(table, dict):
                raise ConfigError(f"kuiper_pool config: {where} must be a mapping of setting: value "
                                  f"(got {table!r} from {source})")
            symbols.setdefault(symbol, {})
            symbol_sources.setdefault(symbol, {"": source})
            for key, value in table.items():
                if key == ENV_KEY:
                    symbols.setdefault(symbol, {})[key] = _env_table(value, f"{where}.{key}", source)
                    continue
                if key not in PER_SYMBOL:
                    what = "is not a per-symbol setting" if key in _BY_NAME else "is not a setting"
                    raise ConfigError(f"kuiper_pool config: {where}.{key} {what} (from {source}; "
                                      f"per-symbol: {', '.join(sorted(PER_SYMBOL | {ENV_KEY}))})")
                try:
                    symbols.setdefault(symbol, {})[key] = _BY_NAME[key].validate(value, source)
                except ConfigError as e:
                    raise ConfigError(str(e).replace(f"config: {key} ", f"config: {where}.{key} ", 1)) from None
                symbol_sources.setdefault(symbol, {})[key] = source

    path = env.get(CONFIG_ENV) or None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"kuiper_pool config: {CONFIG_ENV} names {path!r}, which is not an existing file")
    if path is None and script_dir is not None and os.path.isfile(os.path.join(script_dir, FILE_NAME)):
        path = os.path.join(script_dir, FILE_NAME)
    if path:
        check_trusted(path, "settings file")
    for key, raw in (_read_yaml(path) if path else {}).items():
        put(key, raw, path)
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var != CONFIG_ENV:
            name, source = var[len(ENV_PREFIX):].lower(), f"environment variable {var}"
            if name not in _BY_NAME:
                _warn_unknown_env(var, warn)
                continue
            values[name], sources[name] = _BY_NAME[name].parse(env[var], source), source
    for key, raw in (overrides or {}).items():
        put(key, raw, "overrides")
    _check_ranges(values, sources, "")
    if known_symbols is not None:
        _check_symbols(symbols, known_symbols, symbol_sources)
    for symbol, table in symbols.items():
        _check_ranges({**values, **table}, {**sources, **symbol_sources.get(symbol, {})}, f"symbols.{symbol}.")
    return Settings(**values, symbols=symbols)


def _warn_unknown_env(var: str, warn: Optional[Callable[[str], None]]) -> None:
    from . import logs
    from .version import __version__

    hint = _did_you_mean(var, (ENV_PREFIX + n.upper() for n in _BY_NAME))
    text = (f"kuiper_pool config: ignoring environment variable {var}: not a setting of "
            f"kuiper_pool {__version__}{hint}")
    (warn or logs.supervisor_logger().warning)(text)


def _check_symbols(symbols: Iterable[str], known: Sequence[str],
                   sources: Mapping[str, Mapping[str, str]]) -> None:
    """A ``symbols:`` entry must name a symbol of the plugin: a typo would silently leave the
    symbol it meant with the defaults."""
    for symbol in symbols:
        if symbol not in known:
            hint = _did_you_mean(symbol, known)
            source = next(iter(sources[symbol].values()), "symbols")
            raise ConfigError(f"kuiper_pool config: symbols.{symbol} names no symbol of the plugin "
                              f"(from {source}; it has {', '.join(sorted(known)) or 'none'}){hint}")


def _env_table(raw: Any, where: str, source: str) -> Dict[str, str]:
    """A symbol's ``env``: variable names to string values."""
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\0" not in k
            and isinstance(v, str) and "\0" not in v for k, v in raw.items()):
        raise ConfigError(f"kuiper_pool config: {where} must be a mapping of environment variable "
                          f"name to string value, e.g. {{OMP_NUM_THREADS: \"1\"}} (got {raw!r} from {source})")
    return dict(raw)


def _check_ranges(values: Mapping[str, Any], sources: Mapping[str, str], prefix: str) -> None:
    """Settings that bound each other: the upper one must not be below the lower one."""
    for lo_key, hi_key in (("restart_backoff_min", "restart_backoff_max"),
                           ("failed_retry_min", "failed_retry_max")):
        lo, hi = values[lo_key], values[hi_key]
        if hi < lo:
            raise ConfigError(f"kuiper_pool config: {prefix}{hi_key} must be >= {prefix}{lo_key} "
                              f"(got {hi} from {sources[hi_key]} < {lo} from {sources[lo_key]})")


def render_defaults_yaml() -> str:
    """The commented defaults file (config/kuiper_pool.yaml), generated from :data:`SETTINGS`."""
    import textwrap  # only here: every plugin start imports this module

    lines = [
        "# kuiper_pool settings, with their defaults. Copy this file next to the plugin's main script",
        f"# as {FILE_NAME} (or point {CONFIG_ENV} at it) and keep only the keys you change.",
        f"# Any key can also be set from the environment as {ENV_PREFIX}<KEY IN UPPER CASE>;",
        "# precedence: defaults < this file < environment < overrides from code.",
        "# The file, and every directory on the way to it, must belong to this user or root and be",
        "# writable by nobody else (as ssh's StrictModes); otherwise the plugin refuses to start.",
        "# Generated by kuiper_pool.config.render_defaults_yaml(): edit the registry, not this file.",
    ]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            lines += ["", f"# ==== {section}: {SECTIONS[section]} ===="]
        lines.append("")
        for text in (s.description, f"Must be {s.expected}."):
            lines += textwrap.wrap(text, 90, initial_indent="# ", subsequent_indent="# ",
                                   break_long_words=False, break_on_hyphens=False)
        lines.append(f"{s.name}: {json.dumps(s.default)}")
    lines += ["", "# ==== symbols: per-symbol policy ====", ""]
    text = ("Overrides of per-instance settings for the instances of one symbol, e.g. "
            "symbols: {heavy: {call_deadline: 10, memory_limit_mb: 2048}}. Per-symbol settings: "
            + ", ".join(sorted(PER_SYMBOL)) + ". Not settable from the environment. "
            'env: {OMP_NUM_THREADS: "1", CUDA_VISIBLE_DEVICES: "0"} adds environment variables '
            "to that symbol's workers, which then always spawn, so libraries read them at import.")
    lines += textwrap.wrap(text, 90, initial_indent="# ", subsequent_indent="# ",
                           break_long_words=False, break_on_hyphens=False)
    lines.append("symbols: {}")
    return "\n".join(lines) + "\n"
