"""The instance state machine through its seam: event orderings, deterministically.

``Instance`` acts only through ``Effects``; here a recorder plays the supervisor, a number
plays the clock, and in-memory endpoints play eKuiper's sockets (the real ones are tested
against pynng in test_transport.py). No process, no socket, no sleep: each test sets up one
ordering of events that real timing produces only sometimes (a late frame, a stale readiness
event, a crash during a start, a deadline and a crash in the same tick) and checks what
eKuiper is answered and what the instance does.
"""
from __future__ import annotations

import errno
import os
import signal
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from kuiper_pool import wire
from kuiper_pool.api import PluginConfig
from kuiper_pool.config import load_settings
from kuiper_pool.runtime import frames
from kuiper_pool.runtime.effects import WorkerHandle
from kuiper_pool.runtime.kinds.function import frames as fnframes
from kuiper_pool.runtime.kinds.function import page as callpage
from kuiper_pool.runtime.kinds.function.channel import FunctionChannel
from kuiper_pool.runtime.kinds.sink import frames as sinkframes
from kuiper_pool.runtime.kinds.sink import page as sinkpage
from kuiper_pool.runtime.kinds.sink.page import SinkPage
from kuiper_pool.runtime.kinds.sink.route import ACK_BACKLOG, RELAY_AFTER_LARGE, SinkRoute
from kuiper_pool.runtime.forensics import Dump
from kuiper_pool.runtime.health import Cause
from kuiper_pool.runtime.instances import (BACKOFF, ENDED, FAILED, RECYCLING, REMOVED, RUNNING,
                                           STARTING, STOPPING, Instance)
from kuiper_pool.runtime.states import TRANSITIONS, TransitionError
from kuiper_pool.runtime.supervisor import Supervisor
from kuiper_pool.transport import TransportError

EXIT_0 = 0                    # wait statuses as the zygote reports them
EXIT_70 = 70 << 8            # the worker caught an exception in plugin code
KILLED = signal.SIGKILL       # WIFSIGNALED with SIGKILL


class MemoryPull:
    """eKuiper's sink data as a list."""

    def __init__(self) -> None:
        self.queue: List[bytes] = []
        self.closed = False
        self.idle = True       # the connection can be lent (nothing of it buffered here)
        self.lent = False

    def fileno(self) -> int:
        return 99

    def recv_many(self, n: int) -> List[bytes]:
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def close(self) -> None:
        self.closed = True


