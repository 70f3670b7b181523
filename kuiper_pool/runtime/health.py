"""Restart policy and health verdicts: pure decisions on numbers, no processes.

The supervisor feeds them monotonic times and what workers report; they answer
"restart after this delay", "give up", or "end this worker for this :class:`Cause`" (with
a text that says the rest).
"""
from __future__ import annotations

import enum
import random
from collections import deque
from typing import Callable, Deque, Optional, Tuple

from .. import wire
from ..config import Settings


class Cause(enum.Enum):
    """Why the supervisor ends or replaces a worker; the free text beside it (the log line,
    ``last_error``) says the rest. The first four kill it (stack dump, then a signal), the
    others stop it gracefully (a recycle)."""

    HANG = "hang"                    # no heartbeat and no CPU progress
    DEADLINE = "deadline"            # call_deadline or collect_deadline
    START_TIMEOUT = "start_timeout"  # factory, configure or open past start_timeout
    NO_CHANNEL = "no_channel"        # eKuiper's channel cannot be opened for a restarted worker
    MEMORY = "memory"                # over memory_limit_mb
    MAX_CALLS = "max_calls"          # served max_calls
    OPERATOR = "operator"            # kuiper-pool restart
    RELOAD = "reload"                # replaced by a worker of the new code
    SHARED = "shared"                # moved off a shared worker that must end (shared.py)

    @property
    def kills(self) -> bool:
        return self in _KILLS


_KILLS = frozenset({Cause.HANG, Cause.DEADLINE, Cause.START_TIMEOUT, Cause.NO_CHANNEL})


RESTART_CAUSES = ("exit", "signal", "hang", "deadline")   # every restart_kind


def restart_kind(cause: Optional[Cause], signaled: bool) -> str:
    """The ``restart_causes`` label (status, metrics) of a crash whose worker we were killing
    for ``cause`` (None: we were not), ``signaled`` when it died of a signal."""
    if cause is Cause.HANG:
        return "hang"
    if cause in (Cause.DEADLINE, Cause.START_TIMEOUT):
        return "deadline"
    return "signal" if signaled else "exit"


class RestartPolicy:
    """Exponential backoff with jitter and a cap; too many restarts in a window means failed."""

    def __init__(self, settings: Settings, rng: Optional[random.Random] = None) -> None:
        self.s = settings
        self.rng = rng or random.Random()
        self.history: Deque[float] = deque()

    def next_delay(self, now: float) -> Optional[float]:
        """Record a crash at ``now``; the delay before restarting, or None when flapping."""
        window = self.s.flap_window
        while self.history and now - self.history[0] > window:
            self.history.popleft()
        if len(self.history) >= self.s.flap_max_restarts:
            return None
        attempt = len(self.history)
        self.history.append(now)
        if attempt == 0:
            base = self.s.restart_backoff_initial
        else:
            base = min(self.s.restart_backoff_max, self.s.restart_backoff_min * 2 ** (attempt - 1))
        jitter = self.s.restart_jitter
        return max(0.0, base * (1 + self.rng.uniform(-jitter, jitter)))

    def reset(self) -> None:
        """Forget past crashes (an operator restarted the instance)."""
        self.history.clear()


class Vitals:
    """What the supervisor knows about one live worker's health."""

    __slots__ = ("last_beat", "busy_since", "call_started", "processed", "emit_errors", "calls",
                 "cpu_at_beat", "cpu_mark", "rss", "cpu_percent", "cpu_seconds")

    def __init__(self, last_beat: float, busy_since: float = 0.0, call_started: float = 0.0,
                 processed: int = 0, emit_errors: int = 0, calls: int = 0,
                 cpu_at_beat: Optional[float] = None, cpu_mark: Optional[Tuple[float, float]] = None,
                 rss: int = 0, cpu_percent: float = 0.0, cpu_seconds: float = 0.0) -> None:
        self.last_beat = last_beat
        self.busy_since = busy_since        # worker clock (CLOCK_MONOTONIC is system-wide on Linux)
        self.call_started = call_started    # a function call forwarded and not answered yet
        self.processed = processed
        self.emit_errors = emit_errors      # a source's emit_error calls (logged, not sent)
        self.calls = calls                  # function calls forwarded (for max_calls)
        self.cpu_at_beat = cpu_at_beat      # the worker's CPU seconds in its last heartbeat
        self.cpu_mark = cpu_mark            # (when, CPU seconds) while beats are late
        self.rss = rss
        self.cpu_percent = cpu_percent
        self.cpu_seconds = cpu_seconds      # user + system, as last sampled


