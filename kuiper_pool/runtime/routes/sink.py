"""A sink's data path: the supervisor listens on eKuiper's data path and dials its ack
path (README, "Data paths"). Items get sequence numbers and stay in ``inflight`` until the
worker reports them finished (DONE) or acks them, so a replacement worker gets exactly the
unfinished ones again; an item that has ended ``sink_max_deliveries`` workers is poison.
Acks are never dropped while eKuiper's connection lives: past ACK_BACKLOG bytes of acks
eKuiper has not read, the route stops reading its data until they have gone out.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from ... import wire
from ...transport import TransportError
from .. import callpage, frames
from ..marks import CollectMark
from ..states import State
from .base import Route

if TYPE_CHECKING:
    from ..effects import WorkerHandle
    from ..instances import Instance

MAX_BATCH = 256     # sink items moved per wake-up
ACK_BACKLOG = 1 << 20   # bytes of acks waiting for eKuiper beyond which a sink stops reading
Items = List[Tuple[int, Any]]   # bytes, or a big item held in a memfd (frames.SPILL)


@dataclass
class Item:
    data: Any   # bytes, or a big item held in a memfd until it is finished
    faults: int = 0         # workers that died while its collect was running
    acked: bool = False


class SinkRoute(Route):
    """eKuiper's sink data and ack channels for one sink instance, and its in-flight items.

    ``pull`` listens on the data path (opened before eKuiper is answered ``ok``), ``ack``
    is dialed to eKuiper's ack path (watched too: its redials and queued acks advance on
    readiness); both are transport endpoints, None while closed."""

    def __init__(self, inst: "Instance") -> None:
        super().__init__(inst)
        self.require_ack = wire.require_ack(inst.ctrl.config)
        self.window = inst.s.sink_window
        self.max_deliveries = inst.s.sink_max_deliveries
        self.inflight: "OrderedDict[int, Item]" = OrderedDict()
        self.next_seq = 1
        self.pull: Any = None
        self.ack: Any = None
        self.reading = False

    # --- lifecycle events -------------------------------------------------------------------

    def open(self, first: bool) -> None:
        if self.pull is None:  # the first start, or a sink retried after contain closed it
            self.pull, self.ack = self.fx.open_sink(self.inst)
            self.fx.watch(self.inst, self.ack, True)

    def on_ready(self, w: "WorkerHandle", first: bool) -> None:
        if not first:
            self._redeliver(w)
        self._on_data()

    def open_page(self, w: "WorkerHandle", lends: bool) -> Optional[int]:
        fd = callpage.create()
        w.mark = CollectMark(fd)
        return fd

    def on_crashed(self, w: Optional["WorkerHandle"], how: str, cause: str) -> None:
        """Charge the item whose collect was running, and only it: a crash by a fault of
        the item. A stop, recycle or restart we asked for never comes here."""
        item = self.inflight.get(w.mark.running()) if w is not None and w.mark is not None else None
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
        if pull is not None:
            self.fx.close_sink(self.inst, pull, ack)

    # --- eKuiper's data channel -----------------------------------------------------------------

    def on_readable(self, endpoint: Any) -> None:
        if endpoint is self.pull:
            self._on_data()
        elif endpoint is self.ack:  # a redial's progress, acks out, or eKuiper gone
            self.ack.pump(self.fx.now())
            self._resume()

    def tick(self, now: float) -> None:
        if self.ack is not None:
            self.ack.tick(now)   # a due redial, or a peer silent past its header timeout

    def _full(self) -> bool:
        """No room for more items: the window is full, or acks eKuiper does not read pile
        up (never dropped; reading resumes as they go out)."""
        return len(self.inflight) >= self.window or self.ack.pending() > ACK_BACKLOG

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
        room = min(MAX_BATCH, self.window - len(self.inflight))
        out = []
        for data in self.pull.recv_many(room) if room > 0 else ():
            seq = self.next_seq
            self.next_seq += 1
            self.inflight[seq] = Item(data)
            out.append((seq, data))
        return out

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
                del self.inflight[seq]
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
            del self.inflight[seq]
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
        return n

    # --- progress and acks from the worker ---------------------------------------------------------

    def on_frame(self, w: "WorkerHandle", ftype: int, payload: bytes) -> None:
        if ftype not in (frames.DONE, frames.ACK):
            super().on_frame(w, ftype, payload)
        seq, data = frames.split_seq(payload)
        before = len(self.inflight)
        if ftype == frames.ACK:  # acked is finished: no DONE follows for it
            self._acked(seq, data)
            self.inflight.pop(seq, None)
        else:
            while self.inflight:
                first = next(iter(self.inflight))
                if first > seq:
                    break
                del self.inflight[first]
        inst = self.inst
        inst.items_out += before - len(self.inflight)
        self._resume()

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

