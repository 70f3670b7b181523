"""The item page: the collect mark (``marks.py``) of an acked sink worker that may be lent
eKuiper's data and ack connections, extended in the same memfd so the supervisor can tell
after the worker's death whether an item it read off the data connection is owed to
eKuiper (README, "Data paths"). An item taken off the lent connection is marked ``LENT | taken`` (relayed
items' seqs stay below ``LENT``).

eKuiper's sink ``Collect`` sends one item and, with ``requireAck``, waits for its ack
before the next (docs/protocol.md, "Sinks"), so one page holds the one item in hand. The
worker waits until the whole SP frame (9-byte header + payload) is in the kernel's buffer
and takes it with ONE ``recv`` straight into the page's data area, whose first byte it
cleared before: after a death, that byte tells whether the ``recv`` happened (an SP frame
starts with 01). Pages are touched once when mapped, so the copy never faults part-way.

Header (after the mark's two slots; native byte order, written by the worker only): ``state`` (FREE, RECEIVING,
HOLDING, ACKING), ``length`` (payload bytes of the item in hand), ``taken`` (items taken
off the lent connection) and ``acked`` (acks sent on the lent connection).

* FREE: nothing owed.
* RECEIVING: ``length`` is known from a peek; data[0] == 01 means the recv took the frame
  (the item is owed), 00 that it did not (the frame is still in the socket).
* HOLDING: the item is in the page and not acked (``collect`` running or done): owed.
* ACKING: the ack is being written. The supervisor never signals a worker in this state
  (it defers to its next tick); a death here by someone else's SIGKILL is counted as acked,
  since a second ack would shift every later ack by one (acks carry no id).
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple, Optional, Union

from ..base import PAGE, create_page
from .marks import CollectMark

FREE, RECEIVING, HOLDING, ACKING = 0, 1, 2, 3
LENT = 1 << 63                   # in the mark: LENT | taken, an item taken off the lent connection
_HEAD = struct.Struct("=IIQQ")   # state, length, taken, acked
_HEAD_AT = 16                    # after the collect mark's two slots
DATA = mmap.PAGESIZE             # offset of the data area
CAPACITY = 1 << 16               # largest SP frame taken into the page; larger ones are relayed
SIZE = DATA + CAPACITY
SP_FRAME = 9                     # 01 + 8-byte big-endian length


def fits(length: int) -> bool:
    """Whether an item of ``length`` bytes is taken into the page (else it is relayed)."""
    return SP_FRAME + length <= CAPACITY


class PageState(NamedTuple):
    state: int
    length: int
    taken: int
    acked: int


def create(items: bool) -> int:
    """A sink worker's page as a sealed memfd (``base.create_page``): the collect mark, with
    the item page when ``items`` (the worker may be lent eKuiper's connections)."""
    return create_page(SIZE if items else PAGE, "kuiper_pool-sink")


def open_sink_page(fd: int) -> Union[CollectMark, "SinkPage"]:
    """Map a page made by :func:`create`: the worker learns from its size what it got."""
    return SinkPage(fd) if os.fstat(fd).st_size >= SIZE else CollectMark(fd)


class SinkPage(CollectMark):
    """One side's mapping of a page made by :func:`create`. The worker's side keeps what it
    wrote in attributes and only writes the page; the supervisor reads it."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, SIZE)
        for off in range(0, SIZE, mmap.PAGESIZE):  # fault every page in now, not in a recv
            self.map[off] = self.map[off]
        self.view = memoryview(self.map)
        self.state, self.length, self.taken, self.acked_n = FREE, 0, 0, 0

    # worker side (one writer at a time: the runner, or the thread that acks)
    def _write(self, state: int) -> None:
        self.state = state
        _HEAD.pack_into(self.map, _HEAD_AT, state, self.length, self.taken, self.acked_n)

    def receiving(self, length: int) -> memoryview:
        """About to recv a frame of ``length`` payload bytes: the area to recv it into."""
        self.map[DATA] = 0
        self.length = length
        self._write(RECEIVING)
        return self.view[DATA:DATA + SP_FRAME + length]

    def holding(self) -> None:
        self.taken += 1
        self._write(HOLDING)

    def acking(self) -> None:
        self._write(ACKING)

    def acked(self) -> None:
        self.acked_n += 1
        self._write(FREE)

    # both sides
    def read(self) -> PageState:
        return PageState(*_HEAD.unpack_from(self.map, _HEAD_AT))

    def owed(self) -> Optional[bytes]:
        """After the worker's death: the item it read off the connection and did not ack,
        or None (none read, or acked, or the ack was being written)."""
        st = self.read()
        if st.state == HOLDING or (st.state == RECEIVING and self.map[DATA] == 1):
            return bytes(self.view[DATA + SP_FRAME:DATA + SP_FRAME + st.length])
        return None

    def close(self) -> None:
        self.view.release()
        super().close()
