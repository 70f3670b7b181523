"""An independent client that calls a REST external service the way eKuiper's
``httpExecutor`` does for a schema-based function (docs/serve.md, "What eKuiper sends"),
written from eKuiper's executor and converter code, not from kuiper_pool's server:

* the service JSON gives the address; the ``.proto`` the rpc, its input message's fields
  (name, type, number) and its output type;
* SQL arguments are cast to the fields in order (``EncodeField`` with CONVERT_SAMEKIND: a
  string field takes only strings, a double any number, an int64 an integer, a bool a bool;
  one argument that is a map is unfolded by field name instead);
* the message is marshalled as protobuf JSON (lowerCamelCase names, zero values left out,
  int64 as a string, bytes as base64) and POSTed to ``<address>/<rpc>`` with a 5 s timeout
  on one kept-alive connection per caller;
* a 2xx ``text/plain`` answer is cast into the wrapper type's value (CONVERT_ALL); any other
  status is eKuiper's error "http executor fails to err http return code: ...".
"""
from __future__ import annotations

import base64
import http.client
import json
import re
import urllib.parse
from typing import Any, Dict, List, Tuple

TIMEOUT = 5.0   # eKuiper's interfaceOpt timeout (ms 5000)


class EKuiperError(Exception):
    """What the rule would see as the function's error."""


def _camel(name: str) -> str:
    parts = name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


class Schema:
    """The parts of a proto3 file eKuiper's parser gives the executor."""

    def __init__(self, text: str) -> None:
        self.rpcs: Dict[str, Tuple[str, str]] = {
            m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"rpc\s+(\w+)\s*\(\s*([\w.]+)\s*\)\s*returns\s*\(\s*([\w.]+)\s*\)", text)}
        self.messages: Dict[str, List[Tuple[str, str, int]]] = {}
        for m in re.finditer(r"message\s+(\w+)\s*\{([^}]*)\}", text):
            fields = [(f.group(2), f.group(1), int(f.group(3)))
                      for f in re.finditer(r"(\w+)\s+(\w+)\s*=\s*(\d+)\s*;", m.group(2))]
            self.messages[m.group(1)] = sorted(fields, key=lambda f: f[2])


def _encode_field(ftype: str, v: Any, name: str) -> Any:
    ok = {"string": isinstance(v, str),
          "double": isinstance(v, (int, float)) and not isinstance(v, bool),
          "int64": isinstance(v, int) and not isinstance(v, bool),
          "bool": isinstance(v, bool),
          "bytes": isinstance(v, (bytes, str))}[ftype]
    if not ok:
        raise EKuiperError(f"invalid type for {ftype} type field '{name}': {v!r}")
    return v


def _json_value(ftype: str, v: Any) -> Any:
    if ftype == "int64":
        return str(v)
    if ftype == "bytes":
        return base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()
    return v


class Client:
    """One caller (a rule's function operator): one kept-alive connection."""

    def __init__(self, service_json: str, proto: str) -> None:
        with open(service_json) as f:
            service = json.load(f)
        (self.interface, info), = service["interfaces"].items()
        assert info["protocol"] == "rest" and info["schemaType"] == "protobuf"
        self.names = {f["name"]: f["serviceName"] for f in info.get("functions", [])}
        url = urllib.parse.urlsplit(info["address"])
        self.host, self.port = url.hostname, url.port
        with open(proto) as f:
            self.schema = Schema(f.read())
        self.conn: Any = None

    def body(self, rpc: str, params: List[Any]) -> bytes:
        in_type, _out = self.schema.rpcs[rpc]
        fields = self.schema.messages[in_type]
        values: List[Any] = [None] * len(fields)
        if len(params) == 1 and isinstance(params[0], dict):   # unfoldMap
            for i, (name, ftype, _n) in enumerate(fields):
                if name in params[0]:
                    values[i] = _encode_field(ftype, params[0][name], name)
        elif len(params) == len(fields):
            values = [_encode_field(ftype, p, name) for (name, ftype, _n), p in zip(fields, params)]
        else:
            raise EKuiperError(f"require {len(fields)} parameters but only got {len(params)}")
        obj = {_camel(name): _json_value(ftype, v) for (name, ftype, _n), v in zip(fields, values)
               if v is not None and v not in ("", 0, False, b"")}   # proto3 JSON omits zero values
        return json.dumps(obj, separators=(",", ":")).encode()

    def call(self, function: str, *params: Any) -> Any:
        rpc = self.names.get(function, function)
        body = self.body(rpc, list(params))
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            self.conn.request("POST", "/" + rpc, body, {"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise EKuiperError(f"Post \"http://{self.host}:{self.port}/{rpc}\": {type(e).__name__}: {e}") from None
        if not 200 <= resp.status <= 299:
            raise EKuiperError(f"http executor fails to err http return code: {resp.status} "
                               f"and error message {data.decode()}")
        ctype = resp.getheader("Content-Type", "")
        out = self.schema.rpcs[rpc][1]
        if ctype.startswith("text/plain"):
            text = data.decode()
            return {"google.protobuf.StringValue": lambda t: t, "google.protobuf.DoubleValue": float,
                    "google.protobuf.Int64Value": int,
                    "google.protobuf.BoolValue": lambda t: {"true": True, "false": False}[t]}[out](text)
        if ctype.startswith("application/json"):
            return json.loads(data)
        raise EKuiperError(f"unsupported resposne content type {ctype}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
