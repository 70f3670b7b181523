"""What every kind shares: the one interface each kind's route (the supervisor's half)
implements, what an instance's data path does at each event of the lifecycle
(``instances.py`` owns the lifecycle, a route owns the data), and the shared pages a
route makes for its workers.

A route lives as long as its instance; the sockets it holds (eKuiper's channels, opened
and closed through the effects) may come and go across workers, contain and retries.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import signal
from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from ..effects import WorkerHandle
    from ..instances import Instance

Counts = Tuple[int, int, int]   # items in, items out, errors
PAGE = mmap.PAGESIZE


def create_page(size: int, name: str) -> int:
    """A new zeroed shared page as an fd (memfd: no path, passed to the worker with
    SCM_RIGHTS), sealed at its size: nobody can shrink it under the supervisor's mapping."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        raise
    return fd


class Route:
    """Default behaviour: a data path with no channel of its own (a source's)."""

    kill_signal = signal.SIGTERM   # a kill escalates to it once the stack is dumped

    def __init__(self, inst: "Instance") -> None:
        self.inst = inst
        self.fx = inst.fx

    def open(self, first: bool) -> None:
        """Before the instance runs: open eKuiper's channel if it is not open (OSError: it
        cannot be; the first start is refused, a restart counts as a crash)."""

    def open_page(self, w: "WorkerHandle", lends: bool) -> Optional[int]:
        """A shared page for the new worker ``w`` (its fd goes with START), or None."""
        return None

    def on_ready(self, w: "WorkerHandle", first: bool) -> None:
        """``w`` runs: give it what waits."""

    def start_answer(self, now: float) -> Optional[str]:
        """Whether the first start can be answered now: "" ok, None not yet (asked again on
        the channel's events and on ticks), otherwise why it is refused."""
        return ""

    def on_frame(self, w: "WorkerHandle", ftype: int, payload: bytes) -> None:
        """A data frame of the current worker (lifecycle frames are the instance's)."""
        raise ValueError(f"unknown frame type {ftype} from worker pid {w.pid}")

    def on_readable(self, endpoint: Any) -> None:
        """eKuiper's channel ``endpoint`` has data (a stale endpoint is ignored)."""

    def on_stopping(self, w: "WorkerHandle", running: bool) -> None:
        """``w`` is asked to close."""

    def on_kill(self, w: "WorkerHandle", why: str) -> None:
        """``w`` is being killed."""

    def on_worker_gone(self, w: "WorkerHandle", how: str, cause: str) -> None:
        """``w`` exited (``how``: its wait status in words); keep what it counted."""

    def on_crashed(self, w: Optional["WorkerHandle"], how: str, cause: str) -> None:
        """The worker's exit was a crash (``w`` None: no worker could be made)."""

    def on_failed(self) -> None:
        """The instance has failed: answer what waits with errors."""

    def recycled_itself(self, w: "WorkerHandle", status: int) -> bool:
        """Whether this exit is a recycle the supervisor asked for in advance (not a crash)."""
        return False

    def ended(self, w: "WorkerHandle", status: int) -> bool:
        """Whether this exit means the instance has ended by itself (not a crash)."""
        return False

    def signal_deferred(self, w: "WorkerHandle") -> bool:
        """Whether signals to ``w`` wait for the next tick (it is writing an ack eKuiper
        waits for, and a death there would leave eKuiper unsure whether it was sent)."""
        return False

    def runs_until(self, w: "WorkerHandle") -> Tuple[float, str]:
        """A recycled ``w``'s work in flight that may outlast stop_grace: until when it may
        run, and the kill reason past that ((0.0, ""): nothing)."""
        return 0.0, ""

    def busy(self) -> bool:
        """Whether a recycle must wait (something of eKuiper's is in the worker's hands)."""
        return False

    def observe(self, w: "WorkerHandle") -> None:
        """Refresh ``w``'s vitals from what the route can see, before a health check."""

    def tick(self, now: float) -> None:
        """The clock: redials and deadlines of the route's own."""

    def started_note(self) -> str:
        """What the instance's "started in worker pid N" line adds for this kind."""
        return ""

    def counts(self, w: "WorkerHandle") -> Counts:
        """What the live worker ``w`` has counted and the instance has not yet."""
        return 0, 0, 0

    def close(self) -> None:
        """Close eKuiper's channels (removed, or contained: opened anew on a retry)."""
