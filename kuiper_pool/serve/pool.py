"""The workers of one function symbol under ``kuiper-pool serve``, and how a call finds one.

Each worker is a function instance of its own (``wire.Control`` with ``instance_id`` 1..N),
with the portable path's lifecycle and function route (``runtime/instances.py``,
``runtime/kinds/function/``): the route's "eKuiper channel" is a :class:`ServeEndpoint`
holding the one call the pool relayed to it, so deadlines, crash answers, restarts,
recycling and status are the route's. The pool gives each call to an idle worker, queues the
rest, and answers a queued call with an error once it waited call_deadline.

An idle worker may also be lent a client's connection (:class:`ServeRoute`): it then answers
that connection's calls itself, noting each in its call page, with no hop through the
supervisor; a call that waits for a worker makes the pool recall what it lent
(docs/serve.md, "How a call is served").
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Sequence

from .. import wire
from ..runtime.kinds.function import frames
from ..runtime.kinds.function.page import IDLE, REPLYING
from ..runtime.kinds.function.route import FunctionRoute
from ..runtime.states import State

if TYPE_CHECKING:
    from ..runtime.effects import WorkerHandle
    from ..runtime.instances import Instance

Done = Callable[[bytes], None]   # takes the worker's {"state", "result"} reply; runs in the loop


@dataclass
class Call:
    request: bytes    # the portable Exec request (schema.exec_request)
    done: Done
    arrived: float


class ServeEndpoint:
    """What a served instance's route holds in place of eKuiper's REQ endpoint: ``recv``
    gives the call the pool placed, ``send`` takes its reply (or the route's error)."""

    url = "rest"

    def __init__(self, on_reply: Callable[[bytes], None]) -> None:
        self.placed: Optional[bytes] = None
        self.on_reply = on_reply

    def fileno(self) -> int:
        return -1    # nothing to watch: the pool calls the instance's on_readable

    def connected(self) -> bool:
        return True

    def recv(self) -> Optional[bytes]:
        call, self.placed = self.placed, None
        return call

    def send(self, data: bytes) -> None:
        self.on_reply(data)

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


class Slot:
    """One worker's instance (a new one after a refused start), its endpoint, the call it
    holds and the connection lent to it."""

    def __init__(self, pool: "SymbolPool") -> None:
        self.pool = pool
        self.inst: "Instance" = None  # type: ignore[assignment]  # set by the supervisor at once
        self.route: "ServeRoute" = None  # type: ignore[assignment]  # the instance's route, likewise
        self.call: Optional[Call] = None
        self.lent: Any = None        # the client connection its worker holds (http.Conn)
        self.recalled = False        # asked to give it back
        self.endpoint = ServeEndpoint(lambda data: pool.replied(self, data))

    def idle(self) -> bool:
        """Running and holding nothing: neither a relayed call nor a lent connection (so a
        worker's death fails one call at most)."""
        inst, w = self.inst, self.inst.worker
        chan = self.route.channel
        return (self.call is None and self.lent is None and inst.state is State.RUNNING and w is not None
                and chan is not None and chan.call is None)

    def busy(self) -> bool:
        """A call is with its worker (relayed, or on the lent connection)."""
        w = self.inst.worker
        return self.call is not None or (w is not None and lent_call(w))

    def alive(self) -> bool:
        """Whether this worker may still serve (not removed, not failed for now)."""
        return self.inst.state not in (State.REMOVED, State.FAILED)


def lent_call(w: "WorkerHandle") -> bool:
    """Whether ``w``'s call page shows a call of a lent connection running."""
    return w.page is not None and w.page.read().state != IDLE


class ServeRoute(FunctionRoute):
    """A pooled worker's route: the function route (relayed calls, deadlines, crash answers)
    and the connection the pool lent its worker: given back on LOST, taken back when the
    worker is gone (a call it was running is answered with the error; one it was answering
    closes the connection, which may hold half an answer)."""

    def __init__(self, inst: "Instance", slot: Slot) -> None:
        super().__init__(inst)
        self.slot = slot
        self.relayed = 0   # calls relayed to the current worker (its call page counts the lent ones)

    def on_ready(self, w: "WorkerHandle", first: bool) -> None:
        self.relayed = 0
        super().on_ready(w, first)

    def on_frame(self, w: "WorkerHandle", ftype: int, payload: bytes) -> None:
        if ftype == frames.LOST:
            self.slot.pool.taken_back(self.slot, None, False)
        else:
            super().on_frame(w, ftype, payload)

    def on_worker_gone(self, w: "WorkerHandle", how: str, cause: str) -> None:
        inst, page = self.inst, w.page
        state = IDLE
        if page is not None:
            st = page.read()
            state = st.state
            w.vitals.calls = st.seq + self.relayed
            inst.items_in += st.seq
            inst.items_out += st.done
            inst.errors += st.failed
            w.page = None
        if self.slot.lent is None:
            return
        owed = None
        if state != IDLE:   # the call it was running: answered by the supervisor, as a relayed one would be
            inst.errors += 1
            owed = (f"{inst.where()}: worker pid {w.pid} died during the call ({how}; {cause}); "
                    f"it is being restarted")
        self.slot.pool.taken_back(self.slot, owed, state == REPLYING)

    def observe(self, w: "WorkerHandle") -> None:
        v = w.vitals
        relayed_at = v.call_started if self.busy() else 0.0
        super().observe(w)   # the call page: calls on the lent connection
        if w.page is not None:
            v.calls += self.relayed
            v.call_started = relayed_at or v.call_started


Send = Callable[["Instance", bytes, Sequence[int]], None]   # a frame (and fds) to the instance's worker


class SymbolPool:
    """Calls of one symbol: to an idle worker, else queued (FIFO) within call_deadline.
    ``deliver(inst, endpoint)`` makes the instance read what was placed (guarded); ``send``
    passes a frame to a worker; ``take_back(conn, owed, drop)`` gives a lent connection back
    to the HTTP server."""

    def __init__(self, symbol: str, call_deadline: float, args: Sequence[str], result: str,
                 deliver: Callable[["Instance", ServeEndpoint], None], send: Send,
                 take_back: Callable[[Any, Optional[str], bool], None]) -> None:
        self.symbol = symbol
        self.call_deadline = call_deadline
        self.deliver, self.send, self.take_back = deliver, send, take_back
        self.slots: List[Slot] = []
        self.queue: Deque[Call] = collections.deque()
        self.conn_frame = frames.Conn(0, None, rest={"path": f"/{symbol}", "args": list(args),
                                                     "result": result}).encode()

    def add(self) -> Slot:
        slot = Slot(self)
        self.slots.append(slot)
        return slot

    def in_flight(self) -> int:
        return len(self.queue) + sum(1 for s in self.slots if s.busy())

    def ready(self) -> bool:
        return any(s.inst.state is State.RUNNING for s in self.slots)

    def submit(self, call: Call) -> None:
        self.queue.append(call)
        self.dispatch()

    def lend(self, conn: Any) -> bool:
        """Lend ``conn`` (a call of this symbol waits in it) to an idle worker; False when
        none is."""
        if self.queue:
            return False
        for slot in self.slots:
            if slot.idle():
                slot.lent = conn
                self.send(slot.inst, self.conn_frame, [conn.fd])
                return True
        return False

    def taken_back(self, slot: Slot, owed: Optional[str], drop: bool) -> None:
        conn, slot.lent, slot.recalled = slot.lent, None, False
        if conn is not None:
            self.take_back(conn, owed, drop)
        self.dispatch()

    def dispatch(self) -> None:
        for slot in self.slots:
            if not self.queue:
                return
            if slot.idle():
                slot.call = call = self.queue.popleft()
                slot.endpoint.placed = call.request
                slot.route.relayed += 1
                self.deliver(slot.inst, slot.endpoint)
        if not self.queue:
            return
        for slot in self.slots:  # calls wait: the workers that hold connections give them back
            if slot.lent is not None and not slot.recalled and slot.inst.worker is not None:
                slot.recalled = True
                self.send(slot.inst, frames.recall(), ())

    def replied(self, slot: Slot, data: bytes) -> None:
        call, slot.call = slot.call, None
        if call is not None:
            call.done(data)
        self.dispatch()

    def tick(self, now: float) -> None:
        self.dispatch()
        if not self.queue:
            return
        if not any(s.alive() for s in self.slots):
            why = "; ".join(sorted({s.inst.last_error for s in self.slots if s.inst.last_error}))
            self.fail_all(f"function {self.symbol}: no worker can serve it: {why or 'none started'}")
            return
        while self.queue and now - self.queue[0].arrived > self.call_deadline:
            self.queue.popleft().done(wire.func_error(
                f"function {self.symbol}: no worker became free within call_deadline "
                f"{self.call_deadline:g}s"))

    def fail_all(self, text: str) -> None:
        """Answer every queued call with ``text`` (the calls workers hold are the route's)."""
        while self.queue:
            self.queue.popleft().done(wire.func_error(text))
