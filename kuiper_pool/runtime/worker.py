"""Worker main: runs exactly one source/sink instance or one function symbol.

The worker reads its instance from the first frame on its link, builds the
plugin object with the author's factory, configures it, reports READY, then
serves until told to stop. Sources emit straight to eKuiper's socket; sink items
and function calls come through the supervisor. A heartbeat thread reports
progress so the supervisor can tell a slow worker from a hung one.
"""
from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import sys
import termios
import threading
import time
import traceback
from typing import Any, Dict, Optional, Set, Tuple

from .. import logs, wire
from . import frames
from ..api import PluginConfig
from ..transport import TransportError, TransportTimeout
from ..transport import load as load_transport
from ..transport.rest import RestConnection
from ..transport.sp import ReqConnection
from ..transport.sp import frame as sp_frame
from ..transport.sp import frame_header as sp_frame_header
from . import forensics, proctitle
from .callpage import CallPage, call_crc
from .sinkpage import FREE, HOLDING, LENT, SP_FRAME, SinkPage, fits, open_sink_page
from .protocol import StartSpec, is_error_reply
from .context import WorkerContext
from .state import LocalState

EXIT_OK = 0
EXIT_CONFIGURE = 3    # configure or the factory failed; READY carried the error
EXIT_ORPHAN = 4       # the supervisor went away
EXIT_CRASH = 70       # plugin code raised; FAULT carried the error
EXIT_RECYCLED = frames.EXIT_RECYCLED  # served max_calls on a lent connection
EXIT_FORKED = 1       # a process forked by plugin code came back into kuiper_pool's code
EXIT_VERSION = 6      # an exec'd worker found another kuiper_pool installed than its zygote's
SEND_POLL = 0.1       # how often a blocked emit re-checks for stop
DONE_EVERY = 32       # sink progress is reported at least this often
PARTIAL_SPINS = 100   # a lent sink connection holds part of a frame: look again at once
PARTIAL_WAIT = 0.001  # this many times, then after this (a peer that stalls mid-frame)
ACK_WAIT_SHARE = 0.5  # of stop_grace a stopping sink waits for a pending ack; close gets the rest


class ForkGuard:
    """eKuiper's channels, the call page and the link belong to the worker process alone.

    A process that plugin code forks inherits them; if its code returns instead of ending
    with ``os._exit`` (a library whose child raises, a forgotten ``_exit``), it would run the
    worker's loop: read the worker's frames, answer eKuiper's calls, write the page. At fork
    the child's copies of the link and of a lent connection become /dev/null and its page
    mapping is closed; the first time it reaches kuiper_pool's code it exits with one line.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.forked = False  # set in a forked child: a flag test, not a getpid per emitted item
        self.fds: Set[int] = set()
        self.page: Any = None    # a call page or a sink page: closed at fork in the child
        self.where = ""
        self.log = logs.supervisor_logger()  # the instance's, once the worker knows it
        os.register_at_fork(after_in_child=self.after_fork_in_child)

    def after_fork_in_child(self) -> None:
        self.forked = True
        null = os.open(os.devnull, os.O_RDWR)
        for fd in self.fds:  # the numbers stay taken: nothing of the child's can reuse them
            try:
                os.dup2(null, fd)
            except OSError:
                pass
        os.close(null)
        if self.page is not None:
            self.page.close()

    def check(self) -> None:
        """Exit at once in a process forked by plugin code; nothing in the worker itself."""
        if self.forked:
            self.log.error(
                "%s: a process forked by plugin code (pid %d, from worker pid %d) returned into "
                "the worker instead of exiting; it exits now", self.where, os.getpid(), self.pid)
            sys.stdout.flush()
            os._exit(EXIT_FORKED)


class GuardedLink(frames.BlockingLink):
    """The worker's link, usable by the worker process alone (see :class:`ForkGuard`)."""

    def __init__(self, sock: socket.socket, guard: ForkGuard) -> None:
        super().__init__(sock)
        self.guard = guard
        guard.fds.add(sock.fileno())

    def send(self, frame: bytes) -> None:
        self.guard.check()
        try:
            super().send(frame)
        except ConnectionError:  # the supervisor is gone: nothing left to serve (as the heartbeat does)
            os._exit(EXIT_ORPHAN)

    def recv(self) -> Optional[Tuple[int, bytes]]:
        self.guard.check()
        return super().recv()


