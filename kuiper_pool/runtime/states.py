"""The lifecycle of an instance as data: its states and the one table of allowed changes.

``Instance._move`` is the only writer of a state and checks every change against
``TRANSITIONS``; a change the table does not allow raises :class:`TransitionError` (a bug
of ours, contained to the one instance by the supervisor)::

    STARTING --READY ok--> RUNNING --crash--> BACKOFF --delay--> STARTING
       |  \\--crash (restart)--> BACKOFF        |  \\--recycle--> RECYCLING --exit--> STARTING
       |                                      \\--stop--> STOPPING --exit--> REMOVED
       \\--first start fails / times out--> REMOVED (eKuiper gets the error)
    BACKOFF/STARTING --too many restarts in flap_window--> FAILED --failed_retry--> STARTING
    RUNNING --a source's open returned--> ENDED
    RUNNING --a function's first start still unanswered: no channel in dial_timeout--> REMOVED
    any state but STOPPING --internal error--> FAILED (contain)
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, FrozenSet


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    RECYCLING = "recycling"
    STOPPING = "stopping"
    FAILED = "failed"
    ENDED = "ended"
    REMOVED = "removed"     # forgotten by the supervisor; every later event is stale

    def __str__(self) -> str:
        return self.value


S = State
TRANSITIONS: Dict[State, FrozenSet[State]] = {
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.FAILED, S.STOPPING, S.REMOVED}),
    S.RUNNING: frozenset({S.BACKOFF, S.RECYCLING, S.STARTING, S.STOPPING, S.ENDED, S.FAILED,
                          S.REMOVED}),
    S.BACKOFF: frozenset({S.STARTING, S.FAILED, S.REMOVED}),
    S.RECYCLING: frozenset({S.STARTING, S.STOPPING, S.FAILED, S.REMOVED}),
    S.STOPPING: frozenset({S.REMOVED}),
    S.FAILED: frozenset({S.STARTING, S.FAILED, S.REMOVED}),
    S.ENDED: frozenset({S.FAILED, S.REMOVED}),
    S.REMOVED: frozenset(),
}


class TransitionError(RuntimeError):
    """An event arrived in a state that does not allow it: a bug of ours, contained to
    the one instance by the supervisor."""
