"""The eKuiper portable-plugin wire protocol, plugin side (docs/protocol.md).

Everything that knows a socket path, a command's shape or an answer's bytes
lives here, so the rest of the package speaks in parsed values.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

# argv[1] of every plugin process eKuiper starts (its PortableConfig as JSON)
PORTABLE_CONF = '{"sendTimeout":1000}'
CMD_START = "start"
CMD_STOP = "stop"
TYPE_SOURCE = "source"
TYPE_SINK = "sink"
TYPE_FUNC = "func"
PLUGIN_TYPES = (TYPE_SOURCE, TYPE_SINK, TYPE_FUNC)

HANDSHAKE = b"handshake"
OK = b"ok"
SINK_ACK_OK = b"{}"


class ProtocolError(ValueError):
    """A command eKuiper (or something pretending to be it) sent that we cannot act on."""


def control_url(plugin_name: str) -> str:
    return f"ipc:///tmp/plugin_{plugin_name}.ipc"


def function_url(symbol: str) -> str:
    return f"ipc:///tmp/func_{symbol}.ipc"


def data_url(rule_id: str, op_id: str, instance_id: int) -> str:
    """Source data (eKuiper listens) and sink data (the plugin listens)."""
    return f"ipc:///tmp/{rule_id}_{op_id}_{instance_id}.ipc"


def ack_url(rule_id: str, op_id: str, instance_id: int) -> str:
    return f"ipc:///tmp/{rule_id}_{op_id}_{instance_id}_ack.ipc"


def ipc_path(url: str) -> str:
    """The file an ``ipc://`` url names."""
    return url[len("ipc://"):]


class Control(NamedTuple):
    """One start/stop command's argument (eKuiper's ``Control``)."""

    cmd: str
    symbol: str
    plugin_type: str
    rule_id: str = ""
    op_id: str = ""
    instance_id: int = 0
    data_source: str = ""
    config: Dict[str, Any] = {}  # shared default: nothing changes a command's config

    @property
    def key(self) -> str:
        """Identity of the instance: one function worker per symbol (kuiper-pool serve: worker
        ``instance_id`` of the symbol's pool, from 1), else per (rule, op, instance)."""
        if self.plugin_type == TYPE_FUNC:
            return f"func:{self.symbol}" + (f":{self.instance_id}" if self.instance_id else "")
        return f"{self.plugin_type}:{self.symbol}:{self.rule_id}:{self.op_id}:{self.instance_id}"

    def describe(self) -> str:
        """How logs and errors name the instance."""
        if self.plugin_type == TYPE_FUNC:
            return f"function {self.symbol}" + (f" worker {self.instance_id}" if self.instance_id else "")
        return (f"{self.plugin_type} {self.symbol} rule {self.rule_id} "
                f"op {self.op_id} instance {self.instance_id}")

    def datasource(self) -> str:
        """eKuiper 2.x sends the stream's DATASOURCE inside config; older hosts at top level."""
        if self.data_source:
            return self.data_source
        value = self.config.get("datasource", "")
        return value if isinstance(value, str) else ""

    def source_datasource(self, policy: str) -> str:
        """What a source's ``configure`` gets under the ``source_datasource`` setting: the
        stream's DATASOURCE ("stream"), or "" as the official SDK passes ("empty")."""
        return self.datasource() if policy == "stream" else ""

    def to_dict(self) -> Dict[str, Any]:
        return {"cmd": self.cmd, "symbol": self.symbol, "plugin_type": self.plugin_type,
                "rule_id": self.rule_id, "op_id": self.op_id, "instance_id": self.instance_id,
                "data_source": self.data_source, "config": self.config}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Control":
        return cls(**d)


# Limits on what eKuiper's bytes may make us decode. Go's encoder nests up to 10000 levels;
# Python's json recurses once per level (RecursionError near 1000), and the config is
# encoded again on its way to the worker, deeper in the stack: refuse beyond MAX_DEPTH.
MAX_COMMAND_BYTES = 128 << 20   # a start carries the whole config: 64 MiB ones must work
MAX_DEPTH = 256
MAX_INSTANCE_ID = (1 << 63) - 1  # eKuiper's instanceId is a Go int
_SYMBOL = re.compile(r'"symbolName"\s*:\s*"([^"\\]{1,200})"')


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """How deep lists and dicts nest in a decoded value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _decode_json(text: str, what: str) -> Any:
    """``json.loads`` that raises only ProtocolError (NaN and Infinity are not JSON either)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
        too_deep = _depth(value) > MAX_DEPTH
    except RecursionError:
        too_deep = True
    except ValueError as e:
        raise ProtocolError(f"{what} is not JSON: {e}") from None
    if too_deep:
        found = next(iter(_SYMBOL.findall(text)), "")
        named = f" of symbol {found}" if found else ""
        raise ProtocolError(f"{what}{named} nests deeper than {MAX_DEPTH} levels")
    return value


def _name(value: Any, what: str, where: str) -> str:
    """A non-empty name that can become part of a socket path and of a log line."""
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{where}command has no {what} (a non-empty string)")
    if any(ord(ch) < 32 for ch in value):  # a NUL would silently cut a socket path short
        raise ProtocolError(f"{where}{what} {value!r} has a control character"[:300])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"{where}{what} {value!r} is not valid Unicode"[:300]) from None
    return value