class Worker:
    """State shared by the runner and the heartbeat thread."""

    def __init__(self, link: GuardedLink, plugin: PluginConfig, spec: StartSpec,
                 state: bytes) -> None:
        self.link = link
        self.guard = link.guard
        self.plugin = plugin
        self.ctrl = spec.control
        self.spec = spec
        self.state = LocalState(state, lambda entry: link.send(frames.encode(frames.PUT, entry)),
                                self.where(), self.ctrl.plugin_type == wire.TYPE_FUNC)
        self.processed = 0
        self.busy_since = 0.0
        self.ctx: Optional[WorkerContext] = None  # a source's: its emit_error count is reported
        self.stopped = threading.Event()
        self.log = logs.instance_logger(self.ctrl.symbol, self.ctrl.rule_id or None,
                                        self.ctrl.op_id, self.ctrl.instance_id)
        self.guard.where, self.guard.log = self.where(), self.log

    def where(self) -> str:
        return f"plugin {self.plugin.name} {self.ctrl.describe()}"

    def heartbeat(self, interval: float, parent: int) -> None:
        while not self.stopped.wait(interval):
            if os.getppid() != parent:
                os._exit(EXIT_ORPHAN)
            t = os.times()  # the supervisor compares it with psutil's: busy or hung
            try:
                self.link.send(frames.encode_json(frames.BEAT, {
                    "n": self.processed, "busy": self.busy_since, "cpu": t.user + t.system,
                    "e": self.ctx.errors if self.ctx is not None else 0}))
            except OSError:
                os._exit(EXIT_ORPHAN)

    def ready(self, error: Optional[str]) -> None:
        self.link.send(frames.encode_json(frames.READY, {"error": error}))

    def fault(self, stage: str, exc: BaseException) -> int:
        """Report plugin code that raised; the supervisor restarts the instance."""
        text = f"{self.where()}: {stage} raised {type(exc).__name__}: {exc}"
        self.log.error("%s\n%s", text, traceback.format_exc().rstrip())
        try:
            self.link.send(frames.encode_json(frames.FAULT, {"error": " ".join(text.split())}))
        except OSError:
            pass
        return EXIT_CRASH


def run(link_sock: socket.socket, plugin: PluginConfig, spawned: bool = False) -> int:
    """Serve one instance over ``link_sock``; return the exit code. ``spawned``: this worker
    was exec'd (``start_method: spawn``), not forked, which its process title says."""
    link = GuardedLink(link_sock, ForkGuard())
    first = link.recv()
    if first is None or first[0] != frames.START:
        return EXIT_ORPHAN
    spec = StartSpec.decode(first[1])
    state = link.recv()  # always follows START
    if state is None or state[0] != frames.STATE:
        return EXIT_ORPHAN
    worker = Worker(link, plugin, spec, state[1])
    c = worker.ctrl
    # most telling first: the title is cut to the length of the command line it replaces
    kind = "function" if c.plugin_type == wire.TYPE_FUNC else c.plugin_type
    proctitle.set_title(f"kuiper-pool {'(exec) ' if spawned else ''}{plugin.name} {kind} {c.symbol}"
                        + (f" {c.rule_id}/{c.op_id}/{c.instance_id}" if c.rule_id else ""), c.symbol)
    if spec.dump_path:
        try:
            forensics.install(spec.dump_path)
        except OSError as e:  # a nicety: the worker serves without it
            worker.log.warning("%s: no stack dump on a crash or hang: cannot create %s: %s",
                               worker.where(), spec.dump_path, e.strerror or e)
    threading.Thread(target=worker.heartbeat, args=(spec.heartbeat_interval, os.getppid()),
                     daemon=True, name="kuiper_pool-heartbeat").start()
    factory = plugin.get(worker.ctrl.plugin_type, worker.ctrl.symbol)
    try:
        obj = factory() if factory is not None else None
        if obj is None:
            raise LookupError(f"factory for {worker.ctrl.symbol} returned nothing")
    except Exception as e:  # noqa: BLE001 - any plugin error becomes the start answer
        worker.ready(f"{worker.where()}: factory raised {type(e).__name__}: {e}")
        return EXIT_CONFIGURE
    runner = {wire.TYPE_SOURCE: run_source, wire.TYPE_SINK: run_sink,
              wire.TYPE_FUNC: run_function}[worker.ctrl.plugin_type]
    try:
        return runner(worker, obj)
    finally:
        worker.stopped.set()
        sys.stdout.flush()


