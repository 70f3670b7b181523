"""A function symbol's data path (README, "Data paths"; docs/protocol.md, "Functions").

The supervisor dials eKuiper's REP socket (a REQ endpoint used the inverted way: eKuiper's
call is the reply to our request). Lent (native transport): while a worker is ready it owns
the connection and answers eKuiper itself, noting each call in its call page; the supervisor
holds the channel only between workers, and ``owed`` remembers a call a dead worker had
begun, so that eKuiper's re-sent copy is answered with an error instead of being run twice.
Relayed (nng transport): the supervisor reads every call and forwards it to the worker.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any, Optional, Tuple

from .... import wire
from ...health import overran
from ...states import State
from ..base import Counts, Route
from . import frames
from . import page as callpage
from .channel import FunctionChannel, FunctionIO
from .frames import Owed
from .page import EXECUTING, IDLE, CallPage, call_crc

if TYPE_CHECKING:
    from ...effects import WorkerHandle
    from ...instances import Instance

REDIAL_DELAY = 1.0       # seconds before a failed dial of eKuiper's function channel is retried


class FunctionRoute(Route):
    """Calls of one function symbol: lending, taking back, call_deadline, owed calls."""

    kill_signal = signal.SIGKILL   # a function has no close to run; a lent call is answered after the exit

    def __init__(self, inst: "Instance") -> None:
        super().__init__(inst)
        self.io: FunctionIO = self.fx.io(FunctionIO)
        self.channel: Optional[FunctionChannel] = None
        self.reopen_at = 0.0                    # when to dial a lost channel again
        self.answer_by = 0.0                    # the first start is refused if not up by then

    # --- lifecycle events -------------------------------------------------------------------

    def open(self, first: bool) -> None:
        if first and self.channel is None:  # dialed in the loop (native): never waited for here
            self._attach(self.io.open_function(self.inst))
            self.answer_by = self.fx.now() + self.inst.s.dial_timeout

    def start_answer(self, now: float) -> Optional[str]:
        """Answered once eKuiper's channel is up, refused after dial_timeout."""
        chan = self.channel
        if chan is None or chan.lent or chan.req.connected():
            return ""
        if now < self.answer_by:
            return None
        return (f"cannot open eKuiper's channel: no connection to "
                f"{wire.function_url(self.inst.ctrl.symbol)} within dial_timeout "
                f"{self.inst.s.dial_timeout:g}s")

    def on_ready(self, w: "WorkerHandle", first: bool) -> None:
        if self.channel is not None:
            self._serve(w, self.channel)
        else:  # after contain or a lost channel: dial again
            self._reopen(None)

    def on_kill(self, w: "WorkerHandle", why: str) -> None:
        chan = self.channel
        if chan is not None and chan.call is not None and chan.forwarded:
            self._error(f"{self.inst.where()}: {why}; the worker is being replaced")

    def on_worker_gone(self, w: "WorkerHandle", how: str, cause: str) -> None:
        self._take_back(w, how, cause)

    def open_page(self, w: "WorkerHandle", lends: bool) -> Optional[int]:
        if not lends:
            return None
        fd = callpage.create()
        w.page = CallPage(fd)
        return fd

    def on_crashed(self, w: Optional["WorkerHandle"], how: str, cause: str) -> None:
        chan = self.channel
        if chan is not None and chan.call is not None and chan.forwarded:
            pid = w.pid if w is not None else 0
            self._error(f"{self.inst.where()}: worker pid {pid} died during the call "
                        f"({how}; {cause}); it is being restarted")

    def on_failed(self) -> None:
        if self.channel is not None and self.channel.call is not None:
            self._error(self.inst.failed_text())

    def recycled_itself(self, w: "WorkerHandle", status: int) -> bool:
        """A worker on a lent connection exits with EXIT_RECYCLED after max_calls; only a
        worker whose call page shows it has served them has recycled (plugin code can exit
        with any code)."""
        max_calls = self.inst.s.max_calls
        return bool(max_calls and os.WIFEXITED(status) and os.WEXITSTATUS(status) == frames.EXIT_RECYCLED
                    and w.vitals.calls >= max_calls)

    def busy(self) -> bool:
        return self.channel is not None and self.channel.call is not None

    def runs_until(self, w: "WorkerHandle") -> Tuple[float, str]:
        """A call on a lent connection finishes on the recycled worker within call_deadline
        (a reload never fails it); a relayed call is never in a recycled worker (``busy``)."""
        st = w.page.read() if w.page is not None else None
        if st is None or st.state == IDLE:
            return 0.0, ""
        deadline = self.inst.s.call_deadline
        return st.started + deadline, overran("call_deadline", deadline)

    def close(self) -> None:
        chan, self.channel = self.channel, None
        if chan is not None:
            self.io.close_function(self.inst, chan)

    def counts(self, w: "WorkerHandle") -> Counts:
        if w.page is None:
            return 0, 0, 0
        st = w.page.read()
        return st.seq, st.done, st.failed

    # --- calls ---------------------------------------------------------------------------------

    def on_readable(self, endpoint: Any) -> None:
        chan, inst = self.channel, self.inst
        if chan is None or endpoint is not chan.req or chan.lent or inst.state is State.REMOVED:
            return
        call = chan.take(self.fx.now())
        if call is None:
            return
        inst.items_in += 1
        owed, chan.owed = chan.owed, None  # only the first call after a reconnect can be it
        w = inst.worker
        if owed is not None and call_crc(call) == owed[0]:
            self._error(owed[1])  # eKuiper re-sent the call a dead worker began
        elif inst.state is State.FAILED:
            self._error(inst.failed_text())
        elif inst.state is State.RUNNING and w is not None and not w.kill_reason:
            self._serve(w, chan)
        # otherwise the call waits for the (re)started worker, within call_deadline

    def _error(self, text: str) -> None:
        assert self.channel is not None
        self.inst.errors += 1
        self.channel.reply(wire.func_error(text))

    def _serve(self, w: "WorkerHandle", chan: FunctionChannel) -> None:
        """A ready worker takes over: the whole connection (lendable) or the waiting call."""
        if chan.lendable:
            if not chan.req.connected():
                return  # redialing: the first call that arrives brings the worker in
            if chan.call is not None:
                self.inst.items_in -= 1  # the worker counts the calls it runs (call page)
            self.fx.watch(self.inst, chan.req, False)
            self.io.hand_over(w, chan.lend())
        elif chan.call is not None:
            chan.forwarded = True
            w.vitals.call_started = self.fx.now()
            w.vitals.calls += 1
            self.fx.send(w, frames.Call(chan.call_id, chan.call).encode())

    def on_frame(self, w: "WorkerHandle", ftype: int, payload: bytes) -> None:
        if ftype == frames.REPLY:
            self._on_reply(w, payload)
        elif ftype == frames.LOST:  # eKuiper closed the lent connection: dial it again
            self._take_back(w, "")
        else:
            super().on_frame(w, ftype, payload)

    def _on_reply(self, w: "WorkerHandle", payload: bytes) -> None:
        chan, inst = self.channel, self.inst
        reply = frames.Reply.decode(payload)
        if chan is None or chan.call is None or not chan.forwarded or reply.call_id != chan.call_id:
            return  # answered already (deadline, crash): a late reply is never the next answer
        w.vitals.call_started = 0.0
        inst.items_out += 1
        if not reply.ok:
            inst.errors += 1
        chan.reply(reply.data)
        if inst.s.max_calls:  # recycle before the next call, not at the next tick
            inst.check_health(w, self.fx.now())

    # --- the connection -------------------------------------------------------------------------

    def _attach(self, chan: FunctionChannel) -> None:
        self.channel = chan
        self.fx.watch(self.inst, chan.req, True)

    def _take_back(self, w: "WorkerHandle", how: str, cause: str = "") -> None:
        """A worker that held eKuiper's connection is gone (or lost it): count its calls,
        remember a call it had begun, and dial eKuiper again."""
        chan, inst = self.channel, self.inst
        if chan is None or not chan.lent:
            return
        owed = None
        page = w.page
        if page is not None:
            st = page.read()
            w.vitals.calls = st.seq
            inst.items_in += st.seq
            inst.items_out += st.done
            inst.errors += st.failed
            # eKuiper re-sends the call on the new connection only while it still waits for
            # the reply (docs/protocol.md, "Functions"); after that, the same bytes are a new call
            if how and st.state != IDLE and self.fx.now() < st.started + inst.s.ekuiper_recv_timeout:
                owed = (st.crc, f"{inst.where()}: worker pid {w.pid} died during the call "
                                 f"({how}; {cause}); it is being restarted")
            w.page = None
        self.close()
        self._reopen(owed)

    def _reopen(self, owed: Optional[Owed]) -> None:
        inst = self.inst
        try:
            chan = self.io.open_function(inst)
        except OSError as e:
            self.reopen_at = self.fx.now() + REDIAL_DELAY
            inst.last_error = " ".join(f"cannot reach eKuiper's function channel: {e}".split())
            self.fx.note(inst, logging.WARNING, "%s; trying again in %gs", inst.last_error, REDIAL_DELAY)
            return
        chan.owed = owed
        self._attach(chan)
        w = inst.worker
        if inst.state is State.RUNNING and w is not None and not w.kill_reason and owed is None:
            self._serve(w, chan)

    # --- the clock ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        inst = self.inst
        if self.channel is None and self.reopen_at and now >= self.reopen_at:
            self.reopen_at = 0.0
            self._reopen(None)
        chan = self.channel
        if chan is None or chan.lent:
            return
        chan.req.tick(now)
        if chan.call is not None and not chan.forwarded and now - chan.arrived > inst.s.call_deadline:
            self._error(f"{inst.where()}: no worker became ready within call_deadline "
                        f"{inst.s.call_deadline:g}s ({inst.state}: {inst.last_error})")

    def observe(self, w: "WorkerHandle") -> None:
        """What a worker that owns eKuiper's connection is doing: the running call counts
        for call_deadline once two ticks saw the same call (a torn read never kills)."""
        st = w.page.read() if w.page is not None else None
        if st is None:
            return
        v = w.vitals
        v.calls = st.seq
        if st.state == EXECUTING and w.page_seq == st.seq:
            v.call_started = st.started
        else:
            v.call_started = 0.0
        w.page_seq = st.seq if st.state == EXECUTING else -1
