"""Frames on the private link between the supervisor and one worker: the framing, and the
frames every kind speaks (a kind's own are in ``kinds/<kind>/frames.py``).

The link is an AF_UNIX socketpair made by the supervisor and handed to the worker
at fork time: no path, nothing listening, and a hop costs a fraction of an nng hop
(docs/transport.md). A frame is ``type (1 byte) | length (4 bytes) | payload``.
Each message is a small typed class with ``encode`` (the whole frame) and ``decode`` (its
payload); control payloads are JSON, data payloads binary, never unpickled.
"""
from __future__ import annotations

import errno
import json
import socket
import struct
import threading
from collections import deque
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

from ..transport.outbox import Outbox, Passed, Watch, no_watch
from ..transport.sp import READ_SIZE, recv_view

HEADER = struct.Struct("!BI")
SEQ = struct.Struct("!Q")        # a sequence number or call id, first in a kind's data frames
LEN = struct.Struct("!I")        # a length prefix inside a payload

# supervisor -> worker
START = ord("S")      # protocol.StartSpec: the instance's Control and settings
STATE = ord("T")      # right after START: the instance's state (state.py encoding)
STOP = ord("X")       # close the instance and exit
# supervisor -> shared worker (workers: per_symbol), on its own control link
HOST = ord("O")       # HostSpec, the first frame: serve instances in threads (host.py)
ADOPT = ord("J")      # seq: the instance's worker id; its link's fd travels with SCM_RIGHTS
WHERE = ord("G")      # seq: an instance being killed: where is its thread? (answered with AT)
# worker -> supervisor
READY = ord("R")      # Ready, after configure
BEAT = ord("H")       # Beat: counters and the running work's start
FAULT = ord("F")      # Fault: the worker is about to exit because of it
PUT = ord("U")        # one put_state/delete_state (state.py encoding)
# shared worker -> supervisor, on the control link
ENDED = ord("E")      # Ended: an instance's thread ended (its exit code)
AT = ord("Z")         # seq, then the innermost plugin frame its thread is in (file:line function)
TYPES = frozenset({START, STATE, STOP, READY, BEAT, FAULT, PUT, HOST, ADOPT, WHERE, ENDED, AT})  # a kind's own are others


def encode(ftype: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, len(payload)) + payload


def encode_json(ftype: int, obj: Any) -> bytes:
    return encode(ftype, json.dumps(obj).encode())


def encode_seq(ftype: int, seq: int, body: bytes = b"") -> bytes:
    return encode(ftype, SEQ.pack(seq) + body)


def split_seq(payload: bytes) -> Tuple[int, bytes]:
    return SEQ.unpack_from(payload)[0], payload[SEQ.size:]


def decode_json(payload: bytes) -> Any:
    """A JSON control frame from a worker (raises ValueError on garbage)."""
    return json.loads(payload)


class Ready(NamedTuple):
    """READY: the instance is configured (``error`` None) or cannot be (why, one line)."""

    error: Optional[str]

    def encode(self) -> bytes:
        return encode_json(READY, {"error": self.error})

    @classmethod
    def decode(cls, payload: bytes) -> "Ready":
        error = decode_json(payload)["error"]
        return cls(None if error is None else str(error))


class Beat(NamedTuple):
    """BEAT: what the worker has done, and since when it is busy (0.0: idle)."""

    processed: int
    busy_since: float
    cpu: Optional[float]     # its user + system seconds, compared with psutil's
    emit_errors: int = 0

    def encode(self) -> bytes:
        return encode_json(BEAT, {"n": self.processed, "busy": self.busy_since, "cpu": self.cpu,
                                  "e": self.emit_errors})

    @classmethod
    def decode(cls, payload: bytes) -> "Beat":
        d = decode_json(payload)
        cpu = d.get("cpu")
        return cls(int(d["n"]), float(d["busy"]), None if cpu is None else float(cpu), int(d.get("e", 0)))


class Fault(NamedTuple):
    """FAULT: plugin code raised; the worker exits after this."""

    error: str

    def encode(self) -> bytes:
        return encode_json(FAULT, {"error": self.error})

    @classmethod
    def decode(cls, payload: bytes) -> "Fault":
        return cls(" ".join(str(decode_json(payload)["error"]).split()))


