"""Shared workers (``workers: per_symbol``) through the supervisor's seam: event orderings,
deterministically.

The real ``LoopEffects`` and ``Instance`` run here; the zygote is a recorder that keeps the
worker's end of every link it is handed, so the test plays the shared worker on real
socketpairs: it reads ADOPT frames (and the instance links passed with them) from the
control link and writes what a thread would (READY, FAULT, ENDED). The zygote's reports
(started, exited) are fed as the loop would. No process, no sleep: each test sets up one
ordering that real timing produces only sometimes (tests/test_shared_workers.py runs the
real processes).
"""
from __future__ import annotations

import json
import selectors
import signal
import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from kuiper_pool import wire
from kuiper_pool.config import load_settings
from kuiper_pool.runtime import frames
from kuiper_pool.runtime.effects import LoopEffects
from kuiper_pool.runtime.health import Cause
from kuiper_pool.runtime.instances import BACKOFF, RECYCLING, REMOVED, RUNNING, STARTING, STOPPING, Instance
from kuiper_pool.runtime.protocol import Exited, Started
from kuiper_pool.runtime.shared import WHERE_GRACE

SETTINGS = dict(workers="per_symbol", restart_backoff_initial=0.0, restart_jitter=0.0, stop_grace=2.0,
                heartbeat_interval=0.5, flap_max_restarts=5)


class ZygoteRecorder:
    """The zygote's requests, recorded; the worker's end of every link is kept for the test."""

    def __init__(self, rundir: str) -> None:
        self.rundir = rundir
        self.pid = 1
        self.links: Dict[int, socket.socket] = {}
        self.kills: List[Tuple[int, int]] = []

    def start_worker(self, wid: int, link: socket.socket, symbol: str = "") -> None:
        self.links[wid] = link

    def kill(self, wid: int, sig: int = signal.SIGKILL) -> None:
        self.kills.append((wid, sig))

    def own_path(self, path: str) -> None:
        pass

    def disown_path(self, path: str) -> None:
        pass


class Thread:
    """The test's side of one instance's link in a shared worker."""

    def __init__(self, wid: int, sock: socket.socket) -> None:
        self.wid, self.sock = wid, sock
        self.inbox = frames.FrameBuffer()

    def write(self, ftype: int, obj: Any) -> None:
        self.sock.sendall(frames.encode_json(ftype, obj))

    def received(self) -> List[int]:
        self.sock.setblocking(False)
        out: List[int] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += [t for t, _p in self.inbox.feed(data)]


class Rig:
    def __init__(self, tmp_path) -> None:
        self.s = load_settings(overrides=SETTINGS, environ={})
        self.zygote = ZygoteRecorder(str(tmp_path))
        self.handlers: Dict[int, Callable[[int], None]] = {}
        self.fx = LoopEffects(self.s, self.zygote, self.register, self.unregister,
                              lambda fd, on: None, self.guarded, lambda inst: None)
        self.threads: Dict[int, Thread] = {}   # instance wid -> its link's far end
        self.adopted_by: Dict[int, int] = {}    # instance wid -> host wid
        self.asked: List[int] = []              # instance wids a WHERE asked about

    def register(self, fd: int, handler: Callable[[int], None], inst: Any = None, events: int = 0) -> None:
        self.handlers[fd] = handler

    def unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)

    @staticmethod
    def guarded(where: str, inst: Any, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)

    def start(self, rule: str) -> Tuple[Instance, List[bytes]]:
        ctrl = wire.Control("start", "sym", wire.TYPE_SOURCE, rule, "op", 0, "", {})
        inst = Instance("plug", ctrl, self.s, self.fx)
        answers: List[bytes] = []
        inst.begin(answers.append)
        self.adopt()
        return inst, answers

    def hosts(self) -> List[int]:
        return sorted(self.fx.shared.hosts)

    def adopt(self) -> None:
        """Read every host's control link as the shared worker would: the ADOPTed links, and
        which instances WHERE asks about."""
        for hwid in self.hosts():
            sock = self.zygote.links[hwid]
            sock.setblocking(False)
            while True:
                try:
                    data, fds, _f, _a = socket.recv_fds(sock, 1 << 16, 8)
                except BlockingIOError:
                    break
                if not data:
                    break
                pending = list(fds)
                for ftype, payload in frames.FrameBuffer().feed(data):
                    if ftype == frames.ADOPT:
                        wid = frames.split_seq(payload)[0]
                        self.threads[wid] = Thread(wid, socket.socket(fileno=pending.pop(0)))
                        self.adopted_by[wid] = hwid
                    elif ftype == frames.WHERE:
                        self.asked.append(frames.split_seq(payload)[0])

    def deliver(self) -> None:
        """One pass of the loop over every registered link."""
        for fd, handler in list(self.handlers.items()):
            if fd in self.handlers:
                handler(selectors.EVENT_READ)

    def started(self, hwid: int, pid: int) -> None:
        self.fx.shared.on_report(Started(hwid, pid))

    def exited(self, hwid: int, status: int) -> None:
        self.fx.shared.on_report(Exited(hwid, 0, status))

    def ended(self, wid: int, code: int, stuck: bool = False) -> None:
        """The thread of instance ``wid`` reports its end on its host's control link."""
        self.zygote.links[self.adopted_by[wid]].sendall(
            frames.Ended(wid, code, stuck).encode())

    def at(self, wid: int, where: str) -> None:
        """The shared worker answers where instance ``wid``'s thread is (AT)."""
        self.zygote.links[self.adopted_by[wid]].sendall(frames.encode_seq(frames.AT, wid, where.encode()))

    def ready(self, inst: Instance, error: Optional[str] = None) -> None:
        self.threads[inst.worker.wid].write(frames.READY, {"error": error})
        self.deliver()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    for sock in list(r.zygote.links.values()) + [t.sock for t in r.threads.values()]:
        sock.close()


