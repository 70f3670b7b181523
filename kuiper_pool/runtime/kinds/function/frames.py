"""A function's frames on the worker's link (``runtime/frames.py`` frames them;
docs/protocol.md, "Link frames"): relayed calls and their replies, and the lend of
eKuiper's connection (or, under ``kuiper-pool serve``, a client's) and its return."""
from __future__ import annotations

import json
from typing import Any, Dict, NamedTuple, Optional, Tuple

from ...frames import LEN, SEQ, encode

# supervisor -> worker
CALL = ord("C")       # Call: call id, then eKuiper's request bytes
CONN = ord("N")       # Conn: eKuiper's connection lent to the worker (its fd with SCM_RIGHTS)
RECALL = ord("W")     # serve: give the lent client connection back (a call waits for this worker)
# worker -> supervisor
REPLY = ord("P")      # Reply: call id, whether it failed, then the reply bytes
LOST = ord("L")       # the lent connection given back: eKuiper closed it, or serve's next request
                      # is not this worker's, or RECALL (no payload)
TYPES = frozenset({CALL, CONN, RECALL, REPLY, LOST})

# A function worker that owns eKuiper's connection counts its own calls: after max_calls it
# exits with this code and the supervisor starts a fresh one (a recycle, not a crash).
EXIT_RECYCLED = 5

Owed = Tuple[int, str]   # (crc of the call a dead worker had begun, the error it gets)


def lost() -> bytes:
    return encode(LOST)


def recall() -> bytes:
    return encode(RECALL)


class Call(NamedTuple):
    call_id: int
    request: bytes

    def encode(self) -> bytes:
        return encode(CALL, SEQ.pack(self.call_id) + self.request)

    @classmethod
    def decode(cls, payload: bytes) -> "Call":
        return cls(SEQ.unpack_from(payload)[0], payload[SEQ.size:])


class Reply(NamedTuple):
    """REPLY: eKuiper's answer to a relayed call, and whether it tells of a failure (the
    worker knows: it made it; nobody parses the bytes to learn it)."""

    call_id: int
    data: bytes
    ok: bool

    def encode(self) -> bytes:
        return encode(REPLY, SEQ.pack(self.call_id) + (b"\x01" if self.ok else b"\x00") + self.data)

    @classmethod
    def decode(cls, payload: bytes) -> "Reply":
        return cls(SEQ.unpack_from(payload)[0], payload[SEQ.size + 1:], payload[SEQ.size] == 1)


class Conn(NamedTuple):
    """CONN: our outstanding request id, what is owed, bytes already read from the
    connection, and a call that waited (the connection's fd travels with SCM_RIGHTS); or,
    under ``kuiper-pool serve``, ``rest``: the lent connection is a client's HTTP one, served
    as ``transport.rest.RestConnection(sock, **rest)``."""

    request_id: int
    owed: Optional[Owed]
    buffered: bytes = b""
    call: Optional[bytes] = None
    rest: Optional[Dict[str, Any]] = None

    def encode(self) -> bytes:
        crc, error = self.owed or (0, "")
        fields = {"request_id": self.request_id, "owed_crc": crc, "owed_error": error,
                  "buffered": len(self.buffered), "call": self.call is not None}
        if self.rest is not None:
            fields["rest"] = self.rest
        head = json.dumps(fields).encode()
        return encode(CONN, LEN.pack(len(head)) + head + self.buffered + (self.call or b""))

    @classmethod
    def decode(cls, payload: bytes) -> "Conn":
        (n,) = LEN.unpack_from(payload)
        head = json.loads(payload[LEN.size:LEN.size + n])
        rest = payload[LEN.size + n:]
        buffered, call = rest[:head["buffered"]], rest[head["buffered"]:]
        owed = (int(head["owed_crc"]), str(head["owed_error"])) if head["owed_error"] else None
        return cls(int(head["request_id"]), owed, buffered, call if head["call"] else None, head.get("rest"))