BUSY_CPU_SHARE = 0.05   # CPU seconds per second of silence above which a silent worker is busy


def verdict(v: Vitals, now: float, settings: Settings, kind: str,
            cpu_seconds: Callable[[], Optional[float]]) -> Optional[Tuple[Cause, str]]:
    """``(cause, why)`` for a hung or overrunning worker (to kill) or one to replace
    gracefully (``cause.kills`` tells which), or None.

    Hung means no heartbeat **and** no CPU progress: a C call that holds the GIL (a model
    load, a long numpy call) silences the heartbeat thread but burns CPU, and is left to
    run (``cpu_seconds`` is asked only when beats are late). A source's long-running
    ``open`` is normal; functions have ``call_deadline``, sinks ``collect_deadline`` (0 = off).
    """
    silent = now - v.last_beat
    limit = settings.heartbeat_interval * settings.heartbeat_misses
    if silent > settings.heartbeat_interval:  # a beat is late: watch the CPU from now on
        hung = _hung(v, now, silent, limit, cpu_seconds)
        if hung:
            return Cause.HANG, hung
    deadline = settings.call_deadline if kind == wire.TYPE_FUNC else (
        settings.collect_deadline if kind == wire.TYPE_SINK else 0.0)
    started = v.call_started or v.busy_since
    if deadline and started and now - started > deadline:
        name = "call_deadline" if kind == wire.TYPE_FUNC else "collect_deadline"
        return Cause.DEADLINE, overran(name, deadline)
    limit_mb = settings.memory_limit_mb
    if limit_mb and v.rss > limit_mb * 1024 * 1024:
        return Cause.MEMORY, (f"resident memory {v.rss / 1048576:.0f} MiB over "
                         f"memory_limit_mb {limit_mb:g}")
    if settings.max_calls and v.calls >= settings.max_calls:
        return Cause.MAX_CALLS, f"served max_calls {settings.max_calls}"
    return None


def overran(name: str, deadline: float) -> str:
    """The kill reason of a call or collect that ran past its deadline setting ``name``."""
    return f"call exceeded {name} {deadline:g}s"


def _hung(v: Vitals, now: float, silent: float, limit: float,
          cpu_seconds: Callable[[], Optional[float]]) -> str:
    """Why a silent worker counts as hung, or "" while it may still be busy on the CPU.

    Called on every tick once a beat is late: ``v.cpu_mark`` follows the last time the
    worker's CPU time was seen moving, so a worker that was busy until it stopped (SIGSTOP,
    a deadlock) is hung once silent past ``limit`` and idle for half of it; a new window
    never starts after the beats stopped."""
    cpu = cpu_seconds()
    if cpu is None:  # no reading (gone, or not ours to read): silence alone decides
        return f"hung: no heartbeat for {silent:.1f}s (limit {limit:.1f}s)" if silent > limit else ""
    since, base = v.cpu_mark or (v.last_beat, v.cpu_at_beat)
    if base is None:  # no CPU figure from the worker yet: measure from now on
        v.cpu_mark = (now, cpu)
        return ""
    if cpu - base > BUSY_CPU_SHARE * (now - since):  # it ran since the mark: busy so far
        v.cpu_mark = (now, cpu)
        return ""
    v.cpu_mark = (since, base)
    span = now - since
    if silent <= limit or span < limit / 2:  # too short a quiet to judge (10 ms CPU ticks)
        return ""
    return (f"hung: no heartbeat for {silent:.1f}s (limit {limit:.1f}s) and "
            f"{cpu - base:.2f}s of CPU in the last {span:.1f}s")
