"""The instance lifecycle: one source/sink instance or one function symbol, across all of
the workers that serve it in turn.

Every event the supervisor sees about an instance (a command from eKuiper, a frame from a
worker, a worker's exit, data on eKuiper's channel, a tick of the clock) is one method
here. A method checks the state it is called in and acts only through the effects
(``effects.py``), which unit tests replace with a recorder and a fake clock. What an event
means for the data (items, calls, acks) is the instance's route's (``kinds/``); every
state change goes through :meth:`Instance._move` and the table in ``states.py``.

Events about a worker that is no longer the instance's current one (late frames, a late
READY, a second exit report) and events after the instance was removed are ignored: the
supervisor's selector may hand over readiness that predates a transition.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .. import wire
from ..config import Settings
from . import frames
from .effects import Effects, WorkerHandle
from .forensics import DUMP_SIGNAL
from .health import Cause, RestartPolicy, restart_kind, verdict
from .kinds import PACKAGES, route_for
from .states import CRASHES, IDLE, LIVE, STANDING, TRANSITIONS, WAITING, Change, State, TransitionError
from .zygote import describe_status, signal_text

Answer = Callable[[bytes], None]
KINDS = PACKAGES   # a kind's name in messages is its package's
DUMP_GRACE = 0.05   # seconds a worker gets to write its stack before it is killed
RECENT_RESTARTS = 10  # crashes kept with their time and cause for `kuiper-pool status`
STARTING, RUNNING, BACKOFF, RECYCLING = State.STARTING, State.RUNNING, State.BACKOFF, State.RECYCLING
KILLING = State.KILLING
STOPPING, FAILED, ENDED, REMOVED = State.STOPPING, State.FAILED, State.ENDED, State.REMOVED


def internal_error(where: str, error: BaseException) -> str:
    """What eKuiper and the log are told of our own failure about the instance ``where``."""
    return f"{where}: internal error: {type(error).__name__}: {error}"


class Instance:
    """One source/sink instance or function symbol and the worker currently serving it."""

    def __init__(self, plugin: str, ctrl: wire.Control, settings: Settings, fx: Effects,
                 policy: Optional[RestartPolicy] = None) -> None:
        self.plugin = plugin
        self.ctrl = ctrl
        self.s = settings
        self.fx = fx
        self.policy = policy or RestartPolicy(settings)
        self._state = STARTING
        self.transitions: "Counter[Tuple[State, State]]" = Counter()
        self.worker: Optional[WorkerHandle] = None
        self.pending: Optional[Answer] = None       # the start/stop answer eKuiper waits for
        self.restart_at = 0.0
        self.restarts = 0
        self.failures = 0                           # times this instance went FAILED in a row
        self.restart_causes: "Counter[str]" = Counter()
        self.recent_restarts: Deque[Dict[str, Any]] = deque(maxlen=RECENT_RESTARTS)
        self._last_error = ""
        self.last_error_at = 0.0                    # wall clock, for an operator; 0: never
        self.running_since = 0.0
        self.items_in = 0
        self.items_out = 0
        self.errors = 0
        self.cpu_seconds = 0.0                      # of its own workers gone, as last sampled
        self.generation = fx.generation             # the code its settings (and last worker) are of
        self.route = route_for(self)

    # --- naming and the state -------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.ctrl.plugin_type

    @property
    def state(self) -> State:
        """Read only: every change goes through :meth:`_move`."""
        return self._state

    def where(self) -> str:
        return f"plugin {self.plugin} {self.ctrl.describe()}"

    @property
    def last_error(self) -> str:
        return self._last_error

    @last_error.setter
    def last_error(self, text: str) -> None:
        """Every error is stamped with when it happened (``kuiper-pool status`` shows it)."""
        self._last_error, self.last_error_at = text, time.time()

    def _move(self, new: State, event: str) -> None:
        """The one place a state changes: checked against TRANSITIONS, logged, counted and
        told to the listeners."""
        old = self._state
        if new not in TRANSITIONS[old]:
            raise TransitionError(f"{self.where()}: {event}: {old} -> {new} is not a transition")
        self._state = new
        self.transitions[(old, new)] += 1
        self.fx.note(self, logging.DEBUG, "%s -> %s: %s", old, new, event)
        self.fx.changed(self, Change(old, new, event))

    def _expect(self, event: str, *states: State) -> None:
        if self._state not in states:
            raise TransitionError(f"{self.where()}: {event} in state {self._state} "
                                  f"(expected {', '.join(map(str, states))})")

    def _current(self, w: WorkerHandle) -> bool:
        return self._state is not REMOVED and self.worker is w

    def answer(self, data: bytes) -> None:
        """Answer the command eKuiper waits on, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending(data)

    def counts(self) -> Tuple[int, int, int]:
        """Items in, items out and errors, with what the current worker reports so far."""
        n_in, n_out, errors = self.items_in, self.items_out, self.errors
        w = self.worker
        if w is not None:
            live_in, live_out, live_errors = self.route.counts(w)
            n_in, n_out = n_in + live_in, n_out + live_out
            errors += w.vitals.emit_errors + live_errors
        return n_in, n_out, errors

    def failed_text(self) -> str:
        return f"{self.where()} has failed: {self.last_error}"

    # --- commands from eKuiper --------------------------------------------------------------

    def begin(self, answer: Answer) -> None:
        """The first start: a worker is made; eKuiper gets its answer after READY."""
        self._expect("start", STARTING)
        self.pending = answer
        self._start_worker()

    def start_again(self, answer: Answer) -> None:
        """eKuiper sent start for an instance we have (it replays starts after restarts)."""
        if self._state is STOPPING:
            answer(wire.one_line(f"{self.where()} is still stopping"))
            return
        self._expect("start again", *STANDING)
        self.fx.note(self, logging.INFO, "start of an instance already %s: nothing to do", self._state)
        answer(wire.OK)

    def stop(self, answer: Answer) -> None:
        """eKuiper stops a source or sink: close runs in the worker, then the answer."""
        if self._state is STOPPING:  # already stopping (shutdown): answered when it is done
            self.pending = answer
            return
        self.pending = answer
        if self.worker is None:
            self._expect("stop", STARTING, *IDLE)
            self.remove(wire.OK)
        else:
            self.begin_stop()

    def shutdown(self, reason: str) -> None:
        """The supervisor is leaving: answer what waits, close what runs."""
        self.answer(wire.one_line(f"plugin {self.plugin} is shutting down: {reason}"))
        if self.worker is None:
            self.remove()
        elif self._state is not STOPPING:
            self.begin_stop()

    def begin_stop(self) -> None:
        """Ask the worker to close; it gets stop_grace, then SIGKILL. A worker being killed
        is not asked: its kill goes on."""
        w = self.worker
        if w is None:
            raise TransitionError(f"{self.where()}: stop without a worker")
        killing = self._state is KILLING
        self.route.on_stopping(w, self._state is RUNNING)
        self._move(STOPPING, "stop")
        if not killing:
            self.fx.send(w, frames.encode(frames.STOP))
            w.kill_at = self.fx.now() + self.s.stop_grace

    def remove(self, answer: Optional[bytes] = None) -> None:
        """Forget the instance: close eKuiper's channels, SIGKILL a worker still alive."""
        if self._state is REMOVED:
            return
        self._move(REMOVED, "remove")
        self.route.close()
        w, self.worker = self.worker, None
        if w is not None:
            self.fx.signal(w, signal.SIGKILL)
        self.fx.forget(self)
        if answer is not None:
            self.answer(answer)

    # --- workers ------------------------------------------------------------------------------

    def _spawn(self, event: str) -> None:
        self._move(STARTING, event)
        self._start_worker()

    def _start_worker(self) -> None:
        if self.generation < self.fx.generation:  # a reload: the new worker gets its settings
            self.s, self.generation = self.fx.settings_for(self.ctrl.symbol), self.fx.generation
        try:
            self.worker = self.fx.spawn(self)
        except OSError as e:
            self.worker = None
            self._cannot_spawn(e)

    def _cannot_spawn(self, e: OSError) -> None:
        text = f"{self.where()}: cannot start a worker: {e.strerror or e}"
        self.last_error = " ".join(text.split())
        self.fx.note(self, logging.ERROR, "%s", self.last_error)
        if self.pending is not None:  # the first start: refuse it, keep serving the rest
            self.remove(wire.one_line(text))
        else:
            self._crashed(None, "not started", text, restart_kind(None, False))

    def on_refused(self, w: WorkerHandle, error: OSError) -> None:
        """The zygote could not make worker ``w`` (fork failed)."""
        if self._current(w):
            self.worker = None
            self._cannot_spawn(error)

    def on_started(self, w: WorkerHandle, pid: int) -> None:
        if self._current(w):
            w.pid = pid

    def on_ready(self, w: WorkerHandle, error: Optional[str]) -> None:
        if not self._current(w) or self._state is not STARTING:
            return  # stopped or replaced meanwhile
        first = self.pending is not None
        if error:
            self.last_error = w.fault = " ".join(str(error).split())
            if first:  # eKuiper gets the configure error as the start answer
                self.fx.note(self, logging.WARNING, "start refused: %s", self.last_error)
                self.remove(wire.one_line(self.last_error))
            return  # on a restart the worker's exit counts as a crash
        try:
            self.route.open(first)
        except OSError as e:
            text = f"{self.where()}: cannot open eKuiper's channel: {e}"
            if first:
                self.fx.note(self, logging.WARNING, "start refused: %s", text)
                self.remove(wire.one_line(text))
            else:
                self.kill(w, Cause.NO_CHANNEL, " ".join(text.split()))  # a crash: retried with backoff
            return
        self._move(RUNNING, "ready")
        self.running_since = self.fx.now()
        self.failures = 0
        self.fx.note(self, logging.INFO, "%s in worker pid %d%s", "started" if first else "restarted", w.pid,
                     self.route.started_note())
        if first:
            self._answer_start()
            if self._state is REMOVED:
                return
        self.route.on_ready(w, first)

    def _answer_start(self) -> None:
        """Answer the first start once the route's channel is up, or refuse it when the
        route says it cannot come up; otherwise it waits (RUNNING, ``pending`` set)."""
        why = self.route.start_answer(self.fx.now())
        if why is None:
            return
        if why:
            text = f"{self.where()}: {why}"
            self.fx.note(self, logging.WARNING, "start refused: %s", text)
            self.remove(wire.one_line(text))
        else:
            self.answer(wire.OK)

    def _start_unanswered(self) -> bool:
        """Running, and the first start still waits for the route's channel."""
        return self._state is RUNNING and self.pending is not None

    def on_exit(self, w: WorkerHandle, status: int) -> None:
        """The zygote reaped worker ``w`` with wait status ``status``."""
        if not self._current(w):
            return
        self.worker = None
        how = describe_status(status)
        dump = self.fx.dump(w)  # the plugin code it was in, when it crashed or was killed
        cause = (w.kill_reason or w.fault or "exited unexpectedly") + (f" (at {dump.at})" if dump.at else "")
        # the signal we meant to end it with; SIGKILL even once sent, since nothing catches it:
        # a death by another signal then came before it (the zygote may report it only later)
        meant = w.pending_signal or (signal.SIGKILL if w.sigkill_sent else 0)
        if meant and os.WIFSIGNALED(status) and os.WTERMSIG(status) != meant:
            how, cause = self._ended_before_the_kill(meant, how, cause, dump.fatal)
        self.route.on_worker_gone(w, how, cause)
        self.errors += w.vitals.emit_errors
        if not w.shared:  # a shared worker's CPU is the process's, not this instance's
            self.cpu_seconds += w.vitals.cpu_seconds
        state = self._state
        if state is STOPPING:
            self.fx.note(self, logging.INFO, "stopped (worker pid %d %s)", w.pid, how)
            self.remove(wire.OK)
        elif state is RUNNING and self.route.recycled_itself(w, status):
            self.fx.note(self, logging.INFO, "recycling worker pid %d: served max_calls %d",
                         w.pid, self.s.max_calls)
            self._spawn("recycled itself")
        elif state is RECYCLING:
            self.fx.note(self, logging.INFO, "worker pid %d recycled (%s): %s", w.pid, how, w.kill_reason)
            self._spawn("recycled")
        elif state in CRASHES and self.pending is not None:  # first start unanswered
            before = "eKuiper's channel was up" if self.running_since else "it was ready"
            text = f"{self.where()}: worker pid {w.pid} exited with {how} before {before}: {cause}"
            self.last_error = " ".join(text.split())
            self.fx.note(self, logging.WARNING, "start refused: %s", self.last_error)
            self.remove(wire.one_line(text))
        elif state is RUNNING and self.route.ended(w, status):
            self._move(ENDED, "source ended")
            self.fx.note(self, logging.INFO, "ended: open returned (worker pid %d)", w.pid)
        elif state in CRASHES:
            self._crashed(w, how, cause, restart_kind(w.kill_cause, os.WIFSIGNALED(status)))
        else:
            raise TransitionError(f"{self.where()}: worker exit in state {state}")

    @staticmethod
    def _ended_before_the_kill(meant: int, how: str, cause: str, fatal: bool) -> Tuple[str, str]:
        """A worker we were killing died of a signal of its own between the stack dump we asked
        for and the signal ``meant`` (the dump crashed it, a handler of the plugin's...): the
        kill is reported as the kill it was, followed by what ended it first."""
        name = signal.Signals(meant).name
        first = (f"its stack dump, asked for before the {name}, crashed it first with {how}" if fatal
                 else f"it ended with {how} while dumping its stack, before the {name}")
        return signal_text(meant), f"{cause}; {first}"

    def _crashed(self, w: Optional[WorkerHandle], how: str, cause: str, kind: str) -> None:
        # every crash counts, the one that fails the instance too (it is retried later):
        # status and the metrics (the sum of the causes) agree
        self.restart_causes[kind] += 1
        self.restarts += 1
        self.recent_restarts.append({"at": time.time(), "cause": kind,
                                     "error": " ".join(f"{how}: {cause}".split())})
        pid = w.pid if w is not None else 0
        self.route.on_crashed(w, how, cause)
        now = self.fx.now()
        delay = self.policy.next_delay(now)
        if delay is None:
            self.last_error = " ".join((f"failed: worker ended {self.s.flap_max_restarts + 1} times "
                                        f"within {self.s.flap_window:g}s (flap_max_restarts "
                                        f"{self.s.flap_max_restarts}); last worker pid {pid} {how}: "
                                        f"{cause}").split())
            self._fail()
            return
        self._move(BACKOFF, "crash")
        self.restart_at = now + delay
        self.last_error = " ".join(f"worker pid {pid} {how}: {cause}".split())
        self.fx.note(self, logging.WARNING, "worker pid %d %s: %s; restart %d in %.3fs",
                     pid, how, cause, self.restarts, delay)
        if delay == 0:  # do not wait for the next tick
            self._spawn("restart")

    def _fail(self, close: bool = False) -> None:
        """Give up on the instance for now: everything waiting gets an error (``close``:
        then eKuiper's channels are closed, to be opened anew); a retry is scheduled after
        failed_retry_min, doubling up to failed_retry_max."""
        self._move(FAILED, "failed")
        self.failures += 1
        delay = min(self.s.failed_retry_max, self.s.failed_retry_min * 2 ** (self.failures - 1))
        self.restart_at = self.fx.now() + delay
        self.fx.note(self, logging.ERROR, "%s; next try in %gs", self.last_error, delay)
        try:
            self.route.on_failed()
        finally:
            if close:
                self.route.close()

    def retry_now(self) -> bool:
        """An operator's restart: a failed or backing-off instance starts at once, a running
        worker is recycled. False when there is nothing to restart."""
        if self._state in WAITING:
            self.policy.reset()
            self._spawn("operator restart")
            return True
        if self._state is RUNNING and self.worker is not None:
            self._recycle(self.worker, Cause.OPERATOR, "restart requested by an operator")
            return True
        return False

    def outdated(self, w: WorkerHandle) -> bool:
        """Whether ``w`` runs code older than a reload's: it is retired as soon as it holds
        nothing of eKuiper's, as in a recycle (its sink items finish or go to the next
        worker, a call in flight finishes; never a crash)."""
        return w.generation < self.fx.generation

    def kill(self, w: WorkerHandle, cause: Cause, why: str) -> None:
        """KILLING: dump its stack, SIGTERM (a function: SIGKILL) DUMP_GRACE later, SIGKILL
        after stop_grace; the route answers what the worker holds. A hung worker (stopped,
        deadlocked) can use no grace: it is continued to dump its stack, then SIGKILLed."""
        self._move(KILLING, cause.value)
        w.kill_reason, w.kill_cause = why, cause
        hung = cause is Cause.HANG
        now = self.fx.now()
        w.kill_at = now + DUMP_GRACE + (0.0 if hung else self.s.stop_grace)
        self.fx.note(self, logging.WARNING, "killing worker pid %d: %s", w.pid, why)
        self.route.on_kill(w, why)
        self.fx.signal(w, DUMP_SIGNAL)
        if hung:
            self.fx.signal(w, signal.SIGCONT)  # a stopped worker runs its dump handler
        w.pending_signal = signal.SIGKILL if hung else self.route.kill_signal
        w.signal_at = now + DUMP_GRACE

    def _recycle(self, w: WorkerHandle, cause: Cause, why: str) -> None:
        self._move(RECYCLING, "recycle")
        w.kill_reason, w.kill_cause = why, cause
        self.fx.note(self, logging.INFO, "recycling worker pid %d: %s", w.pid, why)
        self.fx.retire(w, why)  # a shared worker's other instances stay; the next one is fresh
        self.fx.send(w, frames.encode(frames.STOP))
        w.kill_at = self.fx.now() + self.s.stop_grace

    # --- frames from the current worker and eKuiper's channel ----------------------------------

    def on_frame(self, w: WorkerHandle, ftype: int, payload: bytes) -> None:
        if not self._current(w):
            return  # a late frame of a replaced or removed worker
        if ftype == frames.BEAT:
            beat = frames.Beat.decode(payload)
            v = w.vitals
            v.last_beat = self.fx.now()
            v.processed, v.busy_since, v.emit_errors = beat.processed, beat.busy_since, beat.emit_errors
            v.cpu_at_beat = beat.cpu
            v.cpu_mark = None
        elif ftype == frames.READY:
            self.on_ready(w, frames.Ready.decode(payload).error)
        elif ftype == frames.FAULT:
            self.last_error = w.fault = frames.Fault.decode(payload).error
        elif ftype == frames.PUT:
            self.fx.put_state(self, payload)
        else:
            self.route.on_frame(w, ftype, payload)

    def on_readable(self, endpoint: Any) -> None:
        """eKuiper's channel ``endpoint`` has data (a stale endpoint changes nothing)."""
        if self._state is not REMOVED:
            self.route.on_readable(endpoint)
            if self._start_unanswered():
                self._answer_start()

    # --- the clock ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.route.tick(now)
        if self._start_unanswered():
            self._answer_start()
            if self._state is REMOVED:
                return
        if self._state in WAITING and self.restart_at and now >= self.restart_at:
            if self._state is FAILED:
                self.fx.note(self, logging.INFO, "trying the failed instance again")
            self._spawn("retry")
            return
        w = self.worker
        if w is None or self.route.signal_deferred(w):
            return
        if w.pending_signal and now >= w.signal_at:
            self.fx.signal(w, w.pending_signal)
            w.sigkill_sent = w.sigkill_sent or w.pending_signal == signal.SIGKILL
            w.pending_signal = 0
        if w.kill_at and now >= w.kill_at:
            if self._state is RECYCLING and not w.held:
                until, w.held = self.route.runs_until(w)
                if now < until:  # its call in flight finishes here, bounded by its own deadline
                    # held once: a start time scribbled on the page cannot hold it longer
                    w.kill_at = min(until, now + self.s.call_deadline)
                    return
            w.kill_at = 0.0
            if w.held:  # its call overran while it was held: killed for the call's deadline
                w.kill_cause = Cause.DEADLINE
            w.kill_reason = (w.held or w.kill_reason
                             or f"did not exit within stop_grace {self.s.stop_grace:g}s")
            self.fx.signal(w, signal.SIGKILL)
            w.sigkill_sent = True
            return
        self.check_health(w, now)

    def check_health(self, w: WorkerHandle, now: float) -> None:
        """Kill a hung or overrunning worker, retire an outdated one or one whose shared
        process must end, recycle one over its limits."""
        if self._state not in LIVE:
            return
        self.route.observe(w)
        if self._state is STARTING and now - w.started_at > self.s.start_timeout:
            self.kill(w, Cause.START_TIMEOUT, f"start exceeded start_timeout {self.s.start_timeout:g}s "
                                              f"(factory, configure or open still running)")
            return
        found = verdict(w.vitals, now, self.s, self.kind, lambda: self.fx.cpu_seconds(w))
        if found is not None and found[0].kills:
            self.kill(w, *found)
        elif self._state is RUNNING and not self.route.busy():
            moving = self.fx.moving(w)
            if self.outdated(w):
                self._recycle(w, Cause.RELOAD, "reload")
            elif moving:
                self._recycle(w, Cause.SHARED, moving)
            elif found is not None:
                self._recycle(w, *found)

    # --- containment --------------------------------------------------------------------------------

    def contain(self, error: BaseException) -> None:
        """Our own bug or exhaustion while handling this instance: end only this instance
        (FAILED, retried later, its channels opened anew), answer what waits."""
        text = internal_error(self.where(), error)
        self.last_error = " ".join(text.split())
        starting = self.pending is not None  # a first start or a stop: nothing to keep
        try:
            self.answer(wire.one_line(text))
            w, self.worker = self.worker, None
            if w is not None:
                self.fx.signal(w, signal.SIGKILL)
        finally:
            if starting or self._state in (STOPPING, REMOVED):
                self.remove()
            else:
                self._fail(close=True)  # the route may be what failed
