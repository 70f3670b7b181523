"""A sink's data path: the supervisor listens on eKuiper's data path and dials its ack
path (README, "Data paths"). Items get sequence numbers and stay in ``inflight`` until the
worker reports them finished (DONE) or acks them, so a replacement worker gets exactly the
unfinished ones again; an item that has ended ``sink_max_deliveries`` workers is poison.

An acked sink under ``transport: sp`` lends both connections to its worker while nothing
is in flight: the worker takes each item into its item page (``page.py``) and acks
eKuiper itself. When it dies the page tells whether it owed an item, which then goes to
the replacement like any unfinished one; the worker gives the connections back for an
item too large for the page or when eKuiper closed the data connection.

Acks are never dropped while eKuiper's connection lives: past ACK_BACKLOG bytes of acks
eKuiper has not read, the route stops reading its data until they have gone out.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from .... import wire
from ....transport import TransportError
from ...states import State
from ..base import Counts, Route
from . import frames
from . import page as sinkpage
from .channel import SinkIO
from .marks import CollectMark
from .page import ACKING, LENT, RECEIVING, SinkPage

if TYPE_CHECKING:
    from ...effects import WorkerHandle
    from ...instances import Instance

MAX_BATCH = 256     # sink items moved per wake-up
ITEM_OVERHEAD = 128  # bytes an in-flight item costs beyond its payload (counted in the window)
ACK_BACKLOG = 1 << 20   # bytes of acks waiting for eKuiper beyond which a sink stops reading
# After a worker gave the connections back for an item too big for its page, this many items
# in a row must fit the page before they are lent again: a stream of big items (images) is
# relayed without a lend and a give-back around each one.
RELAY_AFTER_LARGE = 16
Items = List[Tuple[int, Any]]   # bytes, or a big item held in a memfd (frames.SPILL)


class Item:
    """One item eKuiper handed over, held until a worker's collect of it is finished."""

    __slots__ = ("data", "faults", "acked")

    def __init__(self, data: Any) -> None:
        self.data = data      # bytes, or a big item held in a memfd until it is finished
        self.faults = 0       # workers that died while its collect was running
        self.acked = False


def items_page(w: "WorkerHandle") -> Optional[SinkPage]:
    """``w``'s item page: its collect mark, when it may be lent eKuiper's connections."""
    return w.page if isinstance(w.page, SinkPage) else None