def two_running(rig: Rig) -> Tuple[Instance, Instance, int]:
    a, _ = rig.start("ra")
    b, _ = rig.start("rb")
    [host] = rig.hosts()
    rig.started(host, 4242)
    rig.ready(a)
    rig.ready(b)
    assert a.state == b.state == RUNNING and a.worker.pid == b.worker.pid == 4242
    return a, b, host


def test_instances_of_a_symbol_join_one_process_and_it_is_let_go_when_empty(rig):
    a, b, host = two_running(rig)
    assert rig.adopted_by == {a.worker.wid: host, b.worker.wid: host}
    answers: List[bytes] = []
    a.stop(answers.append)
    assert frames.STOP in rig.threads[a.worker.wid].received()
    rig.ended(a.worker.wid, 0)
    rig.deliver()
    assert a.state == REMOVED and answers == [wire.OK]
    assert rig.hosts() == [host] and not rig.fx.shared.hosts[host].closed_at  # b is still in it
    b.stop(answers.append)
    rig.ended(b.worker.wid, 0)
    rig.deliver()
    assert rig.fx.shared.hosts[host].closed_at  # its control link closed: the process exits
    assert rig.zygote.links[host].recv(1) == b""
    rig.exited(host, 0)
    assert rig.hosts() == [] and rig.zygote.kills == []


def test_a_stop_while_the_shared_worker_restarts_ends_only_that_instance(rig):
    a, b, host = two_running(rig)
    rig.exited(host, signal.SIGKILL)      # the process died: both restart at once (backoff 0)
    assert a.restarts == b.restarts == 1 and a.state == b.state == STARTING
    [new] = rig.hosts()
    assert new != host
    rig.adopt()
    answers: List[bytes] = []
    a.stop(answers.append)                # before the new process even started
    assert a.state == STOPPING and frames.STOP in rig.threads[a.worker.wid].received()
    rig.started(new, 4343)
    rig.ready(a)                          # its READY, sent before it read the STOP: ignored
    assert a.state == STOPPING and answers == []
    rig.ended(a.worker.wid, 0)
    rig.ready(b)
    assert a.state == REMOVED and answers == [wire.OK]
    assert b.state == RUNNING and b.worker.pid == 4343 and rig.zygote.kills == []


def test_the_error_of_a_thread_that_ends_at_once_reaches_ekuiper_before_its_end(rig):
    """READY with an error, then ENDED on the other link: the exit is handled only after
    the instance link's frames, so eKuiper's start answer is the error."""
    a, b, host = two_running(rig)
    c, answers = rig.start("rc")
    rig.threads[c.worker.wid].write(frames.READY, {"error": "configure failed: ValueError: bad"})
    rig.ended(c.worker.wid, 3)
    for fd in sorted(rig.handlers, key=lambda fd: fd != rig.fx.shared.hosts[host].link.fileno()):
        if fd in rig.handlers:  # the control link first; c's link is gone with its exit
            rig.handlers[fd](selectors.EVENT_READ)
    assert c.state == REMOVED and len(answers) == 1 and b"configure failed: ValueError: bad" in answers[0]
    assert a.state == b.state == RUNNING and rig.zygote.kills == []