def _configure(worker: Worker, call) -> bool:
    try:
        call()
    except Exception as e:  # noqa: BLE001
        worker.ready(" ".join(f"{worker.where()}: configure failed: {type(e).__name__}: {e}".split()))
        return False
    return True


# --- sources ---------------------------------------------------------------------

def run_source(worker: Worker, source: Any) -> int:
    ctrl = worker.ctrl
    datasource = ctrl.source_datasource(worker.spec.source_datasource)  # the supervisor logs it
    if not _configure(worker, lambda: source.configure(datasource, ctrl.config)):
        return EXIT_CONFIGURE
    url = wire.data_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
    transport = load_transport(worker.spec.transport)
    try:  # items go straight to eKuiper's PULL socket: no hop
        push = transport.PushEndpoint(url, worker.spec.dial_timeout, SEND_POLL)
    except TransportError as e:
        worker.ready(f"{worker.where()}: cannot connect to eKuiper at {url}: {e}")
        return EXIT_CONFIGURE
    ctx: WorkerContext

    def send(data: bytes) -> None:
        worker.guard.check()
        while True:  # back-pressure without loss, yet a stop is noticed within SEND_POLL
            try:
                push.send(data)
                worker.processed += 1
                return
            except TransportTimeout:
                if ctx.closing:
                    return

    ctx = worker.ctx = WorkerContext(ctrl.symbol, ctrl.rule_id, ctrl.op_id, ctrl.instance_id,
                                     worker.state, send=send)
    opened = threading.Event()
    threading.Thread(target=_watch_stop, args=(worker, source, ctx, opened),
                     daemon=True, name="kuiper_pool-stop").start()
    worker.ready(None)
    try:
        source.open(ctx)
    except Exception as e:  # noqa: BLE001
        if not ctx.closing:
            return worker.fault("open", e)
    finally:
        opened.set()
    worker.guard.check()
    if not ctx.closing:
        worker.log.info("%s: open returned; the source has ended", worker.where())
    return EXIT_OK


def _watch_stop(worker: Worker, source: Any, ctx: WorkerContext, opened: threading.Event) -> None:
    """A source's ``open`` owns the main thread: stop arrives here and calls ``close``."""
    while True:
        frame = worker.link.recv()
        if frame is None or frame[0] == frames.STOP:
            break
    ctx.closing = True
    try:
        source.close(ctx)
    except Exception as e:  # noqa: BLE001
        worker.log.error("%s: close raised %s: %s", worker.where(), type(e).__name__, e)
    if not opened.wait(worker.spec.stop_grace):
        worker.log.warning("%s: open did not return within %.1fs of close; exiting",
                           worker.where(), worker.spec.stop_grace)
        sys.stdout.flush()
        os._exit(EXIT_OK)


# --- sinks -----------------------------------------------------------------------

