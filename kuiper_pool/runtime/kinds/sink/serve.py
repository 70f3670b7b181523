"""A sink's worker half (README, "Data paths"): items relayed by the supervisor (ITEMS,
ITEM_FD) or, for an acked sink under the native transport, read off eKuiper's data
connection lent to the worker (:class:`LentSink`, with the item page ``page.py``), each
collected with the collect mark around it; progress (DONE) and acks (ACK, or on the lent
ack connection) go back. The supervisor's half is ``route.py``.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any, Optional, Union

from .... import wire
from ....transport.sp import frame as sp_frame
from ....transport.sp import frame_header as sp_frame_header
from ....transport.sp import scratch
from ... import frames as link_frames
from ...context import WorkerContext
from ...worker import EXIT_CONFIGURE, EXIT_OK, Worker
from . import frames
from .frames import Why
from .marks import CollectMark
from .page import CAPACITY, FREE, HOLDING, LENT, SP_FRAME, SinkPage, fits, open_sink_page

DONE_EVERY = 32       # sink progress is reported at least this often
PARTIAL_SPINS = 100   # a lent sink connection holds part of a frame: look again at once
PARTIAL_WAIT = 0.001  # this many times, then after this (a peer that stalls mid-frame)
ACK_WAIT_SHARE = 0.5  # of stop_grace a stopping sink waits for a pending ack; close gets the rest


def run(worker: Worker, sink: Any) -> int:
    """Configure and open the sink, report READY, collect what comes until STOP."""
    ctrl = worker.ctrl
    if not worker.configure(lambda: sink.configure(ctrl.config)):
        return EXIT_CONFIGURE
    require_ack = wire.require_ack(ctrl.config)
    # the collect mark, shared with the supervisor: [0] the seq whose collect began, [1]
    # whose collect returned (LENT | n for an item taken off a lent connection). An acked sink
    # under transport sp gets an item page with it and may be lent eKuiper's connections.
    mark = _map_page(worker.link.fds.popleft()) if worker.spec.page else None
    worker.hold_page(mark)
    current = mark.slots if mark is not None else [0, 0]
    lent = LentSink(worker, mark) if isinstance(mark, SinkPage) else None
    for owned in (mark, lent):
        if owned is not None:
            worker.release(owned.close)
    owed = AckOwed()

    def ack(data: bytes) -> None:
        # With requireAck an item is finished at its ack, whenever it comes (from collect or
        # later, from another thread): no DONE stands for it, so a late ack is never dropped.
        # eKuiper sends the next item only after this ack, so ``current`` is still its item.
        if worker.stopped.is_set():  # after the end (a shared worker's instance): its page is gone
            return
        if current[0] & LENT and lent is not None:
            lent.ack(data)
        else:
            worker.link.send(frames.Ack(current[0], data).encode())
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
        if frame is None or frame[0] == link_frames.STOP:
            break
        if frame[0] == frames.CONN and lent is not None:
            lent.attach(worker.link.fds.popleft(), worker.link.fds.popleft())
            continue
        if frame[0] == frames.ITEMS:
            items = frames.Items.decode(frame[1])
        elif frame[0] == frames.ITEM_FD:
            items = frames.ItemFd.decode(frame[1], worker.link.fds.popleft())
        else:
            continue
        done = reported = 0
        for seq, data in items:
            try:
                collect(seq, data)
            except Exception as e:  # noqa: BLE001
                if done > reported:
                    worker.link.send(frames.Done(done).encode())
                return worker.fault("collect", e)
            if not require_ack:
                done = seq
            if done > reported and seq % DONE_EVERY == 0:
                worker.link.send(frames.Done(done).encode())
                reported = done
        if done > reported:
            worker.link.send(frames.Done(done).encode())
    if not owed.wait(worker.spec.stop_grace * ACK_WAIT_SHARE):
        worker.log.warning("%s: the ack of the last item did not come within %gs of the stop; "
                           "the item goes to the next worker", worker.where(),
                           worker.spec.stop_grace * ACK_WAIT_SHARE)
    try:
        sink.close(ctx)
    except Exception as e:  # noqa: BLE001
        worker.log.error("%s: close raised %s: %s", worker.where(), type(e).__name__, e)
    return EXIT_OK


def _map_page(fd: int) -> Union[CollectMark, SinkPage]:
    """The page the supervisor made, mapped; its descriptor is closed (the mapping holds it)."""
    try:
        return open_sink_page(fd)
    finally:
        os.close(fd)


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
    page that records the one item in hand (``page.py``). The descriptors share their
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
        self.runner = threading.get_ident()

    def close(self) -> None:
        """Its instance ended in a shared worker: eKuiper's connections and the wake pipe
        are closed (a late ack of plugin code after this does nothing)."""
        with self.lock:
            self.give_back(None)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.wake_w = -1

    def attach(self, data_fd: int, ack_fd: int) -> None:
        self.give_back(None)
        self.data = socket.socket(fileno=data_fd)
        self.acks = socket.socket(fileno=ack_fd)
        self.worker.guard.fds.update((data_fd, ack_fd))

    def give_back(self, why: Optional[Why]) -> None:
        """Close our copies; ``why`` (None: a new lend replaces them) tells the supervisor
        to read the data connection itself again."""
        if self.data is None:
            return
        self._poll_data(False)
        self.worker.guard.fds.difference_update((self.data.fileno(), self.acks.fileno()))
        self.data.close()
        self.acks.close()
        self.data = self.acks = None
        if why is not None:
            self.worker.link.send(frames.Lost(why).encode())

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
            self.give_back(Why.STALLED)
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
        """The next item, taken with one recv once its whole frame is in the socket (one peek
        tells both: eKuiper sends the next item only after this one's ack)."""
        assert self.data is not None
        peek = scratch()[:CAPACITY]
        try:
            avail = self.data.recv_into(peek, len(peek), socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:
            self.give_back(Why.CLOSED)
            return None
        if avail == 0:
            self.give_back(Why.CLOSED)  # eKuiper closed it: it dials again
            return None
        if avail < SP_FRAME:
            self._partial()  # part of a frame: the rest is being written
            return None
        kind, length = sp_frame_header(peek[:SP_FRAME])
        if kind != 1 or not fits(length):
            self.give_back(Why.LARGE)  # the supervisor relays it (or drops a bad peer)
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
            if self.wake_w < 0 or self.page.state != HOLDING:  # closed, or not in hand
                return
            self.page.acking()
            try:
                if self.acks is not None:
                    rest = _send_within(self.acks, sp_frame(data), frames.ACK_WAIT)
                    if rest:  # eKuiper reads no acks now: the supervisor queues the rest, never waiting
                        self.worker.link.send(frames.AckRest(rest).encode())
                        self.stalled = True
            finally:
                self.page.acked()
        if threading.get_ident() != self.runner:  # a late ack: the runner waits in poll
            with self.lock:
                if self.wake_w >= 0:
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

