"""Where a worker was when it crashed, hung or overran: ``faulthandler`` in every worker,
written to a per-worker file in the private run directory, read by the supervisor.

A fatal signal (segfault, abort) makes faulthandler write the Python stack of every thread
there; before killing a hung or overrunning worker the supervisor sends SIGUSR1, which
writes the same dump (faulthandler's handler is C code: it runs even while a C call holds
the GIL). :func:`user_frames` picks the innermost frames of the plugin's own code for the
log line and the status ``last_error``.

That dump reads the other threads' frame stacks without the GIL. A stopped worker continued
to dump its stack runs all its threads again meanwhile, and a thread whose frames move across
a data-stack chunk changes them under the reader: the dump can crash the worker (SIGSEGV, and
faulthandler's "Fatal Python error" in the file, :attr:`Dump.fatal`) before the supervisor's
SIGKILL lands; ``instances.py`` reports such an exit as the kill it was.
"""
from __future__ import annotations

import faulthandler
import functools
import os
import re
import signal
import sys
from typing import IO, List, NamedTuple, Optional, Tuple

DUMP_SIGNAL = signal.SIGUSR1
FATAL = "Fatal Python error: "   # how faulthandler begins what it writes on a fatal signal
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_dump: Optional[IO[bytes]] = None   # kept open for the life of the worker


def dump_path(rundir: str, wid: int) -> str:
    return os.path.join(rundir, f"stack-{wid}.txt")


def prepare() -> None:
    """In the zygote, once: faulthandler on a placeholder descriptor (/dev/null), which each
    forked worker's :func:`install` points at its own dump file. Setting faulthandler up in
    every worker copied ~200 KiB of the zygote's pages into each."""
    global _dump
    _dump = open(os.devnull, "wb", buffering=0)
    _handle(_dump)


def install(path: str) -> None:
    """In a worker: crashes and SIGUSR1 write every thread's stack to ``path`` (0600)."""
    global _dump
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if _dump is not None:  # forked from a zygote that prepared it: only the descriptor changes
        try:
            os.dup2(fd, _dump.fileno(), inheritable=False)
        finally:
            os.close(fd)
        return
    _dump = open(fd, "wb", buffering=0)  # an exec'd worker
    _handle(_dump)


def _handle(dump: IO[bytes]) -> None:
    faulthandler.enable(file=dump, all_threads=True)
    faulthandler.register(DUMP_SIGNAL, file=dump, all_threads=True, chain=False)


class Dump(NamedTuple):
    """What a worker's dump says: where plugin code was (:func:`user_frames`), and whether a
    fatal signal (segfault, abort) ended the worker while or after it was written."""

    at: str
    fatal: bool


def summary(text: str) -> Dump:
    return Dump(user_frames(text), any(line.startswith(FATAL) for line in text.splitlines()))


def read(path: str) -> str:
    """A worker's dump (removed once read); "" when there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    discard(path)
    return text


def discard(path: str) -> None:
    """Remove a worker's dump nobody will read (its instance is gone, or it was read)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def user_frames(dump: str, limit: int = 3) -> str:
    """``file:line function`` of the innermost frames of plugin code (not kuiper_pool's, not
    the standard library's), innermost first, from the first thread that has any; the
    current thread (the one running plugin code when the signal came) is looked at first."""
    current: List[str] = []
    others: List[List[str]] = []
    target: Optional[List[str]] = None
    for line in dump.splitlines():
        if line.startswith("Current thread"):
            target = current
        elif line.startswith("Thread "):
            target = []
            others.append(target)
        elif target is not None:
            m = _FRAME.match(line)
            if m and not _ours(m.group("file")):
                target.append(_at(m.group("file"), m.group("line"), m.group("func")))
    for frames in [current] + others:
        if frames:
            return " < ".join(frames[:limit])
    return ""


def innermost(ident: int) -> str:
    """``file:line function`` of the innermost frame of plugin code that thread ``ident`` of
    this process is running ("": none, or no such thread): where a shared worker's instance
    is stuck, read by the process itself (its other threads are no one else's concern)."""
    frame = sys._current_frames().get(ident)
    while frame is not None:
        if not _ours(frame.f_code.co_filename):
            return _at(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)
        frame = frame.f_back
    return ""


def _at(path: str, line: object, func: str) -> str:
    return f"{os.path.basename(path)}:{line} {func}"


def _ours(path: str) -> bool:
    return path.startswith(_PACKAGE) or path.startswith(_stdlib()) or path.startswith("<")


@functools.lru_cache(maxsize=None)
def _stdlib() -> Tuple[str, ...]:
    # sysconfig (with its data module) only when a dump is read or a thread's place is
    # asked: every worker and the supervisor import this module on the way to a first item
    import sysconfig

    return tuple(p for p in {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")} if p)
