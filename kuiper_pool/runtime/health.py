"""Restart policy and health verdicts: pure decisions on numbers, no processes.

The supervisor feeds them monotonic times and what workers report; they answer
"restart after this delay", "give up", or "kill this worker because ...".
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Deque, Optional, Tuple

from ..config import Settings

KILL = "kill"
RECYCLE = "recycle"


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


@dataclass
class Vitals:
    """What the supervisor knows about one live worker's health."""

    last_beat: float
    busy_since: float = 0.0          # worker clock (CLOCK_MONOTONIC is system-wide on Linux)
    call_started: float = 0.0        # a function call forwarded and not answered yet
    processed: int = 0
    calls: int = 0                   # function calls forwarded (for max_calls)
    rss: int = 0
    cpu_percent: float = 0.0


def verdict(v: Vitals, now: float, settings: Settings, watch_calls: bool) -> Optional[Tuple[str, str]]:
    """``("kill", why)`` for a hung worker, ``("recycle", why)`` for one to replace
    gracefully, or None.

    A source's long-running ``open`` is normal: only missed heartbeats count for it
    (``watch_calls`` False). Sinks and functions also have a per-call deadline.
    """
    silent = now - v.last_beat
    limit = settings.heartbeat_interval * settings.heartbeat_misses
    if silent > limit:
        return KILL, f"hung: no heartbeat for {silent:.1f}s (limit {limit:.1f}s)"
    if watch_calls:
        started = v.call_started or v.busy_since
        if started and now - started > settings.call_deadline:
            return KILL, f"call exceeded call_deadline {settings.call_deadline:g}s"
    limit_mb = settings.memory_limit_mb
    if limit_mb and v.rss > limit_mb * 1024 * 1024:
        return RECYCLE, (f"resident memory {v.rss / 1048576:.0f} MiB over "
                         f"memory_limit_mb {limit_mb:g}")
    if settings.max_calls and v.calls >= settings.max_calls:
        return RECYCLE, f"served max_calls {settings.max_calls}"
    return None