def run_sink(worker: Worker, sink: Any) -> int:
    ctrl = worker.ctrl
    if not _configure(worker, lambda: sink.configure(ctrl.config)):
        return EXIT_CONFIGURE
    require_ack = wire.require_ack(ctrl.config)
    # the collect mark, shared with the supervisor: [0] the seq whose collect began, [1]
    # whose collect returned (LENT | n for an item taken off a lent connection). An acked sink
    # under transport sp gets an item page with it and may be lent eKuiper's connections.
    mark = open_sink_page(worker.link.fds.popleft()) if worker.spec.page else None
    worker.guard.page = mark
    current = mark.slots if mark is not None else [0, 0]
    lent = LentSink(worker, mark) if isinstance(mark, SinkPage) else None
    owed = AckOwed()

    def ack(data: bytes) -> None:
        # With requireAck an item is finished at its ack, whenever it comes (from collect or
        # later, from another thread): no DONE stands for it, so a late ack is never dropped.
        # eKuiper sends the next item only after this ack, so ``current`` is still its item.
        if current[0] & LENT and lent is not None:
            lent.ack(data)
        else:
            worker.link.send(frames.encode_seq(frames.ACK, current[0], data))
        owed.paid()

    # without requireAck nobody reads acks: ack_ok/ack_error do nothing
    ctx = WorkerContext(ctrl.symbol, ctrl.rule_id, ctrl.op_id, ctrl.instance_id, worker.state,
                        ack=ack if require_ack else None)
    try:  # READY after open: an open that fails is the start's answer, start_timeout covers it
        sink.open(ctx)
    except Exception as e:  # noqa: BLE001
        worker.ready(" ".join(f"{worker.where()}: open failed: {type(e).__name__}: {e}".split()))
        return EXIT_CONFIGURE
    worker.ready(None)

    def collect(seq: int, data: bytes) -> None:
        current[0] = seq
        if require_ack:
            owed.begin()
        worker.busy_since = time.monotonic()
        sink.collect(ctx, data)
        worker.guard.check()  # what follows is the worker's alone
        worker.busy_since = 0.0
        current[1] = seq
        worker.processed += 1

    while True:
        if lent is not None and lent.data is not None and not worker.link.has_frame():
            item = lent.wait()
            if item is not None:
                try:
                    collect(LENT | lent.page.taken, item)
                except Exception as e:  # noqa: BLE001 - the page still holds the item
                    return worker.fault("collect", e)
            if not lent.link_ready:
                continue
        frame = worker.link.recv()
        if frame is None or frame[0] == frames.STOP:
            break
        if frame[0] == frames.CONN and lent is not None:
            lent.attach(worker.link.fds.popleft(), worker.link.fds.popleft())
            continue
        if frame[0] == frames.ITEMS:
            items = frames.decode_items(frame[1])
        elif frame[0] == frames.ITEM_FD:
            items = frames.read_item_fd(frame[1], worker.link.fds.popleft())
        else:
            continue
        done = reported = 0
        for seq, data in items:
            try:
                collect(seq, data)
            except Exception as e:  # noqa: BLE001
                if done > reported:
                    worker.link.send(frames.encode_seq(frames.DONE, done))
                return worker.fault("collect", e)
            if not require_ack:
                done = seq
            if done > reported and seq % DONE_EVERY == 0:
                worker.link.send(frames.encode_seq(frames.DONE, done))
                reported = done
        if done > reported:
            worker.link.send(frames.encode_seq(frames.DONE, done))
    if not owed.wait(worker.spec.stop_grace * ACK_WAIT_SHARE):
        worker.log.warning("%s: the ack of the last item did not come within %gs of the stop; "
                           "the item goes to the next worker", worker.where(),
                           worker.spec.stop_grace * ACK_WAIT_SHARE)
    try:
        sink.close(ctx)
    except Exception as e:  # noqa: BLE001
        worker.log.error("%s: close raised %s: %s", worker.where(), type(e).__name__, e)
    return EXIT_OK


class AckOwed:
    """Whether the item collected last still owes its ack (a sink may ack after ``collect``
    returned, from a thread of its own). A stopping worker waits for it, so an item is
    never collected again by the next worker only because its ack was on the way."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.owed = False

    def begin(self) -> None:
        with self.cond:
            self.owed = True

    def paid(self) -> None:
        with self.cond:
            self.owed = False
            self.cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """True once nothing is owed; False if the ack did not come within ``timeout``."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.owed, timeout)


