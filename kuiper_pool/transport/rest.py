"""eKuiper's REST executor, one call at a time (docs/serve.md, "What eKuiper sends"): the
HTTP/1.1 request it sends, the protobuf JSON body of a schema-based call, the ``text/plain``
answer it reads; and a function worker's end of a connection ``kuiper-pool serve`` lends it
(:class:`RestConnection`). Nothing here imports the runtime.
"""
from __future__ import annotations

import json
import math
import socket
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from .. import wire
from . import TransportError

MAX_HEAD = 64 << 10    # bytes of a request line and headers
MAX_BODY = 64 << 20    # bytes of one call's body (an image as base64 fits)
LENT_MAX = 64 << 10    # a request a lent connection's worker takes: larger ones go back to the supervisor
CONTENT_TEXT = "text/plain; charset=utf-8"
REASONS = {200: "OK", 100: "Continue", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable"}
# the function meta a worker's Exec needs; REST calls carry no rule, so all share one context
META = json.dumps({"ruleId": "serve", "opId": "rest", "instanceId": 0, "funcId": 0})
_ZERO: Dict[str, Any] = {"string": "", "double": 0.0, "int64": 0, "bool": False, "bytes": ""}


class HttpError(Exception):
    """A request that cannot be served: its status and one line."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class Request(NamedTuple):
    """The head of one request: the body is ``buf[head_end:total]`` once ``len(buf) >= total``."""

    method: str
    path: str
    keep: bool         # keep-alive (HTTP/1.1 without Connection: close)
    expect: bool       # Expect: 100-continue
    head_end: int
    total: int


def parse_head(buf: Union[bytes, bytearray]) -> Optional[Request]:
    """The first request's head in ``buf``; None while it is not whole. HttpError for one
    that is not what eKuiper's executor sends (only ``Content-Length`` bodies)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise HttpError(431, f"request head over {MAX_HEAD} bytes")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"not an HTTP/1.x request line: {lines[0][:100]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "send the body with Content-Length (no Transfer-Encoding)")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "Content-Length is not a number") from None
    if not 0 <= length <= MAX_BODY:
        raise HttpError(413, f"a body of {length} bytes is over {MAX_BODY}")
    keep = parts[2] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return Request(parts[0], parts[1], keep, headers.get("expect", "").lower() == "100-continue",
                   end + 4, end + 4 + length)


def response(status: int, body: bytes, close: bool = False) -> bytes:
    """One whole ``text/plain`` answer."""
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {CONTENT_TEXT}\r\n"
            f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}"
            f"\r\n").encode() + body


def lendable(req: Request, path: str) -> bool:
    """Whether a worker of the function at ``path`` serves ``req`` on a lent connection (the
    supervisor answers the rest, and sends 100 Continue where a client waits for it)."""
    return (req.method == "POST" and req.path == path and req.keep and not req.expect
            and req.total <= LENT_MAX)


class CallError(ValueError):
    """A request that is not what eKuiper sends for this function; the text is one line."""


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


class GiveBack(TransportError):
    """The request waiting on a lent connection is not one the worker serves (another
    function, a probe, a body eKuiper would not send, a close, a request cut short): the
    supervisor answers it."""


class RestConnection:
    """A function worker's end of an HTTP connection ``kuiper-pool serve`` lent it: it serves
    whole keep-alive POSTs to its own function, with the interface of ``sp.ReqConnection``
    (``recv_ready`` gives portable Exec requests, ``send`` takes the worker's reply).

    A request stays in the socket while it runs and is taken off only when its answer is
    written: a worker that dies meanwhile leaves it for the supervisor, which answers it with
    the error (docs/serve.md, "How a call is served")."""

    def __init__(self, sock: socket.socket, path: str, args: Sequence[str], result: str) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.path, self.args, self.result = path, list(args), result
        self.taken = 0   # bytes of the request being served
        self.seen = 0    # bytes of a request not yet whole, when we last looked

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_ready(self) -> List[bytes]:
        """The waiting request as an Exec request (call when readable; [] while it is not
        whole); GiveBack when it is not ours to serve, TransportError at EOF."""
        data = self.sock.recv(LENT_MAX, socket.MSG_PEEK)
        if not data:
            raise TransportError("the client closed the connection")
        try:
            req = parse_head(data)
        except HttpError as e:
            raise GiveBack(str(e)) from None
        if req is not None and not lendable(req, self.path):
            raise GiveBack("not a keep-alive call of this function that fits")
        if req is None or len(data) < req.total:   # sent in parts (Python's http.client, big bodies)
            if len(data) == self.seen:   # readable with nothing new: the client closed mid-request
                raise GiveBack("a request cut short")
            self.seen = len(data)
            # poll wakes us once the rest is in: the head needs at least one byte more
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1 if req is None else req.total)
            return []
        if self.seen:
            self.seen = 0
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        try:
            call = exec_request(decode_args(data[req.head_end:req.total], self.args))
        except CallError as e:
            raise GiveBack(str(e)) from None
        self.taken = req.total
        return [call]

    def send(self, reply: bytes) -> None:
        """Take the request off the socket, then write its answer."""
        left, self.taken = self.taken, 0
        while left > 0:
            got = len(self.sock.recv(min(left, 1 << 16)))
            if not got:
                raise TransportError("the client closed the connection")
            left -= got
        self.sock.sendall(response(*encode_result(reply, self.result)))

    def close(self) -> None:
        self.sock.close()
