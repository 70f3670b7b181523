"""The lifecycle of an instance as data: its states and the one table of allowed changes.

``Instance._move`` is the only writer of a state and checks every change against
``TRANSITIONS``; a change the table does not allow raises :class:`TransitionError` (a bug
of ours, contained to the one instance by the supervisor). Ending a worker is a state of
its own: KILLING (stack dump, DUMP_GRACE, SIGTERM or SIGKILL, SIGKILL after stop_grace),
RECYCLING (a STOP frame, SIGKILL after stop_grace) or STOPPING (the same, for good). A
reload raises the workers' target generation: a RUNNING worker of an older one is recycled
as soon as it holds nothing of eKuiper's, as one over a limit. Every allowed change, one per
line (tests/test_structure.py checks this list against the table)::

    STARTING  -> RUNNING    the worker's READY (ok)
    STARTING  -> KILLING    start_timeout, hung, eKuiper's channel cannot be opened
    STARTING  -> BACKOFF    a restarted worker crashed or could not be made
    STARTING  -> FAILED     too many restarts in flap_window; an internal error (contain)
    STARTING  -> STOPPING   stop or shutdown while a worker starts
    STARTING  -> REMOVED    the first start fails (eKuiper gets the error); stop with no worker
    RUNNING   -> KILLING    hung, call_deadline or collect_deadline overrun
    RUNNING   -> BACKOFF    a crash: restart after a delay
    RUNNING   -> RECYCLING  over a limit, an operator's restart, a reload: the worker is replaced
    RUNNING   -> STARTING   a worker that recycled itself (max_calls) is replaced at once
    RUNNING   -> STOPPING   stop or shutdown
    RUNNING   -> ENDED      a source's open returned
    RUNNING   -> FAILED     too many restarts in flap_window; an internal error (contain)
    RUNNING   -> REMOVED    a function's first start unanswered: no channel in dial_timeout,
                            or its worker exited before the channel was up
    KILLING   -> BACKOFF    the killed worker exited: restart after a delay
    KILLING   -> FAILED     too many restarts in flap_window; an internal error (contain)
    KILLING   -> STOPPING   stop or shutdown while a worker is killed (the kill goes on)
    KILLING   -> REMOVED    the first start's worker was killed (eKuiper gets the error)
    BACKOFF   -> STARTING   the restart delay passed; an operator's restart
    BACKOFF   -> FAILED     an internal error (contain)
    BACKOFF   -> REMOVED    stop or shutdown (no worker)
    RECYCLING -> STARTING   the old worker exited
    RECYCLING -> STOPPING   stop or shutdown during a recycle
    RECYCLING -> FAILED     an internal error (contain)
    RECYCLING -> REMOVED    the zygote died, the supervisor closes
    STOPPING  -> REMOVED    the worker exited (SIGKILL after stop_grace)
    FAILED    -> STARTING   failed_retry passed; an operator's restart
    FAILED    -> FAILED     an internal error while failed: the retry is scheduled again
    FAILED    -> REMOVED    stop or shutdown
    ENDED     -> FAILED     an internal error (contain)
    ENDED     -> REMOVED    stop or shutdown
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, FrozenSet, NamedTuple


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    KILLING = "killing"     # hung or overrunning: its stack is dumped, then it is killed
    RECYCLING = "recycling"
    STOPPING = "stopping"
    FAILED = "failed"
    ENDED = "ended"
    REMOVED = "removed"     # forgotten by the supervisor; every later event is stale

    def __str__(self) -> str:
        return self.value


S = State
TRANSITIONS: Dict[State, FrozenSet[State]] = {
    S.STARTING: frozenset({S.RUNNING, S.KILLING, S.BACKOFF, S.FAILED, S.STOPPING, S.REMOVED}),
    S.RUNNING: frozenset({S.KILLING, S.BACKOFF, S.RECYCLING, S.STARTING, S.STOPPING, S.ENDED,
                          S.FAILED, S.REMOVED}),
    S.KILLING: frozenset({S.BACKOFF, S.FAILED, S.STOPPING, S.REMOVED}),
    S.BACKOFF: frozenset({S.STARTING, S.FAILED, S.REMOVED}),
    S.RECYCLING: frozenset({S.STARTING, S.STOPPING, S.FAILED, S.REMOVED}),
    S.STOPPING: frozenset({S.REMOVED}),
    S.FAILED: frozenset({S.STARTING, S.FAILED, S.REMOVED}),
    S.ENDED: frozenset({S.FAILED, S.REMOVED}),
    S.REMOVED: frozenset(),
}

# the groups of states, named once
LIVE = frozenset({S.STARTING, S.RUNNING})        # a worker serves, or is starting to
WAITING = frozenset({S.BACKOFF, S.FAILED})       # no worker; a (re)start is due at restart_at
CRASHES = LIVE | {S.KILLING}                     # a worker that exits now has crashed
IDLE = WAITING | {S.ENDED}                       # no worker and none being ended
STANDING = LIVE | {S.KILLING, S.RECYCLING, S.BACKOFF}  # eKuiper's start stands: a worker serves or will
SHOWN = tuple(s for s in State if s is not S.REMOVED)  # what status and metrics report


class Change(NamedTuple):
    """One state change, as the instance's listeners are told of it (``Effects.changed``):
    status, the metrics and a reload follow instances this way, never by polling."""

    old: State
    new: State
    event: str


class TransitionError(RuntimeError):
    """An event arrived in a state that does not allow it: a bug of ours, contained to
    the one instance by the supervisor."""