def parse_command(raw: bytes) -> Control:
    """Decode ``{"cmd", "arg": "<Control JSON>"}``; for anything else raise ProtocolError
    with a one-line reason (and nothing else, whatever the bytes)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"command is {type(raw).__name__}, not bytes")
    if not raw:
        raise ProtocolError("command is empty")
    if len(raw) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command of {len(raw)} bytes is larger than {MAX_COMMAND_BYTES}")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"command is not UTF-8 JSON: {e}") from None
    cmd = _decode_json(text, "command")
    if not isinstance(cmd, dict):
        raise ProtocolError("command is not a JSON object")
    name = cmd.get("cmd")
    if name not in (CMD_START, CMD_STOP):
        raise ProtocolError(f"unknown command {name!r}"[:300])
    arg = cmd.get("arg")
    if not isinstance(arg, str):
        raise ProtocolError("command arg is not a JSON object in a string")
    ctrl = _decode_json(arg, "command arg")
    if not isinstance(ctrl, dict):
        raise ProtocolError("command arg is not a JSON object")
    symbol = _name(ctrl.get("symbolName"), "symbolName", "")
    ptype = ctrl.get("pluginType")
    if ptype not in PLUGIN_TYPES:
        raise ProtocolError(f"unknown plugin type {ptype!r} for symbol {symbol}"[:300])
    where = f"{ptype} {symbol}: "
    rule_id = op_id = ""
    instance_id = 0
    if ptype != TYPE_FUNC:
        meta = ctrl.get("meta")
        if not isinstance(meta, dict):
            raise ProtocolError(f"{where}command has no meta")
        rule_id = _name(meta.get("ruleId"), "meta ruleId", where)
        op_id = _name(meta.get("opId"), "meta opId", where)
        instance_id = meta.get("instanceId", 0)
        if (not isinstance(instance_id, int) or isinstance(instance_id, bool)
                or not 0 <= instance_id <= MAX_INSTANCE_ID):
            raise ProtocolError(f"{where}meta instanceId must be an integer from 0 to "
                                f"{MAX_INSTANCE_ID}, got {instance_id!r}"[:300])
    config = ctrl.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ProtocolError(f"{where}config must be a JSON object, got {type(config).__name__}")
    data_source = ctrl.get("dataSource")
    if data_source is None:
        data_source = ""
    if not isinstance(data_source, str):
        raise ProtocolError(f"{where}dataSource must be a string, got {type(data_source).__name__}")
    return Control(name, symbol, ptype, rule_id, op_id, instance_id, data_source, config)


def one_line(text: str, limit: int = 2000) -> bytes:
    """An error answer: one line (eKuiper shows it to the user as is)."""
    flat = " ".join(str(text).split())
    return (flat[:limit] or "error").encode("utf-8", "backslashreplace")


def require_ack(config: Dict[str, Any]) -> bool:
    """eKuiper casts the sink's props to ``{requireAck bool}``; odd types never raise."""
    value = config.get("requireAck", False) if isinstance(config, dict) else False
    if isinstance(value, str):
        return value.lower() == "true"
    return bool(value)


# --- data encodings -------------------------------------------------------------

def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_encoder: Optional[Callable[[Any], bytes]] = None
_decoder: Callable[[Any], Any] = json.loads


def encoder() -> Callable[[Any], bytes]:
    """The compact JSON encoder: orjson when installed (the ``fast`` extra, ~10x cheaper on
    the hot path), else json; :func:`loads` is chosen with it. Chosen at first use:
    importing orjson costs milliseconds (datetime, uuid, platform) that eKuiper's handshake
    should not wait for."""
    global _encoder, _decoder
    if _encoder is None:
        try:
            import orjson
        except ImportError:  # pragma: no cover - depends on the environment
            _encoder = _json_dumps
        else:
            def fast(obj: Any) -> bytes:
                try:
                    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
                except TypeError:  # what orjson refuses, json may take (as the official SDK does)
                    return _json_dumps(obj)
            _encoder, _decoder = fast, orjson.loads
    return _encoder


def loads(data: Union[bytes, str]) -> Any:
    """Parse what eKuiper sends (Go's encoding/json: never NaN, no integer past 64 bits):
    orjson's once :func:`encoder` chose it (~4x cheaper per function call), else json's."""
    return _decoder(data)


def dumps(obj: Any) -> bytes:
    return (_encoder or encoder())(obj)


def source_message(message: Any, meta: Optional[dict]) -> bytes:
    return dumps({"message": message, "meta": meta})


def sink_ack_error(error: str) -> bytes:
    return dumps({"error": str(error)})


_REPLY = json.JSONEncoder(allow_nan=False)   # json.dumps(allow_nan=False) builds one per call


def func_answer(state: bool, result: Any) -> Tuple[bool, bytes]:
    """``{"state", "result"}`` and the state it says; a result JSON cannot encode (NaN and
    Infinity included: Go refuses them) becomes a state-false error naming its type."""
    try:
        return state, _REPLY.encode({"state": state, "result": result}).encode()
    except (TypeError, ValueError) as e:
        return False, json.dumps({"state": False, "result": f"result of type {type(result).__name__} "
                                                             f"cannot be encoded as JSON: {e}"}).encode()


def func_reply(state: bool, result: Any) -> bytes:
    """``{"state", "result"}`` (:func:`func_answer`'s bytes)."""
    return func_answer(state, result)[1]


def func_error(text: str) -> bytes:
    return func_reply(False, " ".join(str(text).split()))
