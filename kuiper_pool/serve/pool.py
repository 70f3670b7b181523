"""The workers of one function symbol under ``kuiper-pool serve``, and how a call finds one.

Each worker is a function instance of its own (``wire.Control`` with ``instance_id`` 1..N),
with the portable path's lifecycle and route unchanged (``runtime/instances.py``,
``runtime/kinds/function/``): the route's "eKuiper channel" is a :class:`ServeEndpoint`
holding the one call the pool gave it, so deadlines, crash answers, restarts, recycling and
status are the route's. The pool gives each call to an idle worker, queues the rest, and
answers a queued call with an error once it waited call_deadline.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, List, Optional

from .. import wire
from ..runtime.states import State

if TYPE_CHECKING:
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
    """One worker's instance (a new one after a refused start), its endpoint and the call
    it holds."""

    def __init__(self, pool: "SymbolPool") -> None:
        self.inst: "Instance" = None  # type: ignore[assignment]  # set by the supervisor at once
        self.call: Optional[Call] = None
        self.endpoint = ServeEndpoint(lambda data: pool.replied(self, data))

    def idle(self) -> bool:
        inst, w = self.inst, self.inst.worker
        route = inst.route
        chan = getattr(route, "channel", None)
        return (self.call is None and inst.state is State.RUNNING and w is not None
                and not w.kill_reason and chan is not None and chan.call is None)

    def alive(self) -> bool:
        """Whether this worker may still serve (not removed, not failed for now)."""
        return self.inst.state not in (State.REMOVED, State.FAILED)


class SymbolPool:
    """Calls of one symbol: to an idle worker, else queued (FIFO) within call_deadline.
    ``deliver(inst, endpoint)`` makes the instance read what was placed (guarded)."""

    def __init__(self, symbol: str, call_deadline: float,
                 deliver: Callable[["Instance", ServeEndpoint], None]) -> None:
        self.symbol = symbol
        self.call_deadline = call_deadline
        self.deliver = deliver
        self.slots: List[Slot] = []
        self.queue: Deque[Call] = collections.deque()

    def add(self) -> Slot:
        slot = Slot(self)
        self.slots.append(slot)
        return slot

    def in_flight(self) -> int:
        return len(self.queue) + sum(1 for s in self.slots if s.call is not None)

    def ready(self) -> bool:
        return any(s.inst.state is State.RUNNING for s in self.slots)

    def submit(self, call: Call) -> None:
        self.queue.append(call)
        self.dispatch()

    def dispatch(self) -> None:
        for slot in self.slots:
            if not self.queue:
                return
            if slot.idle():
                slot.call = call = self.queue.popleft()
                slot.endpoint.placed = call.request
                self.deliver(slot.inst, slot.endpoint)

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