class LentSink:
    """eKuiper's data and ack connections of an acked sink, lent by the supervisor, and the
    page that records the one item in hand (``sinkpage.py``). The descriptors share their
    open file (and O_NONBLOCK) with the supervisor's copies: never made blocking here. Like
    the link they belong to the worker process alone (:class:`ForkGuard`)."""

    def __init__(self, worker: Worker, page: SinkPage) -> None:
        self.worker = worker
        self.page = page
        self.data: Optional[socket.socket] = None
        self.acks: Optional[socket.socket] = None
        self.lock = threading.Lock()     # the runner and a thread that acks late
        self.wake_r, self.wake_w = os.pipe()   # an ack freed the page: read the next item
        os.set_blocking(self.wake_r, False)
        self.poller = select.poll()
        self.poller.register(worker.link.sock.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        self.polling_data = False
        self.link_ready = False
        self.stalled = False  # an ack's end went to the supervisor: give the connections back
        self.partial = 0      # looks at the same part of a frame
        self.avail = array.array("i", [0])   # FIONREAD's answer
        self.runner = threading.get_ident()

    def attach(self, data_fd: int, ack_fd: int) -> None:
        self.give_back(b"")
        self.data = socket.socket(fileno=data_fd)
        self.acks = socket.socket(fileno=ack_fd)
        self.worker.guard.fds.update((data_fd, ack_fd))

    def give_back(self, why: bytes) -> None:
        """Close our copies; ``why`` (b"closed", b"large") tells the supervisor to read
        the data connection itself again."""
        if self.data is None:
            return
        self._poll_data(False)
        self.worker.guard.fds.difference_update((self.data.fileno(), self.acks.fileno()))
        self.data.close()
        self.acks.close()
        self.data = self.acks = None
        if why:
            self.worker.link.send(frames.encode(frames.LOST, why))

    def _poll_data(self, on: bool) -> None:
        if on != self.polling_data and self.data is not None:
            if on:
                self.poller.register(self.data.fileno(), select.POLLIN)
            else:
                self.poller.unregister(self.data.fileno())
            self.polling_data = on

    def wait(self) -> Optional[bytes]:
        """Wait for the link or the next item; the item's bytes when one was taken."""
        self.worker.guard.check()
        if self.stalled:  # the supervisor writes the rest of an ack: every later one is its too
            self.stalled = False
            self.give_back(b"stalled")
            return None
        self._poll_data(self.page.state == FREE)
        ready = {fd for fd, _ev in self.poller.poll()}
        self.link_ready = self.worker.link.sock.fileno() in ready
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 64)
            except BlockingIOError:
                pass
        if self.data is None or self.data.fileno() not in ready or self.page.state != FREE:
            return None
        return self._take()

    def _take(self) -> Optional[bytes]:
        """The next item, taken with one recv once its whole frame is in the socket."""
        assert self.data is not None
        fcntl.ioctl(self.data.fileno(), termios.FIONREAD, self.avail)
        avail = self.avail[0]
        if avail < SP_FRAME:
            try:
                if avail == 0 and not self.data.recv(1, socket.MSG_PEEK):
                    self.give_back(b"closed")  # eKuiper closed it: it dials again
                    return None
            except BlockingIOError:
                return None
            except OSError:
                self.give_back(b"closed")
                return None
            self._partial()  # part of a frame: the rest is being written
            return None
        kind, length = sp_frame_header(self.data.recv(SP_FRAME, socket.MSG_PEEK))
        if kind != 1 or not fits(length):
            self.give_back(b"large")  # the supervisor relays it (or drops a bad peer)
            return None
        if avail < SP_FRAME + length:
            self._partial()
            return None
        self.partial = 0
        area = self.page.receiving(length)
        got = self.data.recv_into(area, SP_FRAME + length, socket.MSG_WAITALL)
        if got != SP_FRAME + length:
            raise OSError(f"took {got} of {SP_FRAME + length} bytes of a whole frame")
        self.page.holding()
        return bytes(area[SP_FRAME:])

    def _partial(self) -> None:
        self.partial += 1
        time.sleep(0 if self.partial < PARTIAL_SPINS else PARTIAL_WAIT)

    def ack(self, data: bytes) -> None:
        """The one ack of the item in hand, on eKuiper's ack connection (a second is dropped)."""
        self.worker.guard.check()  # a process forked by plugin code never acks
        with self.lock:
            if self.page.state != HOLDING:
                return
            self.page.acking()
            try:
                if self.acks is not None:
                    rest = _send_within(self.acks, sp_frame(data), frames.ACK_WAIT)
                    if rest:  # eKuiper reads no acks now: the supervisor queues the rest, never waiting
                        self.worker.link.send(frames.encode(frames.ACK_REST, rest))
                        self.stalled = True
            finally:
                self.page.acked()
        if threading.get_ident() != self.runner:  # a late ack: the runner waits in poll
            os.write(self.wake_w, b"x")


