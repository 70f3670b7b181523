"""The call page (function): one shared memory page per function worker, written by the worker on
every call and read by the supervisor on its tick, so a call costs no message to the
supervisor while its deadline, crash answer and counters still work.

Layout (native byte order, one writer): ``state`` (IDLE, EXECUTING, REPLYING), ``seq``
(calls begun), ``started`` (CLOCK_MONOTONIC seconds the current call began), ``crc`` (of
the current call's bytes: after a crash, eKuiper re-sends the pending call on the new
connection and the supervisor recognises it), ``done`` (calls answered) and ``failed``
(answered with state false). The writer stores ``started``/``crc`` before ``state``;
the reader confirms a deadline on two ticks with the same ``seq`` before acting, so a torn
read can delay a verdict but never cause one.

The worker's plugin code can reach the page (its fd is in ``/proc/self/fd``), so the page is
sealed against shrinking and growing: an ``ftruncate`` fails with EPERM instead of making the
supervisor's next read a SIGBUS. What plugin code may write into it is only ever read as
numbers: an unknown state reads as IDLE and a ``started`` that is not finite as 0 (no call),
so garbage can at most hide that worker's own calls from ``call_deadline`` (the heartbeat
check still applies), never raise in the supervisor.
"""
from __future__ import annotations

import math
import mmap
import struct
import zlib
from typing import NamedTuple

from ..base import PAGE, create_page

IDLE, EXECUTING, REPLYING = 0, 1, 2
_LAYOUT = struct.Struct("=IIQdQQ")   # state, crc, seq, started, done, failed
SIZE = PAGE


class CallState(NamedTuple):
    state: int
    crc: int
    seq: int
    started: float
    done: int
    failed: int


def create() -> int:
    """A function worker's call page as a sealed memfd (``base.create_page``)."""
    return create_page(SIZE, "kuiper_pool-calls")


def call_crc(call: bytes) -> int:
    return zlib.crc32(call)


class CallPage:
    """One side's mapping of a page made by :func:`create`."""

    def __init__(self, fd: int) -> None:
        self.map = mmap.mmap(fd, SIZE)
        self.seq = 0
        self.done = 0
        self.failed = 0

    # worker side (one writer)
    def begin(self, call: bytes, now: float) -> None:
        self.seq += 1
        _LAYOUT.pack_into(self.map, 0, IDLE, call_crc(call), self.seq, now, self.done, self.failed)
        struct.pack_into("=I", self.map, 0, EXECUTING)

    def replying(self) -> None:
        struct.pack_into("=I", self.map, 0, REPLYING)

    def finish(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        struct.pack_into("=QQ", self.map, _LAYOUT.size - 16, self.done, self.failed)
        struct.pack_into("=I", self.map, 0, IDLE)

    # supervisor side
    def read(self) -> CallState:
        st = CallState(*_LAYOUT.unpack_from(self.map, 0))
        if st.state not in (IDLE, EXECUTING, REPLYING) or not math.isfinite(st.started):
            return st._replace(state=IDLE, started=0.0)
        return st

    def close(self) -> None:
        self.map.close()