class SinkRoute(Route):
    """eKuiper's sink data and ack channels for one sink instance, and its in-flight items.

    ``pull`` listens on the data path (opened before eKuiper is answered ``ok``), ``ack``
    is dialed to eKuiper's ack path (watched too: its redials and queued acks advance on
    readiness); both are transport endpoints, None while closed."""

    def __init__(self, inst: "Instance") -> None:
        super().__init__(inst)
        self.io: SinkIO = self.fx.io(SinkIO)
        self.require_ack = wire.require_ack(inst.ctrl.config)
        self.window = int(inst.s.sink_window_mb * 1048576)   # bytes
        self.held = 0    # bytes of the items in ``inflight`` (payload + ITEM_OVERHEAD each)
        self.max_deliveries = inst.s.sink_max_deliveries
        self.inflight: "OrderedDict[int, Item]" = OrderedDict()
        self.next_seq = 1
        self.pull: Any = None
        self.ack: Any = None
        self.reading = False
        self.lent_to: "Optional[WorkerHandle]" = None   # the worker holding both connections
        self.relay_for = 0   # items that must fit the item page before the next lend

    # --- lifecycle events -------------------------------------------------------------------

    def open(self, first: bool) -> None:
        if self.pull is None:  # the first start, or a sink retried after contain closed it
            self.pull, self.ack = self.io.open_sink(self.inst)
            self.fx.watch(self.inst, self.ack, True)

    def on_ready(self, w: "WorkerHandle", first: bool) -> None:
        if not first:
            self._redeliver(w)
        self._on_data()
        self._lend(w)

    def _lend(self, w: "WorkerHandle") -> None:
        """Lend eKuiper's connections to ``w`` when nothing is in flight (an item relayed
        and not acked would race one the worker reads itself: acks match by order)."""
        inst = self.inst
        if (self.require_ack and self.lent_to is None and not self.inflight and not self.relay_for
                and self.pull is not None
                and inst.state is State.RUNNING and inst.worker is w
                and self.io.lend_sink(w, self.pull, self.ack)):
            self.lent_to = w

    def _take_back(self) -> None:
        """Read the data connection here again (the worker gave it back or is gone)."""
        if self.lent_to is not None:
            self.lent_to = None
            if self.pull is not None:
                self.io.take_back_sink(self.pull)

    def on_worker_gone(self, w: "WorkerHandle", how: str, cause: str) -> None:
        page = items_page(w)
        if page is None:
            return
        st, owed = page.read(), page.owed()
        inst = self.inst
        inst.items_in += st.taken + (owed is not None and st.state == RECEIVING)
        inst.items_out += st.acked
        if self.lent_to is w:
            self._take_back()
        if owed is not None:  # it goes to the replacement first
            seq = self.next_seq
            self.next_seq += 1
            self.inflight[seq] = Item(owed)
            self.inflight.move_to_end(seq, last=False)
            self.held += len(owed) + ITEM_OVERHEAD
            if page.running() & LENT:  # its collect was running: the mark names it now
                page.slots[0] = seq
        elif st.state == ACKING:
            self.fx.note(inst, logging.WARNING, "worker pid %d died while writing an ack: "
                         "counted as sent (a second ack would answer the next item)", w.pid)

    def signal_deferred(self, w: "WorkerHandle") -> bool:
        page = items_page(w)
        return page is not None and page.read().state == ACKING

    def counts(self, w: "WorkerHandle") -> Counts:
        page = items_page(w)
        if page is None:
            return 0, 0, 0
        st = page.read()
        return st.taken, st.acked, 0

    def open_page(self, w: "WorkerHandle", lends: bool) -> Optional[int]:
        """The collect mark; with the item page when the worker may be lent eKuiper's
        connections (an acked sink under transport sp)."""
        items = lends and self.require_ack
        fd = sinkpage.create(items)
        try:
            w.page = SinkPage(fd) if items else CollectMark(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def on_crashed(self, w: Optional["WorkerHandle"], how: str, cause: str) -> None:
        """Charge the item whose collect was running, and only it: a crash by a fault of
        the item. A stop, recycle or restart we asked for never comes here."""
        item = self.inflight.get(w.page.running()) if w is not None and w.page is not None else None
        if item is not None:
            item.faults += 1

    def on_stopping(self, w: "WorkerHandle", running: bool) -> None:
        self._read(False)
        if running:  # what eKuiper sent before closing its side
            self._deliver(w, self._take())

    def on_failed(self) -> None:
        inst = self.inst
        if self.inflight:  # eKuiper waits for their acks
            lost = self._fail_all(inst.failed_text())
            inst.errors += lost
            self.fx.note(inst, logging.ERROR, "dropped %d unfinished item(s)", lost)
        self._read(self.require_ack)  # refuse with error acks; without acks stop reading

    def close(self) -> None:
        pull, ack, self.pull, self.ack = self.pull, self.ack, None, None
        self.reading = False
        self.lent_to = None
        if pull is not None:
            self.io.close_sink(self.inst, pull, ack)

    # --- eKuiper's data channel -----------------------------------------------------------------

    def on_readable(self, endpoint: Any) -> None:
        if endpoint is self.pull:
            self._on_data()
        elif endpoint is self.ack:  # a redial's progress, acks out, or eKuiper gone
            self.ack.pump(self.fx.now())
            self._resume()
            if self.inst.worker is not None:  # lent once the acks have gone out
                self._lend(self.inst.worker)

    def on_notice(self, lost: bool, text: str) -> None:
        """What eKuiper's data channel reports: an item lost (logged and counted as an
        error), or a change in how items are held."""
        if lost:
            self.inst.errors += 1
        self.fx.note(self.inst, logging.ERROR if lost else logging.WARNING, "%s", text)

    def tick(self, now: float) -> None:
        if self.ack is not None:
            backlog = self.ack.pending() > ACK_BACKLOG
            self.ack.tick(now)   # a due redial, a peer silent past its header timeout, nng's queued acks
            if backlog and self.ack.pending() <= ACK_BACKLOG:  # reading stopped for them goes on
                self._resume()

    def _full(self) -> bool:
        """No room for more items: the window is full, or acks eKuiper does not read pile
        up (never dropped; reading resumes as they go out)."""
        return self.held >= self.window or self.ack.pending() > ACK_BACKLOG

    def _resume(self) -> None:
        if (self.inst.state is State.RUNNING and self.pull is not None and not self.reading
                and not self._full()):
            self._read(True)

    def _on_data(self) -> None:
        inst = self.inst
        state = inst.state
        if self.pull is None or state is State.REMOVED:
            return
        if state is State.FAILED:
            inst.errors += self._refuse(inst.failed_text())
            if not self.require_ack:
                self._read(False)  # no acks to answer with: let eKuiper's sends time out
            return
        if state is State.STOPPING:
            self._read(False)
            return
        w = inst.worker
        running = state is State.RUNNING and w is not None
        items = self._take()
        inst.items_in += len(items)
        if running:
            self._deliver(w, items)
        self._read(not self._full())  # back-pressure: DONE frames and acks going out resume reading

    def _read(self, on: bool) -> None:
        if on != self.reading and self.pull is not None:
            self.reading = on
            self.fx.watch(self.inst, self.pull, on)

    def _take(self) -> Items:
        """Move what eKuiper sent into ``inflight``; return the new items."""
        out = []
        for data in self.pull.recv_many(MAX_BATCH) if self.held < self.window else ():
            seq = self.next_seq
            self.next_seq += 1
            self.inflight[seq] = Item(data)
            self.held += len(data) + ITEM_OVERHEAD
            out.append((seq, data))
            if self.relay_for:
                self.relay_for = self.relay_for - 1 if sinkpage.fits(len(data)) else RELAY_AFTER_LARGE
        return out

    def _finish(self, seq: int) -> None:
        """``seq`` leaves ``inflight`` (finished, acked, dropped or refused)."""
        item = self.inflight.pop(seq, None)
        if item is not None:
            self.held -= len(item.data) + ITEM_OVERHEAD

    def _deliver(self, w: "WorkerHandle", items: Items) -> None:
        for frame, fds in frames.item_frames(items):
            self.fx.send(w, frame, fds)

    def _redeliver(self, w: "WorkerHandle") -> None:
        """Hand the unfinished items to a replacement worker; drop as poison those whose
        collect was running when ``max_deliveries`` workers died."""
        again, poison = [], []
        for seq, item in list(self.inflight.items()):
            if item.faults >= self.max_deliveries:
                poison.append(seq)
                self._finish(seq)
                if not item.acked:
                    self._send_ack(wire.sink_ack_error(
                        f"item dropped: {item.faults} workers died during its collect"))
                continue
            again.append((seq, item.data))
        inst = self.inst
        if poison:
            inst.errors += len(poison)
            self.fx.note(inst, logging.ERROR, "dropped %d item(s) whose collect was running when "
                         "a worker died %d times: %s", len(poison), self.max_deliveries, poison)
        if again:
            self.fx.note(inst, logging.INFO, "redelivering %d unfinished item(s)", len(again))
            self._deliver(w, again)

    def _refuse(self, reason: str) -> int:
        """A failed sink: answer what eKuiper sends with error acks, or hold it back."""
        if not self.require_ack:
            return 0
        n = 0
        for seq, _data in self._take():
            self._finish(seq)
            self._send_ack(wire.sink_ack_error(reason))
            n += 1
        return n

    def _fail_all(self, reason: str) -> int:
        """Error-ack every unfinished item not acked yet and forget them all (nothing will
        finish them); return how many were not acked."""
        n = 0
        for item in self.inflight.values():
            if not item.acked:
                n += 1
                self._send_ack(wire.sink_ack_error(reason))
        self.inflight.clear()
        self.held = 0
        return n

    # --- progress and acks from the worker ---------------------------------------------------------

    def on_frame(self, w: "WorkerHandle", ftype: int, payload: bytes) -> None:
        if ftype == frames.LOST:  # the worker gave the connections back: relay what comes
            why = frames.Lost.decode(payload).why
            if self.lent_to is w:
                if why is frames.Why.LARGE:
                    self.relay_for = RELAY_AFTER_LARGE
                self._take_back()
                self._on_data()
            return
        if ftype == frames.ACK_REST:  # its start is on the ack connection: the end goes next
            if self.require_ack and self.ack is not None:   # (the connections come back next)
                self.ack.send_rest(frames.AckRest.decode(payload).rest)
                self.fx.note(self.inst, logging.WARNING, "eKuiper has not read an ack for %gs: "
                             "acks queue in the supervisor until it does", frames.ACK_WAIT)
            return
        before = len(self.inflight)
        if ftype == frames.ACK:  # acked is finished: no DONE follows for it
            ack = frames.Ack.decode(payload)
            self._acked(ack.seq, ack.data)
            self._finish(ack.seq)
        elif ftype == frames.DONE:
            seq = frames.Done.decode(payload).seq
            while self.inflight:
                first = next(iter(self.inflight))
                if first > seq:
                    break
                self._finish(first)
        else:
            super().on_frame(w, ftype, payload)
        inst = self.inst
        inst.items_out += before - len(self.inflight)
        self._resume()
        self._lend(w)

    def _acked(self, seq: int, data: bytes) -> None:
        """Forward the worker's ack for ``seq`` unless that item was acked already."""
        item = self.inflight.get(seq)
        if item is None or item.acked or not self.require_ack:
            return
        item.acked = True
        self._send_ack(data)

    def _send_ack(self, data: bytes) -> None:
        if not self.require_ack or self.ack is None:
            return
        try:
            self.ack.send(data)
        except TransportError:
            pass  # eKuiper closed the rule: nobody waits for this ack any more