def _send_within(sock: socket.socket, data: bytes, timeout: float) -> bytes:
    """Write ``data`` to a non-blocking socket, waiting for room up to ``timeout`` in all;
    what it did not take by then is returned (b"" when all went, or the peer is gone)."""
    view = memoryview(data)
    deadline = 0.0
    while view:
        try:
            view = view[sock.send(view):]
            continue
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return b""  # eKuiper closed the rule: nobody waits for this ack any more
        now = time.monotonic()
        deadline = deadline or now + timeout
        if now >= deadline:
            return bytes(view)
        poller = select.poll()  # no FD_SETSIZE limit: plugin code may hold many fds
        poller.register(sock.fileno(), select.POLLOUT)
        poller.poll((deadline - now) * 1000)
    return b""


# --- functions ---------------------------------------------------------------------

def run_function(worker: Worker, function: Any) -> int:
    """Serve calls: on eKuiper's connection itself when the supervisor lends it (CONN),
    else relayed over the link (CALL/REPLY)."""
    page = CallPage(worker.link.fds.popleft()) if worker.spec.page else None
    worker.guard.page = page
    worker.ready(None)
    contexts: Dict[Tuple[Any, ...], WorkerContext] = {}
    conn: Any = None
    owed: Optional[Tuple[int, str]] = None
    max_calls = worker.spec.max_calls
    poller = select.poll()  # the link and, while lent, eKuiper's connection (no FD_SETSIZE limit)
    poller.register(worker.link.sock.fileno(), select.POLLIN)
    while True:
        if conn is not None and not worker.link.has_frame():
            ready_fds = [fd for fd, _ev in poller.poll()]
            # the link first: after a STOP the next call is the next worker's (eKuiper re-sends it)
            if conn.fileno() in ready_fds and worker.link.sock.fileno() not in ready_fds:
                try:
                    calls = conn.recv_ready()
                except OSError:  # eKuiper closed it (the supervisor dials again), or serve's
                    conn = _give_back(worker, poller, conn)  # request is not this worker's
                    continue
                for call in calls:
                    _serve_lent(worker, function, contexts, page, conn, call, owed)
                    owed = None  # only the first call after a reconnect can be the owed one
                if max_calls and worker.processed >= max_calls:
                    return EXIT_RECYCLED  # eKuiper re-sends its next call to the fresh worker
            if worker.link.sock.fileno() not in ready_fds:
                continue
        frame = worker.link.recv()
        if frame is None or frame[0] == frames.STOP:
            return EXIT_OK
        if frame[0] == frames.CONN:
            head, buffered, call = frames.decode_conn(frame[1])
            sock = socket.socket(fileno=worker.link.fds.popleft())
            conn = (RestConnection(sock, **head["rest"]) if "rest" in head  # kuiper-pool serve's
                    else ReqConnection(sock, head["request_id"], buffered))
            poller.register(conn.fileno(), select.POLLIN)
            worker.guard.fds.add(conn.fileno())
            owed = (head["owed_crc"], head["owed_error"]) if head["owed_error"] else None
            if call is not None:
                _serve_lent(worker, function, contexts, page, conn, call, owed)
                owed = None
        elif frame[0] == frames.RECALL and conn is not None:
            conn = _give_back(worker, poller, conn)
        elif frame[0] == frames.CALL:
            call_id, request = frames.split_seq(frame[1])
            worker.busy_since = time.monotonic()
            reply = call_function(worker, function, contexts, request)
            worker.busy_since = 0.0
            worker.processed += 1
            worker.link.send(frames.encode_seq(frames.REPLY, call_id, reply))


def _give_back(worker: Worker, poller: Any, conn: Any) -> None:
    """Close our copy of a lent connection and tell the supervisor (it reads it again)."""
    poller.unregister(conn.fileno())
    worker.guard.fds.discard(conn.fileno())
    conn.close()
    worker.link.send(frames.encode(frames.LOST))


