"""kuiper_pool's internal messages, typed: the only place both ends agree on them.

* ``StartSpec``: the START frame the supervisor sends a new worker (its instance and the
  settings it needs), encoded as JSON on the worker's link (``frames.py`` frames it);
* the zygote's operations (supervisor -> zygote) and reports (zygote -> supervisor), one
  NamedTuple each, sent as one JSON datagram ``{"op": OP, fields...}`` on the zygote's
  socketpair (a large one in a sealed memfd).

The other frames on a worker's link are typed beside their framing (``frames.py``) and in
each kind's ``frames.py``.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple, Type, Union

from .. import wire
from . import frames

# set (to "<supervisor pid>:<run dir>") in a reload's fresh zygote: zygote.py
FRESH_ENV = "KUIPER_POOL_FRESH_ZYGOTE"
# either way, a message over INLINE bytes travels in a sealed memfd passed with
# {"op": ZYGOTE_LARGE, "size"}: a datagram is as large as the socket's buffer at most, and a
# fresh zygote's HELLO grows with the plugin's symbols (900 functions: over 64 KiB)
ZYGOTE_LARGE = "large"
ZYGOTE_DATAGRAM = 1 << 16   # what a receiver reads per datagram (INLINE fits with room)
INLINE = 1 << 15
MAX_MESSAGE = 16 << 20      # the sane bound: a message over it is refused, naming its size


class StartSpec(NamedTuple):
    """What a worker is told in its START frame."""

    control: wire.Control
    heartbeat_interval: float
    stop_grace: float
    dial_timeout: float
    max_calls: int = 0
    transport: str = "sp"
    dump_path: str = ""        # where the worker writes its stack when asked (forensics)
    page: bool = False         # a shared page's fd travels with the frame: a lent function's
                               # call page, a sink's collect mark (and item page)
    source_datasource: str = "stream"  # what a source's configure gets (config.py)

    def frame(self) -> bytes:
        return frames.encode_json(frames.START, {
            "control": self.control.to_dict(), "heartbeat_interval": self.heartbeat_interval,
            "stop_grace": self.stop_grace, "dial_timeout": self.dial_timeout,
            "max_calls": self.max_calls, "transport": self.transport,
            "dump_path": self.dump_path, "page": self.page,
            "source_datasource": self.source_datasource})

    @classmethod
    def decode(cls, payload: bytes) -> "StartSpec":
        d: Any = frames.decode_json(payload)
        return cls(wire.Control.from_dict(d["control"]), float(d["heartbeat_interval"]),
                   float(d["stop_grace"]), float(d["dial_timeout"]), int(d["max_calls"]),
                   str(d["transport"]), str(d["dump_path"]), bool(d["page"]),
                   str(d["source_datasource"]))


# The zygote's ops and reports are NamedTuples, not dataclasses: the supervisor and the
# zygote import this module on the way to a plugin's first item, and a frozen dataclass
# costs ~1 ms to define (eleven of them were the slowest import of the start-up).
# ``OP`` names each on the wire (a class attribute, not a field).

# supervisor -> zygote
class StartWorker(NamedTuple):
    """Fork (or exec) a worker of ``symbol`` on the link passed with this op."""

    OP = "start"
    wid: int
    symbol: str = ""


class Kill(NamedTuple):
    """Signal worker ``wid`` unless it has exited."""

    OP = "kill"
    wid: int
    sig: int


class Own(NamedTuple):
    """An ipc file of the supervisor's, removed if the supervisor dies while it is still
    this very file (``ident``: paths.identity)."""

    OP = "own"
    path: str
    ident: List[int]


class Disown(NamedTuple):
    OP = "disown"
    path: str


class Adopt(NamedTuple):
    """A reload: the fresh zygote becomes the one that cleans up after the supervisor."""

    OP = "adopt"
    rundir: str
    paths: Dict[str, List[int]]


class Retire(NamedTuple):
    """A reload: the old zygote cleans up nothing any more."""

    OP = "retire"


# zygote -> supervisor
class Started(NamedTuple):
    OP = "started"
    wid: int
    pid: int


class Exited(NamedTuple):
    OP = "exited"
    wid: int
    pid: int
    status: int   # its wait status


class Refused(NamedTuple):
    """The fork failed (at the process limit, no memory)."""

    OP = "refused"
    wid: int
    errno: int
    error: str


class Hello(NamedTuple):
    """A reload's fresh zygote's first report: what the new code serves (reload.py). Every
    field has a default: the version is checked first, whatever else a zygote of another
    kuiper_pool sends. The defaults are shared objects: nothing changes a Hello once made."""

    OP = "hello"
    version: str = ""
    name: str = ""
    sources: List[str] = []
    sinks: List[str] = []
    functions: List[str] = []
    settings: Dict[str, Any] = {}
    checks: Dict[str, Any] = {}   # describe.inspect_symbols, or {"error"}


class Error(NamedTuple):
    """A fresh zygote's first report when it cannot serve the new code."""

    OP = "error"
    error: str


