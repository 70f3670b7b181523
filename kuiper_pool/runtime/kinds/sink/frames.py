"""A sink's frames on the worker's link (``runtime/frames.py`` frames them; docs/protocol.md,
"Link frames"): items relayed to the worker, its progress and acks back, and the lend of
eKuiper's connections and their return."""
from __future__ import annotations

import enum
import os
from typing import Iterator, List, NamedTuple, Sequence, Tuple, Union

from ....transport.outbox import Passed
from ....transport.sp import Spilled
from ...frames import LEN, SEQ, encode

# supervisor -> worker
ITEMS = ord("D")      # Items: first seq, then length-prefixed items
ITEM_FD = ord("B")    # ItemFd: one big item's seq and size; its bytes in a sealed memfd (SCM_RIGHTS)
CONN = ord("N")       # eKuiper's data and ack connections lent to the worker (two fds, no payload)
# worker -> supervisor
DONE = ord("A")       # Done: every item up to this seq is finished
ACK = ord("K")        # Ack: seq, then the ack bytes from ctx.ack_ok/ack_error
LOST = ord("L")       # Lost: the lent connections given back, and why
ACK_REST = ord("Q")   # AckRest: the unsent end of an ack eKuiper did not read in time
TYPES = frozenset({ITEMS, ITEM_FD, CONN, DONE, ACK, LOST, ACK_REST})

SPILL = 1 << 18   # items of this many bytes or more reach the worker as a memfd (ITEM_FD)
# A worker lent an acked sink's connections waits this long for eKuiper to take an ack,
# then passes what is left to the supervisor (ACK_REST), whose outbox never waits.
ACK_WAIT = 1.0

Item = Tuple[int, bytes]   # (seq, payload)


def conn() -> bytes:
    """CONN: the lend (the two descriptors travel with it)."""
    return encode(CONN)


class Done(NamedTuple):
    seq: int

    def encode(self) -> bytes:
        return encode(DONE, SEQ.pack(self.seq))

    @classmethod
    def decode(cls, payload: bytes) -> "Done":
        return cls(SEQ.unpack_from(payload)[0])


class Ack(NamedTuple):
    seq: int
    data: bytes   # eKuiper's ack bytes, forwarded as they are

    def encode(self) -> bytes:
        return encode(ACK, SEQ.pack(self.seq) + self.data)

    @classmethod
    def decode(cls, payload: bytes) -> "Ack":
        return cls(SEQ.unpack_from(payload)[0], payload[SEQ.size:])


class Why(enum.Enum):
    """Why a worker gives eKuiper's connections back (LOST)."""

    CLOSED = b"closed"     # eKuiper closed the data connection (it dials again)
    LARGE = b"large"       # an item too large for the item page: relay the next ones
    STALLED = b"stalled"   # an ack's end went to the supervisor: every later ack is its too


class Lost(NamedTuple):
    why: Why

    def encode(self) -> bytes:
        return encode(LOST, self.why.value)

    @classmethod
    def decode(cls, payload: bytes) -> "Lost":
        return cls(Why(payload))   # ValueError on anything else


class AckRest(NamedTuple):
    rest: bytes

    def encode(self) -> bytes:
        return encode(ACK_REST, self.rest)

    @classmethod
    def decode(cls, payload: bytes) -> "AckRest":
        return cls(payload)


class Items(NamedTuple):
    """ITEMS: a run of small items with consecutive seqs."""

    first: int
    data: List[bytes]

    def encode(self) -> bytes:
        parts = [SEQ.pack(self.first)]
        for item in self.data:
            parts.append(LEN.pack(len(item)))
            parts.append(item)
        return encode(ITEMS, b"".join(parts))

    @staticmethod
    def decode(payload: bytes) -> Iterator[Item]:
        """The items, each with its seq, copied out one at a time."""
        seq = SEQ.unpack_from(payload)[0]
        pos = SEQ.size
        view = memoryview(payload)
        while pos < len(payload):
            (n,) = LEN.unpack_from(payload, pos)
            pos += LEN.size
            yield seq, bytes(view[pos:pos + n])
            pos += n
            seq += 1


class ItemFd(NamedTuple):
    """ITEM_FD: one big item, its bytes in the memfd that travels with the frame."""

    seq: int
    size: int

    def encode(self) -> bytes:
        return encode(ITEM_FD, SEQ.pack(self.seq) + LEN.pack(self.size))

    @staticmethod
    def decode(payload: bytes, fd: int) -> List[Item]:
        """The item, read out of its memfd in one copy; closes ``fd``."""
        try:
            seq, (size,) = SEQ.unpack_from(payload)[0], LEN.unpack_from(payload, SEQ.size)
            data = os.pread(fd, size, 0)
            if len(data) != size:
                raise ValueError(f"sink item memfd holds {len(data)} of {size} bytes")
        finally:
            os.close(fd)
        return [(seq, data)]


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
                yield Items(first, run).encode(), ()
                run = []
            yield ItemFd(seq, len(data)).encode(), (data,)   # no copy of its fd
            continue
        if not run:
            first = seq
        run.append(data)
    if run:
        yield Items(first, run).encode(), ()
