"""The eKuiper portable-plugin wire protocol, plugin side (see PROTOCOL.md).

Everything that knows a socket path, a command's shape or an answer's bytes
lives here, so the rest of the package speaks in parsed values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

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


@dataclass(frozen=True)
class Control:
    """One start/stop command's argument (eKuiper's ``Control``)."""

    cmd: str
    symbol: str
    plugin_type: str
    rule_id: str = ""
    op_id: str = ""
    instance_id: int = 0
    data_source: str = ""
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity of the instance: one function worker per symbol, else per (rule, op, instance)."""
        if self.plugin_type == TYPE_FUNC:
            return f"func:{self.symbol}"
        return f"{self.plugin_type}:{self.symbol}:{self.rule_id}:{self.op_id}:{self.instance_id}"

    def describe(self) -> str:
        """How logs and errors name the instance."""
        if self.plugin_type == TYPE_FUNC:
            return f"function {self.symbol}"
        return (f"{self.plugin_type} {self.symbol} rule {self.rule_id} "
                f"op {self.op_id} instance {self.instance_id}")

    def datasource(self) -> str:
        """eKuiper 2.x sends the stream's DATASOURCE inside config; older hosts at top level."""
        if self.data_source:
            return self.data_source
        value = self.config.get("datasource", "")
        return value if isinstance(value, str) else ""

    def to_dict(self) -> Dict[str, Any]:
        return {"cmd": self.cmd, "symbol": self.symbol, "plugin_type": self.plugin_type,
                "rule_id": self.rule_id, "op_id": self.op_id, "instance_id": self.instance_id,
                "data_source": self.data_source, "config": self.config}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Control":
        return cls(**d)


def parse_command(raw: bytes) -> Control:
    """Decode ``{"cmd", "arg": "<Control JSON>"}``; raise ProtocolError with a one-line reason."""
    try:
        cmd = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"command is not JSON: {e}") from None
    if not isinstance(cmd, dict):
        raise ProtocolError("command is not a JSON object")
    name = cmd.get("cmd")
    if name not in (CMD_START, CMD_STOP):
        raise ProtocolError(f"unknown command {name!r}")
    arg = cmd.get("arg")
    try:
        ctrl = json.loads(arg) if isinstance(arg, (str, bytes)) else None
    except ValueError as e:
        raise ProtocolError(f"command arg is not JSON: {e}") from None
    if not isinstance(ctrl, dict):
        raise ProtocolError("command arg is not a JSON object")
    symbol = ctrl.get("symbolName")
    if not isinstance(symbol, str) or not symbol:
        raise ProtocolError("command has no symbolName")
    ptype = ctrl.get("pluginType")
    if ptype not in PLUGIN_TYPES:
        raise ProtocolError(f"unknown plugin type {ptype!r} for symbol {symbol}")
    meta = ctrl.get("meta")
    rule_id = op_id = ""
    instance_id = 0
    if ptype != TYPE_FUNC:
        if not isinstance(meta, dict):
            raise ProtocolError(f"{ptype} {symbol}: command has no meta")
        rule_id, op_id, instance_id = meta.get("ruleId"), meta.get("opId"), meta.get("instanceId", 0)
        if not isinstance(rule_id, str) or not rule_id or not isinstance(op_id, str) or not op_id:
            raise ProtocolError(f"{ptype} {symbol}: meta needs ruleId and opId")
        if not isinstance(instance_id, int) or isinstance(instance_id, bool):
            raise ProtocolError(f"{ptype} {symbol}: meta instanceId must be an integer")
    config = ctrl.get("config") or {}
    if not isinstance(config, dict):
        raise ProtocolError(f"{ptype} {symbol}: config must be a JSON object")
    data_source = ctrl.get("dataSource") or ""
    return Control(name, symbol, ptype, rule_id, op_id, instance_id,
                   data_source if isinstance(data_source, str) else "", config)


def one_line(text: str, limit: int = 2000) -> bytes:
    """An error answer: one line (eKuiper shows it to the user as is)."""
    flat = " ".join(str(text).split())
    return (flat[:limit] or "error").encode()


def require_ack(config: Dict[str, Any]) -> bool:
    """eKuiper casts the sink's props to ``{requireAck bool}``."""
    value = config.get("requireAck", False)
    if isinstance(value, str):
        return value.lower() == "true"
    return bool(value)


# --- data encodings -------------------------------------------------------------

def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


try:  # orjson is an optional extra: ~10x cheaper encoding on the hot path
    import orjson as _orjson

    def dumps(obj: Any) -> bytes:
        try:
            return _orjson.dumps(obj, option=_orjson.OPT_NON_STR_KEYS)
        except TypeError:  # what orjson refuses, json may take (as the official SDK does)
            return _json_dumps(obj)
except ImportError:  # pragma: no cover - depends on the environment
    dumps = _json_dumps


def source_message(message: Any, meta: Optional[dict]) -> bytes:
    return dumps({"message": message, "meta": meta})


def source_error(error: str) -> bytes:
    return dumps({"error": str(error)})


def sink_ack_error(error: str) -> bytes:
    return dumps({"error": str(error)})


def func_reply(state: bool, result: Any) -> bytes:
    """``{"state", "result"}``; a result JSON cannot encode becomes a state-false error naming its type."""
    try:
        return json.dumps({"state": state, "result": result}).encode()
    except (TypeError, ValueError) as e:
        return json.dumps({"state": False, "result": f"result of type {type(result).__name__} "
                                                      f"cannot be encoded as JSON: {e}"}).encode()


def func_error(text: str) -> bytes:
    return func_reply(False, " ".join(str(text).split()))