class MemoryPush:
    def __init__(self) -> None:
        self.sent: List[bytes] = []
        self.closed = False
        self.backlog = 0   # bytes of acks eKuiper has not read yet

    def fileno(self) -> int:
        return 97

    def send(self, data: bytes) -> None:
        if self.closed:
            raise TransportError("closed")
        self.sent.append(data)

    def send_rest(self, data: bytes) -> None:
        self.sent.append(b"rest:" + data)
        self.backlog += len(data)

    def pending(self) -> int:
        return self.backlog

    def pump(self, now: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class MemoryReq:
    """eKuiper's function channel: calls queued by the test, replies recorded."""

    def __init__(self) -> None:
        self.calls: List[bytes] = []
        self.replies: List[bytes] = []
        self.closed = False
        self.up = True   # connected (headers exchanged)

    def fileno(self) -> int:
        return 98

    def connected(self) -> bool:
        return self.up

    def recv(self) -> Optional[bytes]:
        return self.calls.pop(0) if self.calls else None

    def send(self, data: bytes) -> None:
        self.replies.append(data)

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class LendableReq(MemoryReq):
    """A native function channel: the connection itself can be lent to a worker."""

    def __init__(self) -> None:
        super().__init__()
        self.detached = False

    def detach(self):
        self.detached = True
        return "conn", 0x80000007, b""


class Recorder:
    """Effects: what the supervisor would do, recorded; time is ``self.t``. It is each
    kind's I/O object too (``io``: the sink's and the function's channel.py)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.next_wid = 1
        self.workers: List[WorkerHandle] = []
        self.sent: List[Tuple[int, int, bytes]] = []     # (wid, frame type, payload)
        self.signals: List[Tuple[int, int]] = []
        self.retired: List[int] = []                       # workers recycled (their process takes no new instance)
        self.dumps: Dict[int, Dump] = {}                  # wid -> what its stack dump says
        self.watching: List[bool] = []
        self.closed_routes: List[Any] = []
        self.forgotten: List[Instance] = []
        self.notes: List[str] = []
        self.spawn_error: Optional[OSError] = None
        self.route_error: Optional[OSError] = None
        self.cpu: Optional[float] = None
        self.endpoints: Any = None
        self.lendable = False
        self.handoffs: List[Tuple[int, Any]] = []
        self.channels: List[MemoryReq] = []
        self.worker_pages: Dict[int, SinkPage] = {}   # a sink worker's own mapping of its page
        self.channel_up = True   # whether a function channel is connected when opened

    def now(self) -> float:
        return self.t

    def spawn(self, inst: Instance) -> WorkerHandle:
        if self.spawn_error is not None:
            raise self.spawn_error
        w = WorkerHandle(self.next_wid, self.t)
        w.pid = 5000 + self.next_wid
        fd = inst.route.open_page(w, self.lendable)   # a call page or a collect mark
        if fd is not None:
            if isinstance(w.page, SinkPage):
                self.worker_pages[w.wid] = SinkPage(fd)   # the worker's side
            os.close(fd)
        self.next_wid += 1
        self.workers.append(w)
        return w

    def send(self, w: WorkerHandle, frame: bytes, fds: Sequence[int] = ()) -> bool:
        ftype, payload = frames.HEADER.unpack_from(frame)[0], frame[frames.HEADER.size:]
        self.sent.append((w.wid, ftype, payload))
        return True

    def io(self, cls: Any) -> "Recorder":
        return self

    def signal(self, w: WorkerHandle, sig: int) -> None:
        self.signals.append((w.wid, sig))

    def retire(self, w: WorkerHandle, why: str) -> None:
        self.retired.append(w.wid)

    def open_sink(self, inst: Instance) -> Tuple[MemoryPull, MemoryPush]:
        if self.route_error is not None:
            raise self.route_error
        self.endpoints = (MemoryPull(), MemoryPush())
        return self.endpoints

    def close_sink(self, inst: Instance, pull: Any, ack: Any) -> None:
        self.closed_routes.append((pull, ack))
        pull.close()
        ack.close()

    def open_function(self, inst: Instance) -> FunctionChannel:
        if self.route_error is not None:
            raise self.route_error
        self.endpoints = LendableReq() if self.lendable else MemoryReq()
        self.endpoints.up = self.channel_up
        self.channels.append(self.endpoints)
        return FunctionChannel(self.endpoints, lendable=self.lendable)

    def close_function(self, inst: Instance, channel: FunctionChannel) -> None:
        self.closed_routes.append(channel)
        channel.close()

    def hand_over(self, w: WorkerHandle, handoff: Any) -> None:
        self.handoffs.append((w.wid, handoff))

    def lend_sink(self, w: WorkerHandle, pull: Any, ack: Any) -> bool:
        if not (self.lendable and isinstance(w.page, SinkPage) and pull.idle and not pull.lent
                and not ack.pending()):
            return False
        pull.lent = True
        self.handoffs.append((w.wid, "sink"))
        return True

    def take_back_sink(self, pull: Any) -> None:
        pull.lent = False

    def watch(self, inst: Instance, endpoint: Any, reading: bool) -> None:
        if isinstance(endpoint, MemoryPull):  # the sink's reading; a function's is always on
            self.watching.append(reading)

    def forget(self, inst: Instance) -> None:
        self.forgotten.append(inst)

    def cpu_seconds(self, w: WorkerHandle) -> Optional[float]:
        return self.cpu

    def dump(self, w: WorkerHandle) -> Dump:
        return self.dumps.get(w.wid, Dump("", False))

    def note(self, inst: Instance, level: int, msg: str, *args: object) -> None:
        self.notes.append(msg % args)

    # helpers for the tests
    def frames_of(self, ftype: int) -> List[bytes]:
        return [p for _w, t, p in self.sent if t == ftype]


SETTINGS = dict(restart_backoff_initial=0.0, restart_backoff_min=0.5, restart_backoff_max=5.0,
                restart_jitter=0.0, flap_max_restarts=3, flap_window=60.0, stop_grace=2.0,
                call_deadline=4.0, start_timeout=10.0, heartbeat_interval=0.5,
                heartbeat_misses=4, failed_retry_min=60.0, failed_retry_max=600.0)


def control(kind: str, **config: Any) -> wire.Control:
    if kind == wire.TYPE_FUNC:
        return wire.Control("start", "fn", kind)
    return wire.Control("start", "sym", kind, "rule1", "op1", 0, "", dict(config))


def make(kind: str = wire.TYPE_SINK, lendable: bool = False,
         **overrides: Any) -> Tuple[Instance, Recorder, List[bytes]]:
    """A started instance whose first worker has not said READY yet, and eKuiper's answers."""
    fx = Recorder()
    fx.lendable = lendable
    s = load_settings(overrides={**SETTINGS, **overrides}, environ={})
    config = {"requireAck": True} if kind == wire.TYPE_SINK else {}
    inst = Instance("plug", control(kind, **config), s, fx)
    answers: List[bytes] = []
    inst.begin(answers.append)
    return inst, fx, answers


def ready(inst: Instance, w: WorkerHandle, error: Optional[str] = None) -> None:
    give(inst, w, frames.Ready(error).encode())


def running(kind: str = wire.TYPE_SINK, **overrides: Any) -> Tuple[Instance, Recorder, List[bytes]]:
    inst, fx, answers = make(kind, **overrides)
    ready(inst, fx.workers[-1])
    assert inst.state == RUNNING and answers == [wire.OK]
    return inst, fx, answers


def beat(inst: Instance, w: WorkerHandle, busy: float = 0.0) -> None:
    give(inst, w, frames.Beat(0, busy, 0.0).encode())


def assert_killed(inst: Instance, fx: Recorder, w: WorkerHandle, sig: int) -> None:
    """A kill dumps the worker's stack first (SIGUSR1), then signals it DUMP_GRACE later."""
    assert fx.signals == [(w.wid, signal.SIGUSR1)]
    fx.t += 0.06
    beat(inst, w)
    inst.tick(fx.t)
    assert fx.signals == [(w.wid, signal.SIGUSR1), (w.wid, sig)]


def done(inst: Instance, w: WorkerHandle, upto: int) -> None:
    give(inst, w, sinkframes.Done(upto).encode())


def reply(inst: Instance, w: WorkerHandle, call_id: int, data: bytes, ok: bool = True) -> None:
    give(inst, w, fnframes.Reply(call_id, data, ok).encode())


def give(inst: Instance, w: WorkerHandle, frame: bytes) -> None:
    """``frame`` (a whole frame, as a worker sends it) arrives from ``w``."""
    ftype, payload = frames.HEADER.unpack_from(frame)[0], frame[frames.HEADER.size:]
    inst.on_frame(w, ftype, payload)


# --- starts ---------------------------------------------------------------------------------------

def test_the_start_is_answered_after_ready_and_the_route_opens_then():
    inst, fx, answers = make()
    assert answers == [] and inst.state == STARTING and inst.route.pull is None
    ready(inst, fx.workers[0])
    assert answers == [wire.OK] and isinstance(inst.route, SinkRoute) and fx.watching == [True]


def test_a_crash_report_during_the_first_start_refuses_it_with_the_cause():
    inst, fx, answers = make()
    w = fx.workers[0]
    inst.on_frame(w, frames.READY, b'{"error": "plugin plug sink sym: configure failed: ValueError: bad"}')
    inst.on_exit(w, 3 << 8)  # the exit of a refused start changes nothing more
    assert answers == [b"plugin plug sink sym: configure failed: ValueError: bad"]
    assert inst.state == REMOVED and fx.forgotten == [inst] and fx.workers == [w]


def test_a_worker_dying_before_ready_on_the_first_start_is_the_start_answer():
    inst, fx, answers = make()
    inst.on_exit(fx.workers[0], KILLED)
    assert len(answers) == 1 and b"exited with signal 9 (SIGKILL) before it was ready" in answers[0]
    assert inst.state == REMOVED and len(fx.workers) == 1  # not restarted: eKuiper has the error


def test_a_crash_during_a_restart_start_counts_as_a_crash_and_backs_off():
    inst, fx, answers = running()
    inst.on_exit(fx.workers[0], KILLED)          # crash: restart at once (initial backoff 0)
    assert inst.state == STARTING and len(fx.workers) == 2
    inst.on_exit(fx.workers[1], EXIT_70)          # the restart dies before READY
    assert inst.state == BACKOFF and inst.restart_at == pytest.approx(fx.t + 0.5)
    assert answers == [wire.OK]                   # eKuiper hears nothing of restarts


def test_a_start_that_hangs_is_killed_at_start_timeout_and_the_answer_says_why():
    inst, fx, answers = make()
    w = fx.workers[0]
    for _ in range(99):  # it keeps beating: slow, not hung
        fx.t += 0.1
        beat(inst, w)
        inst.tick(fx.t)
    assert fx.signals == []
    fx.t += 0.2
    beat(inst, w)
    inst.tick(fx.t)
    assert_killed(inst, fx, w, signal.SIGTERM)
    inst.on_exit(w, signal.SIGTERM)
    assert len(answers) == 1 and b"start exceeded start_timeout 10s" in answers[0]
    assert b"signal 15" in answers[0] and inst.state == REMOVED


def test_no_process_or_fd_to_be_had_refuses_the_one_start():
    fx = Recorder()
    fx.spawn_error = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    inst = Instance("plug", control(wire.TYPE_SINK), load_settings(overrides=SETTINGS, environ={}), fx)
    answers: List[bytes] = []
    inst.begin(answers.append)
    assert answers == [b"plugin plug sink sym rule rule1 op op1 instance 0: cannot start a worker: "
                       b"Too many open files"]
    assert inst.state == REMOVED and fx.forgotten == [inst]


def test_no_fd_for_a_restart_backs_off_instead_of_failing_everything():
    inst, fx, answers = running()
    fx.spawn_error = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    inst.on_exit(fx.workers[0], KILLED)
    assert inst.state == BACKOFF and "Too many open files" in inst.last_error
    fx.spawn_error = None
    fx.t = inst.restart_at
    inst.tick(fx.t)
    assert inst.state == STARTING and len(fx.workers) == 2


def test_a_fork_the_zygote_could_not_make_refuses_the_first_start_and_backs_off_a_restart():
    eagain = OSError(errno.EAGAIN, "cannot fork: " + os.strerror(errno.EAGAIN))
    inst, fx, answers = make()
    inst.on_refused(fx.workers[0], eagain)
    assert answers == [b"plugin plug sink sym rule rule1 op op1 instance 0: cannot start a worker: "
                       b"cannot fork: Resource temporarily unavailable"]
    assert inst.state == REMOVED
    inst, fx, answers = running()
    inst.on_exit(fx.workers[0], KILLED)
    inst.on_refused(fx.workers[1], eagain)
    assert inst.state == BACKOFF and "cannot fork" in inst.last_error and answers == [wire.OK]
    inst.on_refused(fx.workers[0], eagain)      # about a worker long gone: nothing
    assert inst.state == BACKOFF


def test_eKuiper_channel_that_cannot_be_opened_refuses_the_start():  # noqa: N802
    inst, fx, answers = make()
    fx.route_error = TransportError("cannot listen on ipc:///tmp/x.ipc: Address in use")
    ready(inst, fx.workers[0])
    assert len(answers) == 1 and b"cannot open eKuiper's channel" in answers[0]
    assert inst.state == REMOVED and fx.signals == [(1, signal.SIGKILL)]


# --- stops, replays, late events ---------------------------------------------------------------------

def test_a_start_replayed_while_stopping_is_refused_and_changes_nothing():
    inst, fx, answers = running()
    inst.stop(answers.append)
    assert inst.state == STOPPING
    replay: List[bytes] = []
    inst.start_again(replay.append)
    assert replay == [b"plugin plug sink sym rule rule1 op op1 instance 0 is still stopping"]
    assert inst.state == STOPPING and len(fx.workers) == 1


def test_a_start_replayed_while_running_is_ok_and_starts_nothing():
    inst, fx, _ = running()
    replay: List[bytes] = []
    inst.start_again(replay.append)
    assert replay == [wire.OK] and len(fx.workers) == 1 and inst.state == RUNNING


def test_a_stop_during_a_restart_backoff_answers_at_once_and_nothing_restarts():
    inst, fx, answers = running(restart_backoff_initial=3.0)
    inst.on_exit(fx.workers[0], KILLED)
    assert inst.state == BACKOFF
    inst.stop(answers.append)
    assert answers == [wire.OK, wire.OK] and inst.state == REMOVED
    fx.t += 10
    inst.tick(fx.t)
    assert len(fx.workers) == 1


def test_a_late_ready_after_a_stop_is_ignored():
    inst, fx, answers = running()
    inst.on_exit(fx.workers[0], KILLED)      # restart: a new worker starts
    w2 = fx.workers[1]
    inst.stop(answers.append)                # stop before it is ready
    ready(inst, w2)                          # its READY arrives after the stop
    assert inst.state == STOPPING and answers == [wire.OK]
    inst.on_exit(w2, EXIT_0)
    assert answers == [wire.OK, wire.OK] and inst.state == REMOVED


def test_late_done_ack_and_frames_after_the_stop_touch_nothing():
    inst, fx, answers = running()
    w = fx.workers[0]
    pull, push = fx.endpoints
    pull.queue += [b"a", b"b"]
    inst.on_readable(fx.endpoints[0])
    give(inst, w, sinkframes.Ack(1, b"{}").encode())
    inst.stop(answers.append)
    assert fx.watching[-1] is False
    done(inst, w, 1)                         # progress while stopping: no reading again
    assert fx.watching[-1] is False
    inst.on_exit(w, EXIT_0)
    assert inst.state == REMOVED and pull.closed and push.closed
    give(inst, w, sinkframes.Done(2).encode())
    give(inst, w, sinkframes.Ack(2, b"{}").encode())
    inst.on_frame(w, frames.BEAT, b"not even json")  # a removed instance reads nothing
    inst.on_readable(fx.endpoints[0])                   # a readiness event select returned earlier
    assert push.sent == [b"{}"] and answers == [wire.OK, wire.OK]


def test_a_stale_readiness_event_after_removal_does_nothing():
    inst, fx, _ = running()
    inst.remove()
    sent = list(fx.sent)
    inst.on_readable(fx.endpoints[0])
    inst.on_readable(fx.endpoints)
    assert fx.sent == sent


def test_frames_of_a_replaced_worker_are_ignored():
    inst, fx, _ = running(kind=wire.TYPE_FUNC)
    old = fx.workers[0]
    req = fx.endpoints
    req.calls.append(b'{"func":"Exec","arg":[]}')
    inst.on_readable(fx.endpoints)
    inst.on_exit(old, KILLED)                # the call is answered with the crash
    assert len(req.replies) == 1 and b"died during the call" in req.replies[0]
    reply(inst, old, 1, b'{"state": true, "result": 1}')   # a late reply of the dead worker
    assert len(req.replies) == 1


# --- function calls ------------------------------------------------------------------------------------

def test_a_deadline_and_a_crash_in_the_same_tick_answer_the_call_once():
    inst, fx, _ = running(kind=wire.TYPE_FUNC)
    w = fx.workers[0]
    req = fx.endpoints
    req.calls.append(b'{"func":"Exec","arg":[]}')
    inst.on_readable(fx.endpoints)
    fx.t += 4.5
    beat(inst, w)
    inst.tick(fx.t)                          # past call_deadline: SIGTERM and an error reply
    inst.on_exit(w, KILLED)                  # ... and its death is reported in the same batch
    reply(inst, w, 1, b'{"state": true, "result": "late"}')
    assert len(req.replies) == 1 and b"call exceeded call_deadline 4s" in req.replies[0]
    assert fx.signals == [(w.wid, signal.SIGUSR1)]  # its stack was asked for; it died before the kill
    assert inst.state == STARTING and inst.restart_causes == {"deadline": 1}


def test_a_late_reply_after_the_deadline_is_never_the_next_answer():
    inst, fx, _ = running(kind=wire.TYPE_FUNC)
    w1 = fx.workers[0]
    req = fx.endpoints
    req.calls.append(b"call-1")
    inst.on_readable(fx.endpoints)
    fx.t += 5
    beat(inst, w1)
    inst.tick(fx.t)
    inst.on_exit(w1, signal.SIGTERM)
    w2 = fx.workers[1]
    ready(inst, w2)
    req.calls.append(b"call-2")
    inst.on_readable(fx.endpoints)
    reply(inst, w2, 1, b"reply-to-call-1")  # a stale call id, whoever sends it
    assert len(req.replies) == 1
    reply(inst, w2, 2, b"reply-to-call-2")
    assert req.replies[1] == b"reply-to-call-2"


def test_a_call_waiting_for_a_restart_is_forwarded_once_the_worker_is_ready():
    inst, fx, _ = running(kind=wire.TYPE_FUNC, restart_backoff_initial=1.0)
    req = fx.endpoints
    inst.on_exit(fx.workers[0], KILLED)
    req.calls.append(b"call")
    inst.on_readable(fx.endpoints)
    assert fx.frames_of(fnframes.CALL) == []
    fx.t += 1.0
    inst.tick(fx.t)
    ready(inst, fx.workers[1])
    assert fx.frames_of(fnframes.CALL) == [frames.SEQ.pack(1) + b"call"]


# --- sinks -----------------------------------------------------------------------------------------------

def test_unfinished_items_go_to_the_replacement_in_order():
    inst, fx, _ = running()
    pull, _push = fx.endpoints
    pull.queue += [b"1", b"2", b"3"]
    inst.on_readable(fx.endpoints[0])
    done(inst, fx.workers[0], 1)
    inst.on_exit(fx.workers[0], KILLED)
    ready(inst, fx.workers[1])
    items = [f for w, t, f in fx.sent if t == sinkframes.ITEMS and w == fx.workers[1].wid]
    assert list(sinkframes.Items.decode(items[0])) == [(2, b"2"), (3, b"3")]


def collecting(w: WorkerHandle, seq: int) -> None:
    """Worker ``w`` began the collect of item ``seq`` (the one before it returned)."""
    assert w.page is not None
    w.page.slots[0], w.page.slots[1] = seq, seq - 1


def restarted(inst: Instance, fx: Recorder) -> WorkerHandle:
    """Wait out the backoff, make the replacement ready; the replacement."""
    if inst.state == BACKOFF:
        fx.t += 10
        inst.tick(fx.t)
    ready(inst, fx.workers[-1])
    return fx.workers[-1]


def items_sent_to(fx: Recorder, w: WorkerHandle) -> List[bytes]:
    return [data for wid, t, f in fx.sent if t == sinkframes.ITEMS and wid == w.wid
            for _seq, data in sinkframes.Items.decode(f)]


def test_only_the_item_whose_collect_was_running_is_charged_with_a_crash():
    inst, fx, _ = running()
    pull, push = fx.endpoints
    pull.queue += [b"0", b"bad", b"2", b"3", b"4", b"5", b"6", b"7"]  # back to back: seqs 1-8
    inst.on_readable(pull)
    for _ in range(3):                       # sink_max_deliveries 3
        w = fx.workers[-1]
        collecting(w, 2)
        inst.on_exit(w, EXIT_70)             # collect of "bad" raised
        w = restarted(inst, fx)
    assert items_sent_to(fx, w) == [b"0", b"2", b"3", b"4", b"5", b"6", b"7"]
    assert len(push.sent) == 1 and b"item dropped: 3 workers died during its collect" in push.sent[0]
    assert inst.errors == 1
    assert [n for n in fx.notes if n.startswith("dropped")] == [
        "dropped 1 item(s) whose collect was running when a worker died 3 times: [2]"]


def test_a_restart_recycle_or_stop_we_asked_for_never_charges_the_running_item():
    inst, fx, answers = running(sink_max_deliveries=1)
    pull, push = fx.endpoints
    pull.queue += [b"slow", b"next"]
    inst.on_readable(pull)
    for _ in range(3):                       # kuiper-pool restart of a slow sink, three times
        w = fx.workers[-1]
        collecting(w, 1)
        assert inst.retry_now() and inst.state == RECYCLING
        fx.t += 2.1
        inst.tick(fx.t)                      # stop_grace over: SIGKILLed
        inst.on_exit(w, KILLED)
        w = restarted(inst, fx)
        assert items_sent_to(fx, w) == [b"slow", b"next"]
    collecting(w, 1)
    inst.stop(answers.append)
    inst.on_exit(w, KILLED)
    assert push.sent == [] and inst.errors == 0 and inst.restarts == 0


def test_a_worker_dying_between_items_charges_none():
    inst, fx, _ = running(sink_max_deliveries=1)
    pull, push = fx.endpoints
    pull.queue += [b"1", b"2"]
    inst.on_readable(pull)
    w = fx.workers[-1]
    collecting(w, 1)
    w.page.slots[1] = 1                      # collect of 1 returned, 2 not begun
    inst.on_exit(w, KILLED)
    assert items_sent_to(fx, restarted(inst, fx)) == [b"1", b"2"] and push.sent == []


def test_back_pressure_stops_reading_at_the_byte_budget_and_progress_resumes_it():
    inst, fx, _ = running(sink_window_mb=1)
    pull, _push = fx.endpoints
    big = b"x" * 600_000
    pull.queue += [big]
    inst.on_readable(fx.endpoints[0])
    assert fx.watching[-1] is True            # 600 KB held: under the 1 MiB budget
    pull.queue += [big]
    inst.on_readable(fx.endpoints[0])
    assert fx.watching[-1] is False           # 1.2 MB held: reading stops
    pull.queue += [b"3"]
    inst.on_readable(fx.endpoints[0])         # a readiness event select() returned before
    assert pull.queue == [b"3"]
    done(inst, fx.workers[0], 2)
    assert fx.watching[-1] is True


def test_acks_eKuiper_does_not_read_stop_the_reading_until_they_went_out():  # noqa: N802
    inst, fx, _ = running(sink_window_mb=1)
    pull, push = fx.endpoints
    push.backlog = ACK_BACKLOG + 1            # never dropped: the data waits in eKuiper instead
    pull.queue += [b"1", b"2"]
    inst.on_readable(pull)
    assert fx.watching[-1] is False and pull.queue == []
    done(inst, fx.workers[0], 2)              # room in the window, but not for more acks
    assert fx.watching[-1] is False
    push.backlog = 0
    inst.on_readable(push)                    # the ack socket took them
    assert fx.watching[-1] is True


def test_a_failed_sink_error_acks_what_was_in_flight_and_what_comes():
    inst, fx, _ = running(flap_max_restarts=1)
    pull, push = fx.endpoints
    pull.queue += [b"1"]
    inst.on_readable(fx.endpoints[0])
    inst.on_exit(fx.workers[0], KILLED)       # restart 1 of 1
    inst.on_exit(fx.workers[1], KILLED)       # flapping: failed
    assert inst.state == FAILED and len(push.sent) == 1 and b"has failed" in push.sent[0]
    pull.queue += [b"2"]
    inst.on_readable(fx.endpoints[0])
    assert len(push.sent) == 2 and inst.errors == 2


# --- failed instances, containment, ended sources -------------------------------------------------------

def test_a_failed_instance_is_tried_again_after_failed_retry_min_then_doubling():
    inst, fx, _ = running(kind=wire.TYPE_FUNC, flap_max_restarts=1)
    inst.on_exit(fx.workers[0], KILLED)
    inst.on_exit(fx.workers[1], KILLED)
    assert inst.state == FAILED and inst.restart_at == pytest.approx(fx.t + 60)
    fx.t += 60
    inst.tick(fx.t)
    assert inst.state == STARTING and len(fx.workers) == 3
    fx.t += 100  # the crash of the retry is far outside flap_window of the first crashes
    inst.policy.reset()
    inst.on_exit(fx.workers[2], KILLED)
    inst.on_exit(fx.workers[3], KILLED)
    assert inst.state == FAILED and inst.restart_at == pytest.approx(fx.t + 120)


def test_contain_ends_only_this_instance_and_answers_what_waits():
    inst, fx, answers = make()
    inst.contain(KeyError("boom"))
    assert answers == [b"plugin plug sink sym rule rule1 op op1 instance 0: internal error: "
                       b"KeyError: 'boom'"]
    assert inst.state == REMOVED and fx.signals == [(1, signal.SIGKILL)]


def test_contain_of_a_running_instance_fails_it_and_answers_the_call_in_flight():
    inst, fx, _ = running(kind=wire.TYPE_FUNC)
    req = fx.endpoints
    req.calls.append(b"call")
    inst.on_readable(fx.endpoints)
    inst.contain(ValueError("bad frame"))
    assert inst.state == FAILED and req.closed
    assert len(req.replies) == 1 and b"internal error: ValueError: bad frame" in req.replies[0]
    fx.t += 60
    inst.tick(fx.t)
    assert inst.state == STARTING       # tried again later: the route opens anew on READY
    ready(inst, fx.workers[-1])
    assert inst.state == RUNNING and inst.route.channel is not None and not inst.route.channel.req.closed


def test_a_garbage_frame_from_a_worker_raises_for_containment():
    inst, fx, _ = running()
    with pytest.raises(ValueError):
        inst.on_frame(fx.workers[0], frames.BEAT, b"\xff not json")
    with pytest.raises(ValueError):
        inst.on_frame(fx.workers[0], 0x7E, b"")


def test_a_source_whose_open_returned_has_ended_and_is_not_restarted():
    inst, fx, _ = running(kind=wire.TYPE_SOURCE)
    inst.on_exit(fx.workers[0], EXIT_0)
    assert inst.state == ENDED and len(fx.workers) == 1


def test_every_state_change_goes_through_the_transition_table():
    inst, fx, answers = running(restart_backoff_initial=1.0)
    with pytest.raises(AttributeError):
        inst.state = BACKOFF  # type: ignore[misc]  # read only: only _move writes it
    inst.on_exit(fx.workers[0], KILLED)                 # RUNNING -> BACKOFF
    fx.t += 1.0
    inst.tick(fx.t)                                     # BACKOFF -> STARTING
    ready(inst, fx.workers[1])                          # STARTING -> RUNNING
    inst.stop(answers.append)                           # RUNNING -> STOPPING
    inst.on_exit(fx.workers[1], EXIT_0)                 # STOPPING -> REMOVED
    assert list(inst.transitions) == [(STARTING, RUNNING), (RUNNING, BACKOFF), (BACKOFF, STARTING),
                                      (RUNNING, STOPPING), (STOPPING, REMOVED)]
    assert inst.transitions[(STARTING, RUNNING)] == 2
    assert all(new in TRANSITIONS[old] for old, new in inst.transitions)
    assert fx.notes.count("running -> backoff: crash") == 1  # one hook logs every change


def test_an_illegal_transition_raises_and_the_supervisor_contains_it():
    src, fx, _ = running(kind=wire.TYPE_SOURCE)
    src.on_exit(fx.workers[0], EXIT_0)                  # RUNNING -> ENDED
    with pytest.raises(TransitionError, match="ended -> running is not a transition"):
        src._move(RUNNING, "a late ready")
    assert src.state == ENDED
    inst, fx, _ = running()
    sup = Supervisor(PluginConfig("plug", {}, {}, {}), load_settings(environ={}), zygote=None)
    sup.instances[inst.ctrl.key] = inst
    sup.guarded("test", inst, inst._move, RUNNING, "a second ready")  # the loop's guard
    assert inst.state == FAILED and "TransitionError" in inst.last_error
    assert fx.signals[-1] == (fx.workers[0].wid, signal.SIGKILL) and inst.route.pull is None


def test_recycling_starts_a_fresh_worker_when_the_old_one_exits():
    inst, fx, _ = running(kind=wire.TYPE_FUNC, max_calls=1)
    req = fx.endpoints
    req.calls.append(b"call")
    inst.on_readable(fx.endpoints)
    reply(inst, fx.workers[0], 1, b'{"state": true, "result": 1}')
    assert inst.state == RECYCLING and fx.frames_of(frames.STOP)
    inst.on_exit(fx.workers[0], EXIT_0)
    assert inst.state == STARTING and len(fx.workers) == 2 and inst.restarts == 0


EXIT_5 = fnframes.EXIT_RECYCLED << 8


def test_a_source_exiting_with_the_recycle_code_is_a_crash_not_a_recycle():
    inst, fx, _ = running(kind=wire.TYPE_SOURCE, restart_backoff_initial=1.0, max_calls=3)
    inst.on_exit(fx.workers[0], EXIT_5)
    assert inst.state == BACKOFF and inst.restarts == 1 and inst.restart_causes == {"exit": 1}
    assert len(fx.workers) == 1 and "exit code 5" in inst.last_error   # waits for its backoff


def test_a_lent_function_worker_recycles_itself_only_after_max_calls():
    inst, fx, _ = running(kind=wire.TYPE_FUNC, lendable=True, max_calls=2, restart_backoff_initial=1.0)
    w = fx.workers[0]
    w.page.begin(b"c", fx.t)
    w.page.finish(True)
    inst.on_exit(w, EXIT_5)                  # one call served of two: plugin code exited
    assert inst.state == BACKOFF and inst.restarts == 1
    fx.t += 1.0
    inst.tick(fx.t)
    w2 = fx.workers[1]
    ready(inst, w2)
    for _ in range(2):
        w2.page.begin(b"c", fx.t)
        w2.page.finish(True)
    inst.on_exit(w2, EXIT_5)                 # max_calls served: the recycle we set up
    assert inst.state == STARTING and inst.restarts == 1 and len(fx.workers) == 3


def test_a_replace_lets_the_call_in_flight_finish_and_is_never_a_crash():
    inst, fx, _ = running(kind=wire.TYPE_FUNC)
    fx.endpoints.calls.append(b"call")
    inst.on_readable(fx.endpoints)
    assert inst.replace("reload") is False and inst.state == RUNNING  # asked again on the next tick
    reply(inst, fx.workers[0], 1, b'{"state": true, "result": 1}')
    assert fx.endpoints.replies == [b'{"state": true, "result": 1}']
    assert inst.replace("reload") is True and inst.state == RECYCLING and fx.frames_of(frames.STOP)
    fx.endpoints.calls.append(b"next")
    inst.on_readable(fx.endpoints)  # waits for the new worker
    inst.on_exit(fx.workers[0], EXIT_0)
    ready(inst, fx.workers[1])
    assert fx.frames_of(fnframes.CALL)[-1] == frames.SEQ.pack(2) + b"next"
    assert inst.restarts == 0 and not inst.restart_causes and inst.errors == 0


def test_items_of_a_replaced_sink_worker_killed_while_stopping_are_no_poison():
    inst, fx, _ = running(sink_max_deliveries=1)
    pull, push = fx.endpoints
    pull.queue += [b"1", b"2"]
    inst.on_readable(pull)
    assert inst.replace("reload") is True
    fx.t += 2.1  # the old worker does not finish within stop_grace: SIGKILL
    inst.tick(fx.t)
    assert (fx.workers[0].wid, signal.SIGKILL) in fx.signals
    inst.on_exit(fx.workers[0], KILLED)
    ready(inst, fx.workers[1])
    items = [f for w, t, f in fx.sent if t == sinkframes.ITEMS and w == fx.workers[1].wid]
    assert list(sinkframes.Items.decode(items[0])) == [(1, b"1"), (2, b"2")] and inst.errors == 0


def test_a_silent_worker_busy_on_the_cpu_is_left_alone_and_an_idle_one_is_killed():
    inst, fx, _ = running(kind=wire.TYPE_SOURCE)
    w = fx.workers[0]
    inst.on_frame(w, frames.BEAT, b'{"n": 1, "busy": 0, "cpu": 1.0}')
    fx.t += 3
    fx.cpu = 3.5
    inst.tick(fx.t)
    assert fx.signals == []
    fx.t += 2.5  # the next window: no CPU used
    inst.tick(fx.t)
    assert "hung: no heartbeat" in w.kill_reason and "of CPU in the last" in w.kill_reason


def test_a_hung_worker_is_continued_to_dump_its_stack_then_sigkilled_without_stop_grace():
    inst, fx, _ = running()                  # a sink: SIGTERM and stop_grace for other kills
    w = fx.workers[0]
    inst.on_frame(w, frames.BEAT, b'{"n": 1, "busy": 0, "cpu": 1.0}')
    beat_at, fx.cpu = fx.t, 1.5              # busy, then SIGSTOPped before the next beat
    while not w.kill_reason:
        fx.t += 0.05
        inst.tick(fx.t)
    assert fx.t - beat_at < 2.1              # silent past the limit (2 s): no second window
    assert fx.signals == [(w.wid, signal.SIGUSR1), (w.wid, signal.SIGCONT)]
    assert w.kill_reason.startswith("hung")
    fx.t += 0.06                             # DUMP_GRACE, not DUMP_GRACE + stop_grace
    inst.tick(fx.t)
    assert fx.signals[-1] == (w.wid, signal.SIGKILL)


def test_a_crash_is_counted_by_the_cause_of_our_kill_never_by_words_in_the_plugins_fault():
    inst, fx, _ = running(kind=wire.TYPE_SOURCE)
    w = fx.workers[0]
    give(inst, w, frames.Fault("hung: deadline missed, start_timeout").encode())
    inst.on_exit(w, 70 << 8)                  # exit code 70: the plugin's own fault
    assert inst.restart_causes == {"exit": 1}
    w = fx.workers[1]
    ready(inst, w)
    inst.kill(w, Cause.START_TIMEOUT, "a text that says nothing of the cause")
    inst.on_exit(w, signal.SIGTERM)
    assert inst.restart_causes == {"exit": 1, "deadline": 1}


@pytest.mark.parametrize("status, first", [
    (signal.SIGSEGV,
     "its stack dump, asked for before the SIGKILL, crashed it first with signal 11 (SIGSEGV)"),
    (signal.SIGUSR1, "it ended with signal 10 (SIGUSR1) while dumping its stack, before the SIGKILL")])
def test_a_worker_the_stack_dump_ends_before_the_kill_is_reported_as_the_kill_it_was(status, first):
    inst, fx, _ = running()
    w = fx.workers[0]
    inst.on_started(w, 4242)
    inst.kill(w, Cause.HANG, "hung: no heartbeat for 0.3s")
    fx.dumps[w.wid] = Dump("", status == signal.SIGSEGV)  # faulthandler wrote a fatal error
    inst.on_exit(w, status)                   # before DUMP_GRACE ended: no SIGKILL sent yet
    assert fx.signals == [(w.wid, signal.SIGUSR1), (w.wid, signal.SIGCONT)]
    assert inst.last_error == f"worker pid 4242 signal 9 (SIGKILL): hung: no heartbeat for 0.3s; {first}"
    assert inst.restart_causes == {"hang": 1}


def test_a_hung_worker_whose_dump_crashed_it_is_reported_as_the_kill_even_when_the_exit_comes_after_it():
    """Under load the zygote's report of the dump's SIGSEGV can arrive after our SIGKILL went
    out; nothing outruns a SIGKILL, so the SIGSEGV came first: still reported as the kill."""
    inst, fx, _ = running()
    w = fx.workers[0]
    inst.on_started(w, 4242)
    inst.kill(w, Cause.HANG, "hung: no heartbeat for 0.3s")
    fx.t += 0.06
    inst.tick(fx.t)
    assert fx.signals[-1] == (w.wid, signal.SIGKILL)
    fx.dumps[w.wid] = Dump("", True)
    inst.on_exit(w, signal.SIGSEGV)
    assert inst.last_error == ("worker pid 4242 signal 9 (SIGKILL): hung: no heartbeat for 0.3s; its stack "
                               "dump, asked for before the SIGKILL, crashed it first with signal 11 (SIGSEGV)")
    assert inst.restart_causes == {"hang": 1}


def test_a_killed_worker_that_dies_of_another_signal_after_the_kill_was_sent_is_reported_as_it_died():
    inst, fx, _ = running()                   # a sink: SIGTERM DUMP_GRACE after the dump
    w = fx.workers[0]
    inst.on_started(w, 4242)
    inst.kill(w, Cause.DEADLINE, "call exceeded collect_deadline 1s")
    fx.t += 0.06
    inst.tick(fx.t)
    assert fx.signals[-1] == (w.wid, signal.SIGTERM)
    inst.on_exit(w, signal.SIGABRT)           # the plugin's own SIGTERM handler aborted
    assert inst.last_error == "worker pid 4242 signal 6 (SIGABRT): call exceeded collect_deadline 1s"
    assert inst.restart_causes == {"deadline": 1}


# --- zero-hop functions: the worker owns eKuiper's connection -----------------------------------------

def lent(**overrides: Any) -> Tuple[Instance, Recorder, WorkerHandle]:
    inst, fx, _ = running(kind=wire.TYPE_FUNC, lendable=True, **overrides)
    w = fx.workers[0]
    assert fx.handoffs and fx.handoffs[-1][0] == w.wid and inst.route.channel.lent
    return inst, fx, w


def test_a_ready_worker_is_lent_the_connection_and_the_supervisor_stops_reading_it():
    inst, fx, w = lent()
    handoff = fx.handoffs[0][1]
    assert handoff.request_id == 0x80000007 and handoff.call is None and handoff.owed is None
    assert inst.route.channel.fd == -1
    inst.on_readable(fx.endpoints)  # a stale readiness event of the channel before it was lent
    assert fx.channels[0].replies == []


def test_the_first_function_start_is_answered_once_its_channel_is_dialed():
    inst, fx, answers = make(wire.TYPE_FUNC, lendable=True, dial_timeout=2.0)
    fx.channel_up = False  # eKuiper has not answered the SP header yet: the loop goes on
    ready(inst, fx.workers[0])
    assert answers == [] and inst.state == RUNNING and not fx.handoffs
    fx.t += 1.0
    inst.tick(fx.t)
    assert answers == []
    fx.channels[0].up = True
    inst.on_readable(fx.endpoints)  # the channel's readiness: headers exchanged
    assert answers == [wire.OK]
    fx.t += 5.0
    inst.tick(fx.t)
    assert answers == [wire.OK] and inst.state == RUNNING


def test_the_first_function_start_is_refused_when_no_channel_is_up_within_dial_timeout():
    inst, fx, answers = make(wire.TYPE_FUNC, lendable=True, dial_timeout=2.0)
    fx.channel_up = False
    ready(inst, fx.workers[0])
    fx.t += 2.0
    inst.tick(fx.t)
    assert len(answers) == 1 and b"dial_timeout 2s" in answers[0] and b"func_fn" in answers[0]
    assert inst.state == REMOVED and fx.channels[0].closed
    assert (fx.workers[0].wid, signal.SIGKILL) in fx.signals


def test_a_worker_dying_before_its_first_start_is_answered_refuses_it():
    inst, fx, answers = make(wire.TYPE_FUNC, lendable=True, dial_timeout=2.0)
    fx.channel_up = False
    ready(inst, fx.workers[0])
    inst.on_exit(fx.workers[0], KILLED)
    assert len(answers) == 1 and b"before eKuiper's channel was up" in answers[0]
    assert inst.state == REMOVED and fx.channels[0].closed and len(fx.channels) == 1


def test_a_worker_dying_during_a_call_owes_eKuiper_an_error_for_its_resent_copy():  # noqa: N802
    inst, fx, w = lent()
    w.page.begin(b"call-A", fx.t)
    inst.on_exit(w, KILLED)
    assert fx.closed_routes and len(fx.channels) == 2      # dialed again, handshake sent
    new = fx.channels[1]
    new.calls.append(b"call-A")                            # eKuiper re-sends the pending call
    inst.on_readable(fx.endpoints)
    assert len(new.replies) == 1 and b"died during the call (signal 9 (SIGKILL)" in new.replies[0]
    assert inst.errors == 1
    new.calls.append(b"call-B")                            # the next call is run by the new worker
    inst.on_readable(fx.endpoints)
    ready(inst, fx.workers[1])
    assert fx.handoffs[-1][1].call == b"call-B" and len(new.replies) == 1


def test_an_identical_call_after_eKuiper_gave_up_on_the_first_is_a_new_call():  # noqa: N802
    inst, fx, w = lent(call_deadline=7.0)    # above eKuiper's 5 s receive timeout
    w.page.begin(b"call-A", fx.t)
    fx.t += 7.2                              # eKuiper reported its timeout at 5 s
    inst.on_exit(w, KILLED)                  # killed at call_deadline
    new = fx.channels[1]
    new.calls.append(b"call-A")              # the same bytes: a new call, not a re-sent one
    inst.on_readable(new)
    assert new.replies == [] and inst.route.channel.call == b"call-A" and inst.errors == 0
    ready(inst, fx.workers[1])
    assert fx.handoffs[-1][1].call == b"call-A" and fx.handoffs[-1][1].owed is None


def test_a_worker_dying_while_idle_owes_nothing():
    inst, fx, w = lent()
    w.page.begin(b"call-A", fx.t)
    w.page.finish(True)
    inst.on_exit(w, KILLED)
    fx.channels[1].calls.append(b"call-A")  # the same bytes as the last call: a new call now
    inst.on_readable(fx.endpoints)
    assert fx.channels[1].replies == [] and inst.route.channel.call == b"call-A"


def test_a_call_overrunning_on_a_lent_connection_is_killed_after_two_ticks_and_answered():
    inst, fx, w = lent()
    beat(inst, w)
    w.page.begin(b"slow", fx.t)
    fx.t += 4.2
    beat(inst, w)
    inst.tick(fx.t)                         # first sight of this call past the deadline: wait
    assert fx.signals == []
    fx.t += 0.05
    beat(inst, w)
    inst.tick(fx.t)
    assert_killed(inst, fx, w, signal.SIGKILL)
    assert "call_deadline" in w.kill_reason
    inst.on_exit(w, KILLED)
    fx.channels[1].calls.append(b"slow")
    inst.on_readable(fx.endpoints)
    assert b"call exceeded call_deadline 4s" in fx.channels[1].replies[0]


def test_the_owed_check_travels_with_the_connection_when_the_worker_is_ready_first():
    inst, fx, w = lent()
    w.page.begin(b"call-A", fx.t)
    inst.on_exit(w, KILLED)                 # restarted at once (initial backoff 0)
    ready(inst, fx.workers[1])              # ready before eKuiper re-sent the call
    handoff = fx.handoffs[-1][1]
    assert handoff.owed is not None and handoff.owed[0] == callpage.call_crc(b"call-A")


def test_counts_of_a_lent_worker_come_from_its_call_page():
    inst, fx, w = lent()
    for ok in (True, False, True):
        w.page.begin(b"c", fx.t)
        w.page.finish(ok)
    assert inst.counts() == (3, 3, 1)
    inst.on_exit(w, EXIT_0)
    assert (inst.items_in, inst.items_out, inst.errors) == (3, 3, 1)


def test_a_lost_connection_is_dialed_again_and_lent_again():
    inst, fx, w = lent()
    give(inst, w, fnframes.lost())
    assert len(fx.channels) == 2 and len(fx.handoffs) == 2 and fx.handoffs[1][0] == w.wid


def test_a_sink_retried_after_contain_opens_its_channel_again():
    inst, fx, _ = running()
    inst.contain(RuntimeError("bug"))
    assert inst.state == FAILED and inst.route.pull is None
    fx.t += 60
    inst.tick(fx.t)
    ready(inst, fx.workers[-1])
    assert inst.state == RUNNING and isinstance(inst.route, SinkRoute) and fx.watching[-1] is True


# --- acked sinks: the worker owns eKuiper's connections --------------------------------------------

def lent_sink() -> Tuple[Instance, Recorder, WorkerHandle]:
    inst, fx, _ = running(lendable=True)
    w = fx.workers[0]
    assert fx.handoffs == [(w.wid, "sink")] and inst.route.lent_to is w and fx.endpoints[0].lent
    return inst, fx, w


def take(page: SinkPage, data: bytes) -> None:
    """What the worker's one recv does: the frame lands in the page."""
    area = page.receiving(len(data))
    area[:] = b"\x01" + len(data).to_bytes(8, "big") + data


@pytest.mark.parametrize("where, owed", [
    ("before the recv", False), ("after the recv", True), ("in collect", True),
    ("writing the ack", False), ("after the ack", False)])
def test_a_dead_lent_sink_worker_owes_what_its_page_says(where, owed):
    inst, fx, w = lent_sink()
    page = fx.worker_pages[w.wid]
    item = b'{"i": 7}'
    if where == "before the recv":
        page.receiving(len(item))
    else:
        take(page, item)
        if where != "after the recv":
            page.holding()
        if where in ("writing the ack", "after the ack"):
            page.acking()
        if where == "after the ack":
            page.acked()
    inst.on_exit(w, KILLED)
    assert not fx.endpoints[0].lent and inst.route.lent_to is None   # read here again
    ready(inst, fx.workers[1])
    items = [f for wid, t, f in fx.sent if t == sinkframes.ITEMS and wid == fx.workers[1].wid]
    if owed:  # relayed to the replacement; it is lent the connections only after its ack
        assert [d for _s, d in sinkframes.Items.decode(items[0])] == [item]
        assert fx.handoffs == [(w.wid, "sink")]
        seq = next(iter(inst.route.inflight))
        give(inst, fx.workers[1], sinkframes.Ack(seq, b"{}").encode())
        assert fx.endpoints[1].sent == [b"{}"]
    else:
        assert items == [] and fx.endpoints[1].sent == []
    assert fx.handoffs[-1] == (fx.workers[1].wid, "sink")
    assert (where == "writing the ack") == any("counted as sent" in n for n in fx.notes)


def test_no_signal_reaches_a_worker_writing_an_ack_until_it_is_written():
    inst, fx, w = lent_sink()
    page = fx.worker_pages[w.wid]
    take(page, b"x")
    page.holding()
    inst.kill(w, Cause.DEADLINE, "call exceeded collect_deadline 1s")
    page.acking()
    fx.t += 10                                # past DUMP_GRACE and stop_grace
    inst.tick(fx.t)
    assert fx.signals == [(w.wid, signal.SIGUSR1)]   # only the stack dump, before ACKING
    page.acked()
    inst.tick(fx.t)
    assert fx.signals[-1][1] in (signal.SIGTERM, signal.SIGKILL)


def test_a_late_give_back_of_a_replaced_worker_changes_nothing():
    inst, fx, w = lent_sink()
    inst.on_exit(w, KILLED)
    ready(inst, fx.workers[1])
    assert inst.route.lent_to is fx.workers[1]
    give(inst, w, sinkframes.Lost(sinkframes.Why.CLOSED).encode())  # from the dead worker: ignored
    assert inst.route.lent_to is fx.workers[1] and fx.endpoints[0].lent


def test_a_given_back_connection_is_read_here_and_lent_again_after_the_ack():
    inst, fx, w = lent_sink()
    pull = fx.endpoints[0]
    give(inst, w, sinkframes.Lost(sinkframes.Why.CLOSED).encode())   # eKuiper reconnected: the new one is read here
    assert not pull.lent and inst.route.lent_to is None
    pull.queue.append(b"small")
    inst.on_readable(pull)
    [items] = fx.frames_of(sinkframes.ITEMS)
    [(seq, data)] = sinkframes.Items.decode(items)
    assert not pull.lent                      # not while the relayed item waits for its ack
    give(inst, w, sinkframes.Ack(seq, b"{}").encode())
    assert pull.lent and inst.route.lent_to is w and fx.endpoints[1].sent == [b"{}"]


def test_after_an_item_too_big_for_the_page_items_are_relayed_until_a_run_of_small_ones():
    inst, fx, w = lent_sink()
    pull = fx.endpoints[0]
    give(inst, w, sinkframes.Lost(sinkframes.Why.LARGE).encode())

    def relay(data: bytes) -> None:
        pull.queue.append(data)
        inst.on_readable(pull)
        [(seq, got)] = sinkframes.Items.decode(fx.frames_of(sinkframes.ITEMS)[-1])
        assert got == data
        give(inst, w, sinkframes.Ack(seq, b"{}").encode())
    relay(b"L" * 100_000)                     # the one given back
    for _ in range(RELAY_AFTER_LARGE - 1):
        relay(b"small")
    relay(b"L" * 100_000)                     # another big one: the run starts again
    for _ in range(RELAY_AFTER_LARGE - 1):
        relay(b"small")
    assert not pull.lent and inst.route.lent_to is None
    relay(b"small")                           # the run is complete: lent after its ack
    assert pull.lent and inst.route.lent_to is w
    assert fx.endpoints[1].sent == [b"{}"] * (2 * RELAY_AFTER_LARGE + 1)


def test_a_stale_readiness_event_while_lent_reads_nothing_of_the_lent_connection():
    inst, fx, w = lent_sink()
    inst.on_readable(fx.endpoints[0])          # select() returned it before the lend
    assert fx.frames_of(sinkframes.ITEMS) == [] and inst.route.lent_to is w


@pytest.mark.parametrize("stopped", [False, True])
def test_a_lent_item_whose_collect_was_running_is_charged_only_with_a_crash(stopped):
    inst, fx, w = lent_sink()
    page = fx.worker_pages[w.wid]
    take(page, b"bad")
    page.holding()
    page.slots[0] = sinkpage.LENT | page.taken   # its collect began
    if stopped:                                 # a kuiper-pool restart of a slow sink
        assert inst.retry_now()
        fx.t += 2.1
        inst.tick(fx.t)
    inst.on_exit(w, KILLED)
    [item] = inst.route.inflight.values()
    assert item.data == b"bad" and item.faults == (0 if stopped else 1)


def test_an_acked_sink_is_lent_only_once_the_acks_queued_here_have_gone_out():
    inst, fx, w = lent_sink()
    pull, push = fx.endpoints
    give(inst, w, sinkframes.Lost(sinkframes.Why.CLOSED).encode())   # relayed from here on
    pull.queue.append(b"small")
    inst.on_readable(pull)
    [(seq, _data)] = sinkframes.Items.decode(fx.frames_of(sinkframes.ITEMS)[0])
    push.backlog = 9                           # eKuiper has not read that ack yet
    give(inst, w, sinkframes.Ack(seq, b"{}").encode())
    assert not pull.lent and inst.route.lent_to is None
    push.backlog = 0
    inst.on_readable(push)                     # the ack went out
    assert pull.lent and inst.route.lent_to is w


def test_an_ack_ekuiper_did_not_read_is_finished_here_and_nothing_is_lent_before_it_goes_out():
    inst, fx, w = lent_sink()
    pull, push = fx.endpoints
    give(inst, w, sinkframes.AckRest(b"end of an ack").encode())   # the worker's write waited 1 s
    assert push.sent == [b"rest:end of an ack"] and any("has not read an ack" in n for n in fx.notes)
    give(inst, w, sinkframes.Lost(sinkframes.Why.STALLED).encode())              # then it gives the connections back
    assert not pull.lent and inst.route.lent_to is None
    pull.queue.append(b"next")
    inst.on_readable(pull)                                 # relayed; its ack queues behind the rest
    [(seq, data)] = sinkframes.Items.decode(fx.frames_of(sinkframes.ITEMS)[0])
    give(inst, w, sinkframes.Ack(seq, b"{}").encode())
    assert data == b"next" and push.sent == [b"rest:end of an ack", b"{}"]
    assert not pull.lent                                   # not while eKuiper has not read them
    push.backlog = 0
    inst.on_readable(push)
    assert pull.lent and inst.route.lent_to is w


def test_every_crash_counts_as_a_restart_the_one_that_fails_the_instance_too():
    # status shows ``restarts`` and the metrics the sum of ``restart_causes``: six kills are six
    inst, fx, _ = running(kind=wire.TYPE_SOURCE, flap_max_restarts=5)
    for kill in range(6):
        if inst.state == BACKOFF:
            fx.t += 5.0
            inst.tick(fx.t)
        if inst.state == STARTING:
            ready(inst, fx.workers[-1])
        assert inst.state == RUNNING, kill
        inst.on_exit(fx.workers[-1], KILLED)
    assert inst.state == FAILED and "worker ended 6 times within 60s" in inst.last_error
    assert inst.restarts == 6 and inst.restart_causes == {"signal": 6}


# --- reload: what is in flight in the old worker finishes there -------------------------------------

def test_a_late_ack_after_the_replace_began_finishes_the_item_in_the_old_worker():
    inst, fx, _ = running()
    pull, push = fx.endpoints
    pull.queue.append(b"1")
    inst.on_readable(pull)
    old = fx.workers[0]
    assert inst.replace("reload") is True and inst.state == RECYCLING
    give(inst, old, sinkframes.Ack(1, b"{}").encode())   # collect had returned: the ack comes now
    assert push.sent == [b"{}"] and not inst.route.inflight
    inst.on_exit(old, EXIT_0)
    new = fx.workers[1]
    ready(inst, new)
    assert items_sent_to(fx, new) == [] and inst.errors == 0


def test_a_lent_sink_item_acked_after_the_replace_began_is_not_collected_again():
    inst, fx, w = lent_sink()
    page = fx.worker_pages[w.wid]
    take(page, b"x")
    page.holding()                       # collect returned; its ack is on the way
    assert inst.replace("reload") is True
    page.acking()
    page.acked()                         # the worker waited for it before leaving
    inst.on_exit(w, EXIT_0)
    ready(inst, fx.workers[1])
    assert items_sent_to(fx, fx.workers[1]) == [] and not inst.route.inflight


def test_a_recycled_worker_with_a_call_in_flight_is_killed_at_call_deadline_not_stop_grace():
    inst, fx, w = lent(call_deadline=8.0)
    w.page.begin(b"slow", fx.t)
    assert inst.replace("reload") is True
    fx.t += 2.5                          # past stop_grace (2 s): the call runs on
    inst.tick(fx.t)
    assert (w.wid, signal.SIGKILL) not in fx.signals
    fx.t += 5.6                          # past the call's own deadline
    inst.tick(fx.t)
    assert (w.wid, signal.SIGKILL) in fx.signals and "call_deadline 8s" in w.kill_reason
    inst.on_exit(w, KILLED)
    assert inst.state == STARTING and inst.restarts == 0   # a recycle, never a crash


def test_a_recycled_worker_whose_call_ended_exits_and_is_not_held_back():
    inst, fx, w = lent(call_deadline=8.0)
    w.page.begin(b"quick", fx.t)
    w.page.finish(True)
    assert inst.replace("reload") is True
    fx.t += 2.1
    inst.tick(fx.t)
    assert (w.wid, signal.SIGKILL) in fx.signals and w.kill_reason == "reload"


def test_a_recycled_worker_whose_page_claims_an_endless_call_is_held_once_for_call_deadline():
    inst, fx, w = lent(call_deadline=8.0)
    w.page.begin(b"call", fx.t + 1e9)     # plugin code scribbled a start far in the future
    assert inst.replace("reload") is True
    fx.t += 2.1
    inst.tick(fx.t)
    assert (w.wid, signal.SIGKILL) not in fx.signals
    fx.t += 8.0
    inst.tick(fx.t)
    assert (w.wid, signal.SIGKILL) in fx.signals and "call_deadline 8s" in w.kill_reason