def _serve_lent(worker: Worker, function: Any, contexts: Dict[Tuple[Any, ...], WorkerContext],
                page: Optional[CallPage], conn: Any, call: bytes,
                owed: Optional[Tuple[int, str]]) -> None:
    """Run one call that arrived on a lent connection and answer eKuiper directly. The first
    call after a reconnect may be eKuiper's copy of one a dead worker began: it is answered
    with ``owed``'s error, never run twice."""
    if page is not None:
        page.begin(call, time.monotonic())
    if owed is not None and call_crc(call) == owed[0]:
        reply = wire.func_error(owed[1])
    else:
        reply = call_function(worker, function, contexts, call)
    worker.guard.check()
    if page is not None:
        page.replying()
    try:
        conn.send(reply)
    except OSError:  # eKuiper closed it: the next poll reads its end and gives it back
        pass
    if page is not None:
        page.finish(not is_error_reply(reply))
    worker.processed += 1


def call_function(worker: Worker, function: Any, contexts: Dict[Tuple[Any, ...], WorkerContext],
                  request: bytes) -> bytes:
    """Answer one eKuiper function request with ``{"state", "result"}`` bytes."""
    rule = "-"
    try:
        req = wire.loads(request)
        name, args = req.get("func"), req.get("arg")
        if name == "Validate":
            err = function.validate(args)
            return wire.func_reply(False, err) if err else wire.func_reply(True, "")
        if name == "IsAggregate":
            return wire.func_reply(True, function.is_aggregate())
        if name != "Exec":
            return wire.func_error(f"{worker.where()}: unknown request {name!r}")
        if not isinstance(args, list) or not args or not isinstance(args[-1], str):
            return wire.func_error(f"{worker.where()}: Exec needs its arguments and the "
                                   f"function meta as the last argument")
        meta = wire.loads(args[-1])
        key = tuple(meta.get(k) for k in ("ruleId", "opId", "instanceId", "funcId"))
        if None in key:
            return wire.func_error(f"{worker.where()}: function meta {args[-1]} needs ruleId, "
                                   f"opId, instanceId and funcId")
        rule = key[0]
        ctx = contexts.get(key)
        if ctx is None:
            ctx = contexts[key] = WorkerContext(worker.ctrl.symbol, key[0], key[1], key[2], worker.state)
        return wire.func_reply(True, function.exec(args[:-1], ctx))
    except Exception as e:  # noqa: BLE001 - the error goes back to the rule
        text = f"{worker.where()} rule {rule}: {type(e).__name__}: {e}"
        worker.log.warning("%s", text)
        return wire.func_error(text)


# --- spawn start method ----------------------------------------------------------------

def spawn_main(argv: list) -> int:
    """``kuiper_pool.runtime.worker <payload fd> <log_level> <link fd> <zygote's kuiper_pool
    version>`` (started by ``launch.python_command`` with the plugin's folder first on
    sys.path): load the cloudpickled factories from the sealed memfd the supervisor wrote and
    every spawned worker inherits (never a path, never a socket), serve. The version comes
    last, where a worker of an older kuiper_pool ignores it."""
    import cloudpickle

    from ..version import __version__

    payload, level, fd = int(argv[1]), argv[2], int(argv[3])
    made_by = argv[4] if len(argv) > 4 else "a version that does not say it"
    if made_by != __version__:  # its frames may not be the supervisor's: serve nothing
        print(f"kuiper_pool worker pid {os.getpid()}: kuiper_pool {__version__} is installed now, "
              f"the plugin's supervisor runs {made_by}: restart the plugin in eKuiper to run the "
              f"installed version", flush=True)
        return EXIT_VERSION
    size, chunks, offset = os.fstat(payload).st_size, [], 0
    while offset < size:  # pread: the fd's offset is shared with every other spawned worker
        chunk = os.pread(payload, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    os.close(payload)
    plugin = PluginConfig(**cloudpickle.loads(b"".join(chunks)))
    logs.setup(plugin.name, level)
    try:
        return run(socket.socket(fileno=fd), plugin, spawned=True)
    except ConnectionError:  # the supervisor went away, as a forked worker's zygote reports it
        return EXIT_ORPHAN


if __name__ == "__main__":
    sys.exit(spawn_main(sys.argv))