def test_a_late_end_of_a_given_up_thread_changes_nothing(rig):
    """An instance killed (stop_grace passed) is given up at once, its error saying where its
    thread was as the process answered; its thread's ENDED comes later, after the instance
    started again: ignored, and the process is not retired."""
    a, b, host = two_running(rig)
    old = a.worker
    a.kill(old, Cause.START_TIMEOUT, "start exceeded start_timeout")
    rig.adopt()
    assert rig.asked == [old.wid]         # where is its thread?
    rig.at(old.wid, "plug.py:7 spin")
    rig.deliver()
    a.tick(rig.fx.now() + 5.0)            # past DUMP_GRACE and stop_grace: SIGKILL, i.e. given up
    assert (host, signal.SIGUSR1) in rig.zygote.kills and (host, signal.SIGKILL) not in rig.zygote.kills
    rig.fx.shared.tick(rig.fx.now())      # its exit is reported on the next tick
    assert a.worker is not old and a.restarts == 1 and a.state == STARTING
    assert a.last_error.endswith("start exceeded start_timeout (at plug.py:7 spin)"), a.last_error
    rig.adopt()
    rig.ended(old.wid, 0)                  # the late end of the old thread
    rig.deliver()
    rig.ready(a)
    assert a.state == RUNNING and a.worker.pid == b.worker.pid
    rig.fx.shared.tick(rig.fx.now() + 10.0)
    assert not rig.fx.shared.hosts[host].retired and b.state == RUNNING


def test_a_killed_instance_whose_process_does_not_say_where_it_is_exits_a_moment_later(rig):
    a, _b, _host = two_running(rig)
    old, asked = a.worker, rig.fx.now()
    a.kill(old, Cause.START_TIMEOUT, "start exceeded start_timeout")
    a.tick(rig.fx.now() + 5.0)            # given up; no AT comes
    rig.fx.shared.tick(asked)
    assert a.worker is old                # its exit waits for the answer ...
    rig.fx.shared.tick(rig.fx.now() + WHERE_GRACE)
    assert a.worker is not old and a.restarts == 1 and a.last_error.endswith("start exceeded start_timeout")


def test_a_given_up_thread_that_never_ends_moves_the_others_and_ends_the_process(rig):
    a, b, host = two_running(rig)
    answers: List[bytes] = []
    a.stop(answers.append)
    a.tick(rig.fx.now() + 3.0)             # stop_grace passed: given up
    rig.fx.shared.tick(rig.fx.now())
    assert a.state == REMOVED and answers == [wire.OK]
    rig.fx.shared.tick(rig.fx.now() + 3.0)  # its thread never ended within stop_grace
    b.tick(rig.fx.now())                    # its state machine moves it off
    assert rig.fx.shared.hosts[host].retired and b.state == RECYCLING
    assert frames.STOP in rig.threads[b.worker.wid].received()
    old_b = b.worker
    rig.ended(old_b.wid, 0)
    rig.deliver()
    assert b.state == STARTING and len(rig.hosts()) == 2     # b goes to a fresh process
    assert rig.fx.shared.hosts[host].closed_at               # the old one is let go ...
    rig.fx.shared.tick(rig.fx.now() + 3.0)
    assert (host, signal.SIGKILL) in rig.zygote.kills         # ... and killed: a thread holds it


def test_a_reload_retires_a_shared_worker_with_all_its_instances_into_a_fresh_one(rig):
    a, b, host = two_running(rig)
    rig.fx.switch(rig.zygote, rig.s)      # a reload's switch: every worker is outdated now
    for inst in (a, b):
        inst.tick(rig.fx.now())
        assert inst.state == RECYCLING and inst.worker.kill_cause is Cause.RELOAD
    assert rig.fx.shared.hosts[host].retired
    for inst in (a, b):
        rig.ended(inst.worker.wid, 0)
    rig.deliver()
    assert a.state == b.state == STARTING and len(rig.hosts()) == 2   # both in one fresh process
    assert a.worker.generation == b.worker.generation == 1
    assert rig.fx.shared.hosts[host].closed_at                         # the old one is let go


def test_a_hang_kills_the_process_and_every_instance_restarts_as_hung(rig):
    a, b, host = two_running(rig)
    a.kill(a.worker, Cause.HANG, "hung: no heartbeat for 2.1s")
    a.tick(rig.fx.now() + 1.0)
    assert (host, signal.SIGKILL) in rig.zygote.kills
    rig.exited(host, signal.SIGKILL)
    assert a.restart_causes == b.restart_causes == {"hang": 1}
    assert a.state == b.state == STARTING and len(rig.hosts()) == 1 and rig.hosts() != [host]


def test_a_host_death_before_a_given_up_exit_is_reported_exits_the_instance_once(rig):
    a, b, host = two_running(rig)
    answers: List[bytes] = []
    a.stop(answers.append)
    a.tick(rig.fx.now() + 3.0)             # given up: its exit is due on the next tick
    rig.exited(host, signal.SIGKILL)       # but the process dies first
    rig.fx.shared.tick(rig.fx.now())
    assert a.state == REMOVED and answers == [wire.OK]
    assert b.restarts == 1 and b.state in (STARTING, BACKOFF)
