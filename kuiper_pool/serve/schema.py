"""What eKuiper's REST executor sends and reads for a served function (docs/serve.md), and
the service JSON and ``.proto`` that make eKuiper send it.

eKuiper converts a schema-based call's SQL arguments to the fields of the rpc's input
message in order (each cast to the field's type), posts the message as protobuf JSON
(lowerCamelCase keys, zero values left out, int64 as strings, bytes as base64) to
``/<rpc name>``, and reads a ``text/plain`` answer into the output wrapper type's value.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .. import wire

CONTENT_TEXT = "text/plain; charset=utf-8"
# the function meta a worker's Exec needs; REST calls carry no rule, so all share one context
META = json.dumps({"ruleId": "serve", "opId": "rest", "instanceId": 0, "funcId": 0})
WRAPPERS = {"string": "StringValue", "double": "DoubleValue", "int64": "Int64Value",
            "bool": "BoolValue"}
_ZERO: Dict[str, Any] = {"string": "", "double": 0.0, "int64": 0, "bool": False, "bytes": ""}


class CallError(ValueError):
    """A request that is not what eKuiper sends for this function; the text is one line."""


def arg_types(serve_args: str) -> List[str]:
    """The ``serve_args`` setting as a list (config.py checked every name)."""
    return [t for t in serve_args.split(",") if t]


def field(i: int) -> str:
    """The input message's field for argument ``i``: its protobuf JSON name is the same."""
    return f"arg{i}"


def decode_args(body: bytes, types: Sequence[str]) -> List[Any]:
    """The function's arguments from eKuiper's JSON body (a missing field is a zero value)."""
    try:
        obj = wire.loads(body) if body.strip() else {}
    except ValueError as e:
        raise CallError(f"the body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CallError(f"the body must be a JSON object, got {type(obj).__name__}")
    args = []
    for i, t in enumerate(types):
        v = obj.get(field(i), _ZERO[t])
        try:
            args.append(_decode(v, t))
        except (TypeError, ValueError):
            raise CallError(f"{field(i)} must be protobuf JSON of a {t}, got {v!r}"[:300]) from None
    return args


def _decode(v: Any, t: str) -> Any:
    if t == "int64":  # protobuf JSON writes 64-bit integers as strings
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise TypeError
        return int(v)
    if t == "double":  # and NaN/Infinity as strings
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError
        return float(v)
    if t == "bool":
        if not isinstance(v, bool):
            raise TypeError
        return v
    if not isinstance(v, str):  # string; bytes stay base64 text, as eKuiper's portable calls send them
        raise TypeError
    return v


def exec_request(args: Sequence[Any]) -> bytes:
    """The portable Exec request a worker answers (docs/protocol.md, "Functions")."""
    return wire.dumps({"func": "Exec", "arg": [*args, META]})


def encode_result(reply: bytes, result_type: str) -> Tuple[int, bytes]:
    """The HTTP status and text/plain body for a worker's ``{"state", "result"}`` reply:
    200 and the value as eKuiper parses it into the wrapper type, or 500 and one line."""
    try:
        answer = wire.loads(reply)
        ok, result = bool(answer["state"]), answer["result"]
    except (ValueError, KeyError, TypeError) as e:
        return 500, wire.one_line(f"unreadable reply from the worker: {e}")
    if not ok:
        return 500, wire.one_line(str(result))
    try:
        return 200, _encode(result, result_type).encode()
    except (TypeError, ValueError):
        return 500, wire.one_line(f"the result {result!r:.100} is not a {result_type} "
                                  f"(serve_result {result_type})")


def _encode(v: Any, t: str) -> str:
    if t == "string":
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
    if t == "bool":
        if not isinstance(v, bool):
            raise TypeError
        return "true" if v else "false"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError
    if t == "int64":
        if isinstance(v, float) and not v.is_integer():
            raise ValueError
        return str(int(v))
    if not math.isfinite(v):
        raise ValueError
    return repr(float(v))


def proto_package(plugin: str) -> str:
    """A protobuf package name made from the plugin's name."""
    return "kuiper_pool." + (re.sub(r"\W", "_", plugin) or "plugin")


def proto_text(plugin: str, functions: Mapping[str, Tuple[Sequence[str], str]]) -> str:
    """The schema eKuiper loads: one rpc per function (named as the SQL function), its
    arguments as fields ``arg0..`` of a message of its own, its result a wrapper type."""
    lines = ['syntax = "proto3";', "", f"package {proto_package(plugin)};", "",
             'import "google/protobuf/wrappers.proto";', "",
             f"// generated by kuiper-pool serve --emit-service for plugin {plugin}",
             "service Functions {"]
    for name, (_args, result) in sorted(functions.items()):
        lines.append(f"  rpc {name}({_message(name)}) returns (google.protobuf.{WRAPPERS[result]}) {{}}")
    lines.append("}")
    for name, (args, _result) in sorted(functions.items()):
        lines += ["", f"message {_message(name)} {{"]
        lines += [f"  {t} {field(i)} = {i + 1};" for i, t in enumerate(args)]
        lines.append("}")
    return "\n".join(lines) + "\n"


def _message(function: str) -> str:
    return f"{function}_args"


def service_json(plugin: str, address: str, schema_file: str, functions: Sequence[str]) -> str:
    """The service description eKuiper registers (etc/services/<plugin>.json or its REST API)."""
    return json.dumps({
        "about": {"author": {"name": "kuiper-pool"},
                  "description": {"en_US": f"functions of plugin {plugin} served by kuiper-pool serve"}},
        "interfaces": {plugin: {"address": address, "protocol": "rest", "schemaType": "protobuf",
                                "schemaFile": schema_file,
                                "functions": [{"name": f, "serviceName": f} for f in sorted(functions)]}},
    }, indent=2) + "\n"