class HostSpec(NamedTuple):
    """HOST: what a shared worker (``workers: per_symbol``) serves, and how it is watched."""

    kind: str
    symbol: str
    heartbeat_interval: float
    dump_path: str

    def encode(self) -> bytes:
        return encode_json(HOST, self._asdict())

    @classmethod
    def decode(cls, payload: bytes) -> "HostSpec":
        d = decode_json(payload)
        return cls(str(d["kind"]), str(d["symbol"]), float(d["heartbeat_interval"]), str(d["dump_path"]))


class Ended(NamedTuple):
    """ENDED: instance ``wid``'s thread in a shared worker ended with ``code``; ``stuck``: it
    could not be made to return and is left behind, ``at`` the plugin code it is stuck in
    (``file:line function``, "" when unknown)."""

    wid: int
    code: int
    stuck: bool
    at: str = ""

    def encode(self) -> bytes:
        return encode_json(ENDED, self._asdict())

    @classmethod
    def decode(cls, payload: bytes) -> "Ended":
        d = decode_json(payload)
        return cls(int(d["wid"]), int(d["code"]), bool(d["stuck"]), str(d["at"]))


class FrameBuffer:
    """Accumulates received bytes and yields whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: Union[bytes, memoryview]) -> List[Tuple[int, bytes]]:
        self._buf += data
        frames = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER.size:
            ftype, n = HEADER.unpack_from(buf, pos)
            end = pos + HEADER.size + n
            if len(buf) < end:
                break
            frames.append((ftype, bytes(buf[pos + HEADER.size:end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames


class Link:
    """The supervisor's end: non-blocking; what the socket does not take at once waits in
    an :class:`Outbox` (``watch`` asks the loop for write readiness meanwhile). Nothing is
    bounded here: what goes to a worker is bounded by the sink window and the one call at a
    time, and a START by its config; a worker that stops reading is killed by the health
    checks, which drops what waited."""

    def __init__(self, sock: socket.socket, watch: Watch = no_watch) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.inbox = FrameBuffer()
        self.outbox = Outbox(sock, watch)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes, fds: Sequence[Passed] = ()) -> None:
        """Send ``frame`` (with ``fds`` by SCM_RIGHTS, on its first byte; the caller may
        close its own int descriptors at once, an owner object is referenced until sent).
        OSError when a descriptor cannot be copied to wait in the queue (never dropped
        silently: the caller's instance is contained)."""
        try:
            self.outbox.write(frame, fds)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise
            # otherwise the worker is gone; its exit report follows

    def flush(self) -> None:
        """Write what the socket takes now; the rest waits for EVENT_WRITE."""
        try:
            self.outbox.flush()
        except OSError:
            pass  # the worker is gone; its exit report follows

    def read(self) -> Optional[List[Tuple[int, bytes]]]:
        """Whole frames received so far; None at EOF."""
        out: List[Tuple[int, bytes]] = []
        while True:
            try:
                data = recv_view(self.sock)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return out or None
            if not data:
                return out or None
            out.extend(self.inbox.feed(data))
            if len(data) < READ_SIZE:  # drained; select is level-triggered and wakes us for more
                return out

    def close(self) -> None:
        self.outbox.clear()   # closes the descriptors that waited
        self.sock.close()


class BlockingLink:
    """The worker's end: blocking reads, thread-safe writes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._frames = FrameBuffer()
        self._pending: deque = deque()
        self.fds: deque = deque()  # descriptors passed with frames (a kind's page, lent connections)
        self._wlock = threading.Lock()

    def send(self, frame: bytes) -> None:
        with self._wlock:
            self.sock.sendall(frame)

    def recv(self) -> Optional[Tuple[int, bytes]]:
        """Next frame, or None when the supervisor is gone."""
        while not self._pending:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 4)
            except ConnectionError:  # the supervisor exited with frames of ours unread
                return None
            self.fds.extend(fds)
            if not data:
                return None
            self._pending.extend(self._frames.feed(data))
        return self._pending.popleft()

    def has_frame(self) -> bool:
        return bool(self._pending)