ZygoteMessage = Union[StartWorker, Kill, Own, Disown, Adopt, Retire, Started, Exited, Refused, Hello, Error]
MESSAGES: Dict[str, Type[ZygoteMessage]] = {cls.OP: cls for cls in (  # type: ignore[misc]
    StartWorker, Kill, Own, Disown, Adopt, Retire, Started, Exited, Refused, Hello, Error)}


def to_dict(msg: ZygoteMessage) -> Dict[str, Any]:
    """``{"op": OP, fields...}``, the fields as they are (no deep copies: the zygote reports
    each fork, and every page its loop writes is one more private page of each worker forked
    before)."""
    out: Dict[str, Any] = {"op": msg.OP}
    out.update(zip(msg._fields, msg))
    return out


def message(obj: Dict[str, Any]) -> ZygoteMessage:
    """The typed message a decoded datagram stands for (ValueError naming the cause). Fields
    this version does not know are left out (a fresh zygote of another version says hello)."""
    cls = MESSAGES.get(obj.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown zygote message {obj.get('op')!r}")
    try:
        return cls(**{k: v for k, v in obj.items() if k in cls._fields})
    except TypeError as e:
        raise ValueError(f"zygote message {cls.OP!r}: {e}") from None


def encode_zygote(msg: ZygoteMessage) -> Tuple[bytes, List[int]]:
    """One zygote op or report as a datagram and the descriptors to pass with it (a big
    message's sealed memfd: the caller closes it once sent). OSError if no memfd can be had."""
    data = json.dumps(to_dict(msg)).encode()
    if len(data) <= INLINE:
        return data, []
    fd = os.memfd_create("kuiper_pool-zygote-msg", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return json.dumps({"op": ZYGOTE_LARGE, "size": len(data)}).encode(), [fd]


def recv_zygote(sock: socket.socket, max_fds: int = 4) -> Tuple[bytes, List[int]]:
    """One datagram and its descriptors, as :func:`decode_zygote` takes them (b"": the peer
    is gone); raises as ``recvmsg`` does, ValueError for a datagram cut short."""
    msg, fds, flags, _addr = socket.recv_fds(sock, ZYGOTE_DATAGRAM, max_fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"a message of over {ZYGOTE_DATAGRAM} bytes arrived cut short")
    return msg, fds


def decode_zygote(msg: bytes, fds: Sequence[int]) -> Tuple[ZygoteMessage, List[int]]:
    """The message a datagram stands for, and the descriptors left for it (a big message's
    memfd is read and closed here). ValueError naming the cause when it cannot be read."""
    try:
        obj = json.loads(msg)
        if not isinstance(obj, dict):
            raise ValueError(f"not a JSON object: {msg[:80]!r}")
        if obj.get("op") != ZYGOTE_LARGE:
            return message(obj), list(fds)
        if not fds:
            raise ValueError("a large message came without its memfd")
        fd, size = fds[-1], int(obj.get("size", -1))
        if size > MAX_MESSAGE or os.fstat(fd).st_size != size:
            raise ValueError(f"a message of {os.fstat(fd).st_size} bytes (announced {size}) is over "
                             f"the bound of {MAX_MESSAGE} bytes or not whole")
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise ValueError(f"read {len(data)} of {size} bytes of a large message")
        big = json.loads(data)
        if not isinstance(big, dict):
            raise ValueError("a large message is not a JSON object")
        os.close(fd)
        return message(big), list(fds[:-1])
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
