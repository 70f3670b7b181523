"""The zygote's small-object heap, made ready to be shared with the workers it forks.

CPython's small-object allocator (pymalloc) hands out the free blocks of pools that are
already partly used before it takes a new pool. In a forked worker those pools are the
zygote's pages: every object the worker makes there copies a whole page that it shares with
the zygote and every other worker (an idle source makes a few thousand objects on its way to
READY). :func:`fill_free_blocks` takes those blocks in the zygote, once, before the fork, so
that a worker's own objects land in pools of its own, packed together.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Dict, List

# a line of sys._debugmallocstats(): class, block size, pools, blocks in use, blocks free
_CLASS = re.compile(rb"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.M)
_BYTES_HEADER = sys.getsizeof(b"") - 1  # a bytes object of length n takes this + n + 1 bytes
_kept: List[object] = []


def free_blocks() -> Dict[int, int]:
    """Block size -> free blocks in pymalloc's used pools, as ``sys._debugmallocstats``
    (which writes to the C stderr) reports them; {} where it reports nothing (another
    allocator, another interpreter)."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return {}
    fd = os.memfd_create("kuiper_pool-mallocstats", os.MFD_CLOEXEC)
    saved = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
        try:
            stats()
        finally:
            os.dup2(saved, 2)
        text = os.pread(fd, 1 << 20, 0)
    finally:
        os.close(saved)
        os.close(fd)
    return {int(size): int(free) for _cls, size, _pools, _used, free in _CLASS.findall(text)}


def fill_free_blocks() -> int:
    """Take every free block of a used pool with a bytes object kept for the zygote's life
    (blocks smaller than a bytes object, 16 and 32 bytes, are left). Returns the blocks
    taken. Best effort: an allocator that reports nothing is left as it is."""
    fills = [(size - _BYTES_HEADER - 1, n) for size, n in sorted(free_blocks().items())
             if size > _BYTES_HEADER]
    slots: List[bytes] = [b""] * sum(n for _length, n in fills)  # sized first: no growth among the fills
    i = 0
    for length, n in fills:
        for _ in range(n):
            slots[i] = bytes(length)
            i += 1
    _kept.append(slots)
    return i
