"""The call page: one shared memory page per function worker, written by the worker on
every call and read by the supervisor on its tick, so a call costs no message to the
supervisor while its deadline, crash answer and counters still work.

Layout (native byte order, one writer): ``state`` (IDLE, EXECUTING, REPLYING), ``seq``
(calls begun), ``started`` (CLOCK_MONOTONIC seconds the current call began), ``crc`` (of
the current call's bytes: after a crash, eKuiper re-sends the pending call on the new
connection and the supervisor recognises it), ``done`` (calls answered) and ``failed``
(answered with state false). The writer stores ``started``/``crc`` before ``state``;
the reader confirms a deadline on two ticks with the same ``seq`` before acting, so a torn
read can delay a verdict but never cause one.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from typing import NamedTuple

IDLE, EXECUTING, REPLYING = 0, 1, 2
_LAYOUT = struct.Struct("=IIQdQQ")   # state, crc, seq, started, done, failed
SIZE = mmap.PAGESIZE


class CallState(NamedTuple):
    state: int
    crc: int
    seq: int
    started: float
    done: int
    failed: int


def create() -> int:
    """A new zeroed page as an fd (memfd: no path, passed to the worker with SCM_RIGHTS)."""
    fd = os.memfd_create("kuiper_pool-calls", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return fd


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
        return CallState(*_LAYOUT.unpack_from(self.map, 0))

    def close(self) -> None:
        self.map.close()
