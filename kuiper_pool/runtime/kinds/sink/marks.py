"""The collect mark: a small shared memory page per sink worker, written by the worker
around every ``collect`` and read by the supervisor after the worker died, so that only the
item whose ``collect`` was running is charged with the death (poison accounting), at no
message per item.

Layout: two native unsigned 64-bit slots, one writer: ``[0]`` the seq of the item whose
collect began last, ``[1]`` the seq of the item whose collect returned last. An item is
running when they differ. The page is a sealed memfd (``base.create_page``); an acked sink lent eKuiper's
connections has its item page in the same memfd (``page.py``).
"""
from __future__ import annotations

import mmap

from ..base import PAGE as SIZE


class CollectMark:
    """One side's mapping of a collect mark page."""

    def __init__(self, fd: int, size: int = SIZE) -> None:
        self.map = mmap.mmap(fd, size)
        self.slots = memoryview(self.map)[:16].cast("Q")   # the worker writes these two directly

    def running(self) -> int:
        """The seq of the item whose collect had begun and not returned, or 0."""
        began, ended = self.slots[0], self.slots[1]
        return began if began != ended else 0

    def close(self) -> None:
        self.slots.release()
        self.map.close()
