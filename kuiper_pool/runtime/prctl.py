"""libc's ``prctl``, looked up once: in the zygote, before any fork, so that every forked
worker calls it as it is. A ``CDLL`` made in a worker makes a class of its own and touches
ctypes' objects (~180 KiB of the zygote's pages copied into a bare forked child)."""
from __future__ import annotations

from typing import Callable, Optional

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

_prctl: Optional[Callable[..., int]] = None


def prctl(*args: object) -> int:
    """``prctl(2)``; OSError or AttributeError where there is no prctl."""
    global _prctl
    if _prctl is None:
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl(*args)
