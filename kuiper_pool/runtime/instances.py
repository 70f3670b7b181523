"""The instance state machine: one source/sink instance or one function symbol, across all
of the workers that serve it in turn.

Every event the supervisor sees about an instance (a command from eKuiper, a frame from a
worker, a worker's exit, data on eKuiper's channel, a tick of the clock) is one method
here. A method checks the state it is called in and acts only through :class:`Effects`,
which the supervisor implements (processes, sockets, logging) and unit tests replace with a
recorder and a fake clock, so event orderings are tested deterministically.

    STARTING --READY ok--> RUNNING --crash--> BACKOFF --delay--> STARTING
       |  \\--crash (restart)--> BACKOFF        |  \\--recycle--> RECYCLING --exit--> STARTING
       |                                      \\--stop--> STOPPING --exit--> REMOVED
       \\--first start fails / times out--> REMOVED (eKuiper gets the error)
    BACKOFF/STARTING --too many restarts in flap_window--> FAILED --failed_retry--> STARTING
    RUNNING --a source's open returned--> ENDED
    any state --internal error--> FAILED (contain)

Events about a worker that is no longer the instance's current one (late frames, a late
READY, a second exit report) and events after the instance was removed are ignored: the
supervisor's selector may hand over readiness that predates a transition.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Callable, Dict, List, Optional, Protocol, Tuple, Union

from .. import wire
from ..config import Settings
from . import frames
from .callpage import IDLE, EXECUTING, CallPage, call_crc
from .forensics import DUMP_SIGNAL
from .health import KILL, RECYCLE, RestartPolicy, Vitals, verdict
from .routes import FunctionRoute, SinkRoute
from .zygote import describe_status

STARTING = "starting"
RUNNING = "running"
BACKOFF = "backoff"
RECYCLING = "recycling"
STOPPING = "stopping"
FAILED = "failed"
ENDED = "ended"
REMOVED = "removed"     # forgotten by the supervisor; every later event is stale

Answer = Callable[[bytes], None]
Route = Union[SinkRoute, FunctionRoute]
KINDS = {wire.TYPE_SOURCE: "source", wire.TYPE_SINK: "sink", wire.TYPE_FUNC: "function"}
DUMP_GRACE = 0.05   # seconds a worker gets to write its stack before it is killed


class TransitionError(RuntimeError):
    """An event arrived in a state that does not allow it: a bug of ours, contained to
    the one instance by the supervisor."""


class WorkerHandle:
    """What the state machine knows of one worker process (its link lives in the supervisor)."""

    def __init__(self, wid: int, now: float) -> None:
        self.wid = wid
        self.pid = 0
        self.started_at = now
        self.vitals = Vitals(last_beat=now)
        self.kill_reason = ""
        self.fault = ""            # the error this worker reported (FAULT, READY) before exiting
        self.kill_at = 0.0          # when to escalate to SIGKILL
        self.page: Optional[CallPage] = None   # a function worker's call page (lent routes)
        self.call_seq = -1          # the page's call seen executing on the previous tick
        self.pending_signal = 0     # sent at signal_at, once its stack has been dumped
        self.signal_at = 0.0


class Effects(Protocol):
    """What a transition may do. The supervisor implements it; tests record it."""

    def now(self) -> float: ...
    def spawn(self, inst: "Instance") -> WorkerHandle: ...   # OSError when no process/fd can be had
    def send(self, w: WorkerHandle, frame: bytes) -> None: ...
    def signal(self, w: WorkerHandle, sig: int) -> None: ...
    def open_route(self, inst: "Instance", wait: bool = True) -> Route: ...  # OSError: channel fails
    def hand_over(self, w: WorkerHandle, route: FunctionRoute) -> None: ...  # lend the connection
    def watch(self, inst: "Instance", reading: bool) -> None: ...  # read eKuiper's channel or not
    def close_route(self, inst: "Instance", route: Route) -> None: ...
    def forget(self, inst: "Instance") -> None: ...
    def cpu_seconds(self, w: WorkerHandle) -> Optional[float]: ...
    def stack(self, w: WorkerHandle) -> str: ...   # the plugin frames of its last dump, or ""
    def note(self, inst: "Instance", level: int, msg: str, *args: object) -> None: ...


class Instance:
    """One source/sink instance or function symbol and the worker currently serving it."""

    def __init__(self, plugin: str, ctrl: wire.Control, settings: Settings, fx: Effects,
                 policy: Optional[RestartPolicy] = None) -> None:
        self.plugin = plugin
        self.ctrl = ctrl
        self.s = settings
        self.fx = fx
        self.policy = policy or RestartPolicy(settings)
        self.state = STARTING
        self.worker: Optional[WorkerHandle] = None
        self.route: Optional[Route] = None
        self.pending: Optional[Answer] = None       # the start/stop answer eKuiper waits for
        self.reading = False                        # eKuiper's sink channel is being read
        self.reopen_at = 0.0                        # when to dial a lost function channel again
        self.restart_at = 0.0
        self.restarts = 0
        self.failures = 0                           # times this instance went FAILED in a row
        self.restart_causes: Dict[str, int] = {}
        self.last_error = ""
        self.running_since = 0.0
        self.items_in = 0
        self.items_out = 0
        self.errors = 0

    # --- naming ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.ctrl.plugin_type

    def where(self) -> str:
        return f"plugin {self.plugin} {self.ctrl.describe()}"

    def _expect(self, event: str, *states: str) -> None:
        if self.state not in states:
            raise TransitionError(f"{self.where()}: {event} in state {self.state} "
                                  f"(expected {', '.join(states)})")

    def _move(self, new: str, event: str, *expected: str) -> None:
        self._expect(event, *expected)
        self.state = new

    def _current(self, w: WorkerHandle) -> bool:
        return self.state != REMOVED and self.worker is w

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
            v = w.vitals
            errors += v.emit_errors
            if self.kind == wire.TYPE_SOURCE:
                n_in, n_out = n_in + v.processed, n_out + v.processed
            if w.page is not None:
                st = w.page.read()
                n_in, n_out, errors = n_in + st.seq, n_out + st.done, errors + st.failed
        return n_in, n_out, errors

    # --- commands from eKuiper --------------------------------------------------------------

    def begin(self, answer: Answer) -> None:
        """The first start: a worker is made; eKuiper gets its answer after READY."""
        self._expect("start", STARTING)
        self.pending = answer
        self._spawn()

    def start_again(self, answer: Answer) -> None:
        """eKuiper sent start for an instance we have (it replays starts after restarts)."""
        if self.state == STOPPING:
            answer(wire.one_line(f"{self.where()} is still stopping"))
            return
        self._expect("start again", STARTING, RUNNING, BACKOFF, RECYCLING)
        self.fx.note(self, logging.INFO, "start of an instance already %s: nothing to do", self.state)
        answer(wire.OK)

    def stop(self, answer: Answer) -> None:
        """eKuiper stops a source or sink: close runs in the worker, then the answer."""
        if self.state == STOPPING:  # already stopping (shutdown): answered when it is done
            self.pending = answer
            return
        self.pending = answer
        if self.worker is None:
            self._expect("stop", BACKOFF, FAILED, ENDED, STARTING)
            self.remove(wire.OK)
        else:
            self.begin_stop()

    def shutdown(self, reason: str) -> None:
        """The supervisor is leaving: answer what waits, close what runs."""
        self.answer(wire.one_line(f"plugin {self.plugin} is shutting down: {reason}"))
        if self.worker is None:
            self.remove()
        elif self.state != STOPPING:
            self.begin_stop()

    def begin_stop(self) -> None:
        """Ask the worker to close; it gets stop_grace, then SIGKILL."""
        w = self.worker
        if w is None:
            raise TransitionError(f"{self.where()}: stop without a worker")
        route = self.route
        if isinstance(route, SinkRoute):
            self._read(False)
            if self.state == RUNNING:  # what eKuiper sent before closing its side
                self._deliver(w, route.take())
        self.state = STOPPING
        self.fx.send(w, frames.encode(frames.STOP))
        w.kill_at = self.fx.now() + self.s.stop_grace

    def remove(self, answer: Optional[bytes] = None) -> None:
        """Forget the instance: close eKuiper's channels, SIGKILL a worker still alive."""
        if self.state == REMOVED:
            return
        self.state = REMOVED
        route, self.route = self.route, None
        if route is not None:
            self.reading = False
            self.fx.close_route(self, route)
        w, self.worker = self.worker, None
        if w is not None:
            self.fx.signal(w, signal.SIGKILL)
        self.fx.forget(self)
        if answer is not None:
            self.answer(answer)

    # --- workers ------------------------------------------------------------------------------

    def _spawn(self) -> None:
        self.state = STARTING
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
            self._crashed(None, "not started", text)

    def on_refused(self, w: WorkerHandle, error: OSError) -> None:
        """The zygote could not make worker ``w`` (fork failed)."""
        if self._current(w):
            self.worker = None
            self._cannot_spawn(error)

    def on_started(self, w: WorkerHandle, pid: int) -> None:
        if self._current(w):
            w.pid = pid

    def on_ready(self, w: WorkerHandle, error: Optional[str]) -> None:
        if not self._current(w) or self.state != STARTING:
            return  # stopped or replaced meanwhile
        first = self.pending is not None
        if error:
            self.last_error = w.fault = " ".join(str(error).split())
            if first:  # eKuiper gets the configure error as the start answer
                self.fx.note(self, logging.WARNING, "start refused: %s", self.last_error)
                self.remove(wire.one_line(self.last_error))
            return  # on a restart the worker's exit counts as a crash
        if self.kind == wire.TYPE_SINK and self.route is None or self.kind == wire.TYPE_FUNC and first:
            try:  # the first start, or a sink retried after contain closed its channel
                self.route = self.fx.open_route(self)
            except OSError as e:
                text = f"{self.where()}: cannot open eKuiper's channel: {e}"
                if first:
                    self.fx.note(self, logging.WARNING, "start refused: %s", text)
                    self.remove(wire.one_line(text))
                else:
                    self.kill(w, " ".join(text.split()))  # a crash: retried with backoff
                return
        self._move(RUNNING, "ready", STARTING)
        self.running_since = self.fx.now()
        self.failures = 0
        self.fx.note(self, logging.INFO, "%s in worker pid %d", "started" if first else "restarted", w.pid)
        self.answer(wire.OK)
        route = self.route
        if isinstance(route, SinkRoute):
            self._redeliver(w, route, first)
            self.on_sink_readable()
        elif isinstance(route, FunctionRoute):
            self._serve_calls(w, route)
        elif self.kind == wire.TYPE_FUNC:  # after contain or a lost channel: dial again
            self._reopen(None)

    def on_exit(self, w: WorkerHandle, status: int) -> None:
        """The zygote reaped worker ``w`` with wait status ``status``."""
        if not self._current(w):
            return
        self.worker = None
        how = describe_status(status)
        at = self.fx.stack(w)  # the plugin code it was in, when it crashed or was killed
        cause = (w.kill_reason or w.fault or "exited unexpectedly") + (f" (at {at})" if at else "")
        self._take_back(w, how, cause)
        if self.kind == wire.TYPE_SOURCE:  # keep what this worker emitted
            self.items_in += w.vitals.processed
            self.items_out += w.vitals.processed
        self.errors += w.vitals.emit_errors
        if self.state == STOPPING:
            self.fx.note(self, logging.INFO, "stopped (worker pid %d %s)", w.pid, how)
            self.remove(wire.OK)
        elif (self.state == RUNNING and os.WIFEXITED(status)
              and os.WEXITSTATUS(status) == frames.EXIT_RECYCLED):
            self.fx.note(self, logging.INFO, "recycling worker pid %d: served max_calls %d",
                         w.pid, self.s.max_calls)
            self._spawn()
        elif self.state == RECYCLING:
            self.fx.note(self, logging.INFO, "worker pid %d recycled (%s): %s", w.pid, how, w.kill_reason)
            self._spawn()
        elif self.state == STARTING and self.pending is not None:  # died before READY, first start
            text = f"{self.where()}: worker pid {w.pid} exited with {how} before it was ready: {cause}"
            self.last_error = " ".join(text.split())
            self.fx.note(self, logging.WARNING, "start refused: %s", self.last_error)
            self.remove(wire.one_line(text))
        elif (self.kind == wire.TYPE_SOURCE and self.state == RUNNING and os.WIFEXITED(status)
              and os.WEXITSTATUS(status) == 0 and not w.kill_reason):
            self._move(ENDED, "source ended", RUNNING)
            self.fx.note(self, logging.INFO, "ended: open returned (worker pid %d)", w.pid)
        elif self.state in (STARTING, RUNNING):
            self._crashed(w, how, cause)
        else:
            raise TransitionError(f"{self.where()}: worker exit in state {self.state}")

    def _crashed(self, w: Optional[WorkerHandle], how: str, cause: str) -> None:
        kind = ("hang" if cause.startswith("hung") else
                "deadline" if "deadline" in cause or "start_timeout" in cause else
                "signal" if how.startswith("signal") else "exit")
        self.restart_causes[kind] = self.restart_causes.get(kind, 0) + 1
        pid = w.pid if w is not None else 0
        route = self.route
        if isinstance(route, FunctionRoute) and route.call is not None and route.forwarded:
            self.errors += 1
            route.reply(wire.func_error(f"{self.where()}: worker pid {pid} died during the call "
                                        f"({how}; {cause}); it is being restarted"))
        now = self.fx.now()
        delay = self.policy.next_delay(now)
        if delay is None:
            self.last_error = " ".join((f"failed after {self.s.flap_max_restarts} restarts within "
                                        f"{self.s.flap_window:g}s; last worker pid {pid} {how}: "
                                        f"{cause}").split())
            self._fail()
            return
        self.restarts += 1
        self.state = BACKOFF
        self.restart_at = now + delay
        self.last_error = " ".join(f"worker pid {pid} {how}: {cause}".split())
        self.fx.note(self, logging.WARNING, "worker pid %d %s: %s; restart %d in %.3fs",
                     pid, how, cause, self.restarts, delay)
        if delay == 0:  # do not wait for the next tick
            self._spawn()

    def _fail(self) -> None:
        """Give up on the instance for now: everything waiting gets an error; a retry is
        scheduled after failed_retry_min, doubling up to failed_retry_max."""
        self.state = FAILED
        self.failures += 1
        delay = min(self.s.failed_retry_max, self.s.failed_retry_min * 2 ** (self.failures - 1))
        self.restart_at = self.fx.now() + delay
        self.fx.note(self, logging.ERROR, "%s; next try in %gs", self.last_error, delay)
        route = self.route
        if isinstance(route, FunctionRoute) and route.call is not None:
            self.errors += 1
            route.reply(wire.func_error(self.failed_text()))
        elif isinstance(route, SinkRoute):
            if route.inflight:  # eKuiper waits for their acks
                lost = route.fail_all(self.failed_text())
                self.errors += lost
                self.fx.note(self, logging.ERROR, "dropped %d unfinished item(s)", lost)
            self._read(route.require_ack)  # refuse with error acks; without acks stop reading

    def failed_text(self) -> str:
        return f"{self.where()} has failed: {self.last_error}"

    def retry_now(self) -> bool:
        """An operator's restart: a failed or backing-off instance starts at once, a running
        worker is recycled. False when there is nothing to restart."""
        if self.state in (FAILED, BACKOFF):
            self.policy.reset()
            self._spawn()
            return True
        if self.state == RUNNING and self.worker is not None:
            self._recycle(self.worker, "restart requested by an operator")
            return True
        return False

    def kill(self, w: WorkerHandle, why: str) -> None:
        """Dump its stack, SIGTERM (a function: SIGKILL) DUMP_GRACE later, SIGKILL after
        stop_grace; answer a relayed call it holds right away."""
        if w.kill_reason:
            return
        w.kill_reason = why
        now = self.fx.now()
        w.kill_at = now + DUMP_GRACE + self.s.stop_grace
        self.fx.note(self, logging.WARNING, "killing worker pid %d: %s", w.pid, why)
        route = self.route
        if isinstance(route, FunctionRoute) and route.call is not None and route.forwarded:
            self.errors += 1
            route.reply(wire.func_error(f"{self.where()}: {why}; the worker is being replaced"))
        self.fx.signal(w, DUMP_SIGNAL)
        # a function has no close to run, and a lent call is answered after the exit
        w.pending_signal = signal.SIGKILL if self.kind == wire.TYPE_FUNC else signal.SIGTERM
        w.signal_at = now + DUMP_GRACE

    def _recycle(self, w: WorkerHandle, why: str) -> None:
        self._move(RECYCLING, "recycle", RUNNING)
        w.kill_reason = why
        self.fx.note(self, logging.INFO, "recycling worker pid %d: %s", w.pid, why)
        self.fx.send(w, frames.encode(frames.STOP))
        w.kill_at = self.fx.now() + self.s.stop_grace

    # --- frames from the current worker ----------------------------------------------------------

    def on_frame(self, w: WorkerHandle, ftype: int, payload: bytes) -> None:
        if not self._current(w):
            return  # a late frame of a replaced or removed worker
        if ftype == frames.BEAT:
            beat = frames.decode_json(payload)
            v = w.vitals
            v.last_beat = self.fx.now()
            v.processed, v.busy_since = int(beat["n"]), float(beat["busy"])
            v.emit_errors = int(beat.get("e", 0))
            v.cpu_at_beat = beat.get("cpu")
            v.cpu_mark = None
        elif ftype == frames.READY:
            self.on_ready(w, frames.decode_json(payload)["error"])
        elif ftype == frames.FAULT:
            self.last_error = w.fault = " ".join(str(frames.decode_json(payload)["error"]).split())
        elif ftype in (frames.DONE, frames.ACK):
            self._on_sink_progress(ftype, payload)
        elif ftype == frames.REPLY:
            self._on_reply(w, payload)
        elif ftype == frames.LOST:  # eKuiper closed the lent connection: dial it again
            self._take_back(w, "")
        else:
            raise ValueError(f"unknown frame type {ftype} from worker pid {w.pid}")

    def _on_sink_progress(self, ftype: int, payload: bytes) -> None:
        route = self.route
        if not isinstance(route, SinkRoute):
            return  # the route is closed (stopping, removed): nothing waits for it
        seq, data = frames.split_seq(payload)
        before = len(route.inflight)
        if ftype == frames.ACK:  # acked is finished: no DONE follows for it
            route.acked(seq, data)
            route.finish(seq)
        else:
            route.done(seq)
        self.items_out += before - len(route.inflight)
        if self.state == RUNNING and not self.reading and not route.full():
            self._read(True)

    def _on_reply(self, w: WorkerHandle, payload: bytes) -> None:
        route = self.route
        if not isinstance(route, FunctionRoute):
            return
        call_id, data = frames.split_seq(payload)
        if route.call is None or not route.forwarded or call_id != route.call_id:
            return  # answered already (deadline, crash): a late reply is never the next answer
        w.vitals.call_started = 0.0
        self.items_out += 1
        if data.startswith(b'{"state": false'):
            self.errors += 1
        route.reply(data)
        if self.s.max_calls:  # recycle before the next call, not at the next tick
            self._check_health(w, self.fx.now())

    # --- eKuiper's channel ------------------------------------------------------------------------

    def _read(self, on: bool) -> None:
        if on != self.reading:
            self.reading = on
            self.fx.watch(self, on)

    def on_sink_readable(self) -> None:
        route = self.route
        if not isinstance(route, SinkRoute) or self.state == REMOVED:
            return
        if self.state == FAILED:
            self.errors += route.refuse(self.failed_text())
            if not route.require_ack:
                self._read(False)  # no acks to answer with: let eKuiper's sends time out
            return
        if self.state == STOPPING:
            self._read(False)
            return
        w = self.worker
        running = self.state == RUNNING and w is not None
        items = route.take(running)
        self.items_in += len(items)
        if running:
            self._deliver(w, items)
        self._read(not route.full())  # back-pressure: DONE frames resume reading

    def _deliver(self, w: WorkerHandle, items: List[Tuple[int, bytes]]) -> None:
        if items:
            self.fx.send(w, frames.encode_items(items[0][0], [data for _seq, data in items]))

    def _redeliver(self, w: WorkerHandle, route: SinkRoute, first: bool) -> None:
        if first:
            return
        again, poison = route.redeliver()
        if poison:
            self.errors += len(poison)
            self.fx.note(self, logging.ERROR, "dropped %d item(s) that ended a worker %d times: %s",
                         len(poison), self.s.sink_max_deliveries, poison)
        if again:
            self.fx.note(self, logging.INFO, "redelivering %d unfinished item(s)", len(again))
            self._deliver(w, again)

    def on_call(self) -> None:
        route = self.route
        if not isinstance(route, FunctionRoute) or route.lent or self.state == REMOVED:
            return
        call = route.take(self.fx.now())
        if call is None:
            return
        self.items_in += 1
        owed, route.owed = route.owed, None  # only the first call after a reconnect can be it
        w = self.worker
        if owed is not None and call_crc(call) == owed[0]:
            self.errors += 1
            route.reply(wire.func_error(owed[1]))  # eKuiper re-sent the call a dead worker began
        elif self.state == FAILED:
            self.errors += 1
            route.reply(wire.func_error(self.failed_text()))
        elif self.state == RUNNING and w is not None and not w.kill_reason:
            self._serve_calls(w, route)
        # otherwise the call waits for the (re)started worker, within call_deadline

    def _serve_calls(self, w: WorkerHandle, route: FunctionRoute) -> None:
        """A ready worker takes over: the whole connection (lendable) or the waiting call."""
        if route.lendable:
            if not route.channel.connected():
                return  # redialing: the first call that arrives brings the worker in
            if route.call is not None:
                self.items_in -= 1  # the worker counts the calls it runs (call page)
            self.fx.hand_over(w, route)
        elif route.call is not None:
            self._forward(w, route)

    def _take_back(self, w: WorkerHandle, how: str, cause: str = "") -> None:
        """A function worker that held eKuiper's connection is gone (or lost it): count its
        calls, remember a call it had begun, and dial eKuiper again."""
        route = self.route
        if not isinstance(route, FunctionRoute) or not route.lent:
            return
        owed = None
        page = w.page
        if page is not None:
            st = page.read()
            self.items_in += st.seq
            self.items_out += st.done
            self.errors += st.failed
            if how and st.state != IDLE:
                owed = (st.crc, f"{self.where()}: worker pid {w.pid} died during the call "
                                 f"({how}; {cause}); it is being restarted")
            w.page, page = None, None
        self.route = None
        self.fx.close_route(self, route)
        self._reopen(owed)

    def _reopen(self, owed: Optional[Tuple[int, str]]) -> None:
        try:
            route = self.fx.open_route(self, wait=False)  # never block the loop: redial in ticks
        except OSError as e:
            self.reopen_at = self.fx.now() + 1.0
            self.last_error = " ".join(f"cannot reach eKuiper's function channel: {e}".split())
            self.fx.note(self, logging.WARNING, "%s; trying again in 1s", self.last_error)
            return
        assert isinstance(route, FunctionRoute)
        route.owed = owed
        self.route = route
        w = self.worker
        if self.state == RUNNING and w is not None and not w.kill_reason and owed is None:
            self._serve_calls(w, route)

    def _forward(self, w: WorkerHandle, route: FunctionRoute) -> None:
        route.forwarded = True
        w.vitals.call_started = self.fx.now()
        w.vitals.calls += 1
        self.fx.send(w, frames.encode_seq(frames.CALL, route.call_id, route.call or b""))

    # --- the clock ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        route, w = self.route, self.worker
        if route is None and self.kind == wire.TYPE_FUNC and self.reopen_at and now >= self.reopen_at:
            self.reopen_at = 0.0
            self._reopen(None)
            route = self.route
        if isinstance(route, FunctionRoute) and not route.lent:
            route.channel.tick(now)
            if (route.call is not None and not route.forwarded
                    and now - route.arrived > self.s.call_deadline):
                self.errors += 1
                route.reply(wire.func_error(
                    f"{self.where()}: no worker became ready within call_deadline "
                    f"{self.s.call_deadline:g}s ({self.state}: {self.last_error})"))
        if self.state in (BACKOFF, FAILED) and self.restart_at and now >= self.restart_at:
            if self.state == FAILED:
                self.fx.note(self, logging.INFO, "trying the failed instance again")
            self._spawn()
            return
        if w is None:
            return
        if w.pending_signal and now >= w.signal_at:
            self.fx.signal(w, w.pending_signal)
            w.pending_signal = 0
        if w.kill_at and now >= w.kill_at:
            w.kill_at = 0.0
            w.kill_reason = w.kill_reason or f"did not exit within stop_grace {self.s.stop_grace:g}s"
            self.fx.signal(w, signal.SIGKILL)
            return
        self._check_health(w, now)

    def _check_health(self, w: WorkerHandle, now: float) -> None:
        if self.state not in (STARTING, RUNNING) or w.kill_reason:
            return
        if w.page is not None:
            self._read_page(w)
        if self.state == STARTING and now - w.started_at > self.s.start_timeout:
            self.kill(w, f"start exceeded start_timeout {self.s.start_timeout:g}s "
                         f"(factory, configure or open still running)")
            return
        found = verdict(w.vitals, now, self.s, self.kind, lambda: self.fx.cpu_seconds(w))
        if found is None:
            return
        action, why = found
        route = self.route
        if action == KILL:
            self.kill(w, why)
        elif action == RECYCLE and self.state == RUNNING and not (
                isinstance(route, FunctionRoute) and route.call is not None):
            self._recycle(w, why)

    def _read_page(self, w: WorkerHandle) -> None:
        """What a worker that owns eKuiper's connection is doing: the running call counts
        for call_deadline once two ticks saw the same call (a torn read never kills)."""
        st = w.page.read() if w.page is not None else None
        if st is None:
            return
        v = w.vitals
        v.calls = st.seq
        if st.state == EXECUTING and w.call_seq == st.seq:
            v.call_started = st.started
        else:
            v.call_started = 0.0
        w.call_seq = st.seq if st.state == EXECUTING else -1

    # --- containment --------------------------------------------------------------------------------

    def contain(self, error: BaseException) -> None:
        """Our own bug or exhaustion while handling this instance: end only this instance
        (FAILED, retried later), answer what waits, never raise."""
        text = f"{self.where()}: internal error: {type(error).__name__}: {error}"
        self.last_error = " ".join(text.split())
        starting = self.pending is not None  # a first start or a stop: nothing to keep
        try:
            self.answer(wire.one_line(text))
            route = self.route
            if isinstance(route, FunctionRoute) and route.call is not None:
                route.reply(wire.func_error(text))
            w, self.worker = self.worker, None
            if w is not None:
                self.fx.signal(w, signal.SIGKILL)
            route, self.route = self.route, None  # it may be what failed: opened anew on retry
            self.reading = False
            if route is not None:
                self.fx.close_route(self, route)
        finally:
            if starting or self.state in (STOPPING, REMOVED):
                self.remove()
            else:
                self.state = FAILED
                self.failures += 1
                self.restart_at = self.fx.now() + self.s.failed_retry_min

