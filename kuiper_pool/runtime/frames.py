"""Frames on the private link between the supervisor and one worker.

The link is an AF_UNIX socketpair made by the supervisor and handed to the worker
at fork time: no path, nothing listening, and a hop costs a fraction of an nng hop
(docs/transport.md). A frame is ``type (1 byte) | length (4 bytes) | payload``.
Control payloads are JSON; data payloads are binary and never unpickled.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections import deque
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..transport.outbox import Outbox, Passed, Watch, no_watch
from ..transport.sp import READ_SIZE, Spilled, recv_view

HEADER = struct.Struct("!BI")
SPILL = 1 << 18   # sink items of this many bytes or more reach the worker as a memfd (ITEM_FD)
SEQ = struct.Struct("!Q")
ITEM_LEN = struct.Struct("!I")

# supervisor -> worker
START = ord("S")      # JSON: the instance's Control and settings
ITEMS = ord("D")      # sink items: first seq, then length-prefixed items
ITEM_FD = ord("B")    # one big sink item: seq, then its size; its bytes in a sealed memfd (SCM_RIGHTS)
CALL = ord("C")       # function request: call id, then eKuiper's request bytes
STOP = ord("X")       # close the instance and exit
CONN = ord("N")       # eKuiper's connections lent to the worker (fds with SCM_RIGHTS): a function's
                      # (encode_conn) or an acked sink's data and ack connections (no payload)
STATE = ord("T")      # right after START: the instance's state (state.py encoding)
RECALL = ord("W")     # serve: give the lent connection back (a call waits for this worker)
# worker -> supervisor
READY = ord("R")      # JSON: {"error": null | "text"} after configure
DONE = ord("A")       # sink: every item up to this seq is finished
ACK = ord("K")        # sink: seq, then the ack bytes from ctx.ack_ok/ack_error
REPLY = ord("P")      # function: call id, then the reply bytes
BEAT = ord("H")       # JSON heartbeat: counters and the running call's start
FAULT = ord("F")      # JSON: {"error": text} the worker is about to exit because of it
LOST = ord("L")       # a lent connection given back (eKuiper closed it, or the sink's reason)
ACK_REST = ord("Q")   # acked sink: the unsent end of an ack eKuiper did not read in time
PUT = ord("U")        # one put_state/delete_state (state.py encoding)


# A worker lent an acked sink's connections waits this long for eKuiper to take an ack,
# then passes what is left to the supervisor (ACK_REST), whose outbox never waits.
ACK_WAIT = 1.0

# A function worker that owns eKuiper's connection counts its own calls: after max_calls it
# exits with this code and the supervisor starts a fresh one (a recycle, not a crash).
EXIT_RECYCLED = 5


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


def encode_conn(handoff: Any) -> bytes:
    """CONN: our outstanding request id, the owed call's crc and error, bytes already read
    from the connection, and a call that waited (its fd travels with SCM_RIGHTS)."""
    crc, error = handoff.owed or (0, "")
    head = json.dumps({"request_id": handoff.request_id, "owed_crc": crc, "owed_error": error,
                       "buffered": len(handoff.buffered), "call": handoff.call is not None}).encode()
    return encode(CONN, ITEM_LEN.pack(len(head)) + head + handoff.buffered + (handoff.call or b""))


def decode_conn(payload: bytes) -> Tuple[Dict[str, Any], bytes, Optional[bytes]]:
    """The CONN header, the buffered bytes and the waiting call (None if there is none)."""
    (n,) = ITEM_LEN.unpack_from(payload)
    head = json.loads(payload[ITEM_LEN.size:ITEM_LEN.size + n])
    rest = payload[ITEM_LEN.size + n:]
    buffered, call = rest[:head["buffered"]], rest[head["buffered"]:]
    return head, buffered, call if head["call"] else None


def encode_items(first_seq: int, items: List[bytes]) -> bytes:
    parts = [SEQ.pack(first_seq)]
    for item in items:
        parts.append(ITEM_LEN.pack(len(item)))
        parts.append(item)
    return encode(ITEMS, b"".join(parts))


def item_frames(items: Sequence[Tuple[int, Union[bytes, Spilled]]]
                ) -> Iterator[Tuple[bytes, Sequence[Passed]]]:
    """The frames (and descriptors to pass with each) that hand ``items`` to a sink worker,
    in order: runs of small items in one ITEMS frame each, every spilled one in an ITEM_FD
    frame with its memfd, passed as the item itself (the supervisor keeps its own reference
    for redelivery, and a frame waiting in the link's outbox holds no duplicate of it)."""
    run: List[bytes] = []
    first = 0
    for seq, data in items:
        if isinstance(data, Spilled):
            if run:
                yield encode_items(first, run), ()
                run = []
            yield encode(ITEM_FD, SEQ.pack(seq) + ITEM_LEN.pack(len(data))), (data,)   # no copy of its fd
            continue
        if not run:
            first = seq
        run.append(data)
    if run:
        yield encode_items(first, run), ()


def read_item_fd(payload: bytes, fd: int) -> List[Tuple[int, bytes]]:
    """The item of an ITEM_FD frame, read out of its memfd in one copy; closes ``fd``."""
    try:
        seq, (size,) = SEQ.unpack_from(payload)[0], ITEM_LEN.unpack_from(payload, SEQ.size)
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise ValueError(f"sink item memfd holds {len(data)} of {size} bytes")
    finally:
        os.close(fd)
    return [(seq, data)]


def decode_items(payload: bytes) -> Iterator[Tuple[int, bytes]]:
    seq = SEQ.unpack_from(payload)[0]
    pos = SEQ.size
    view = memoryview(payload)
    while pos < len(payload):
        (n,) = ITEM_LEN.unpack_from(payload, pos)
        pos += ITEM_LEN.size
        yield seq, bytes(view[pos:pos + n])
        pos += n
        seq += 1


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
        self.fds: deque = deque()  # descriptors passed with START (call page) and CONN frames
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
