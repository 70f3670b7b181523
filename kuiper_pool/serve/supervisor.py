"""The supervisor of ``kuiper-pool serve``: the portable path's loop, instances and effects,
with the REST server in place of eKuiper's control channel and a pool of function
instances per symbol (``pool.py``) in place of eKuiper's function sockets."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from .. import wire
from ..runtime.effects import LoopEffects
from ..runtime.instances import Instance
from ..runtime.kinds.function.channel import FunctionChannel, FunctionIO
from ..runtime.states import State
from ..runtime.supervisor import Supervisor
from . import http
from .pool import Call, ServeEndpoint, ServeRoute, Slot, SymbolPool
from .schema import arg_types

IDLE_TO_STOP = 1.0   # seconds without a call in flight after which a drain ends early


class ServeIO(FunctionIO):
    """A function's channel is its symbol's pool endpoint."""

    def __init__(self, fx: "ServeEffects") -> None:
        super().__init__(fx)
        self.endpoints = fx.endpoints

    def open_function(self, inst: Instance) -> FunctionChannel:
        return FunctionChannel(self.endpoints[inst.ctrl.key], False)


class ServeEffects(LoopEffects):
    """Function channels are the pool's endpoints, never lent whole; every worker has a call
    page, where it notes the calls of a client connection the pool lends it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lends = True   # call pages on; ServeIO's channels stay non-lendable (calls are relayed)
        self.endpoints: Dict[str, ServeEndpoint] = {}

    def io(self, cls: Any) -> Any:
        return ServeIO(self) if cls is FunctionIO else super().io(cls)


class ServeSupervisor(Supervisor):
    """Serves the plugin's functions over REST until SIGTERM/SIGINT, then drains."""

    effects_class = ServeEffects

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent = 0    # started by a person or a service manager: no eKuiper to outlive
        self.pools: Dict[str, SymbolPool] = {}
        self.server: Optional[http.HttpServer] = None
        self.refused: Dict[str, Tuple[float, int]] = {}   # key -> (retry at, refused starts)
        self.draining = ""
        self.drain_until = 0.0
        self.busy_at = 0.0

    def open_channels(self) -> None:
        fx = self.fx
        assert isinstance(fx, ServeEffects)
        types = {}
        for symbol in sorted(self.plugin.functions):
            s = self.s.for_symbol(symbol)
            types[symbol] = (arg_types(s.serve_args), s.serve_result)
        # listen first: when it cannot, no worker has been made
        server = self.server = http.HttpServer(self.s.serve_listen, types, self.submit, self.lend,
                                               self.ready, self.register, self.unregister, self.want_write)
        for symbol in sorted(self.plugin.functions):
            s = self.s.for_symbol(symbol)
            pool = self.pools[symbol] = SymbolPool(symbol, s.call_deadline, *types[symbol], self.deliver,
                                                   self.send_worker, server.take_back)
            for i in range(1, (s.serve_workers or os.cpu_count() or 1) + 1):
                ctrl = wire.Control(wire.CMD_START, symbol, wire.TYPE_FUNC, instance_id=i)
                slot = pool.add()
                fx.endpoints[ctrl.key] = slot.endpoint
                self.begin(slot, ctrl)
        self.log.info("plugin %s: supervisor pid %d serving %s over REST on %s (zygote pid %d)",
                      self.plugin.name, os.getpid(),
                      ", ".join(f"{sym} x{len(p.slots)}" for sym, p in self.pools.items()) or "no function",
                      self.s.serve_listen, self.zygote.pid)

    def begin(self, slot: Slot, ctrl: wire.Control) -> None:
        """Start the instance of one worker of a pool (again, after a refused start)."""
        s = self.s.for_symbol(ctrl.symbol)
        inst = slot.inst = self.instances[ctrl.key] = Instance(self.plugin.name, ctrl, s, self.fx)
        inst.route = slot.route = ServeRoute(inst, slot)   # the function route, and a lent connection

        def answer(data: bytes) -> None:
            if data == wire.OK:
                self.refused.pop(ctrl.key, None)
                return
            # no eKuiper starts it again: retried with backoff, so the pool keeps its size
            tries = self.refused.get(ctrl.key, (0.0, 0))[1] + 1
            delay = min(s.failed_retry_max, s.restart_backoff_min * 2 ** tries)
            self.refused[ctrl.key] = (time.monotonic() + delay, tries)
            self.log.error("%s: cannot start: %s; trying again in %gs", inst.where(),
                           data.decode("utf-8", "replace"), delay,
                           extra={"symbol": ctrl.symbol, "rule": "-"})
        self.guarded("start", inst, inst.begin, answer)

    def retry_refused(self, pool: SymbolPool, now: float) -> None:
        for slot in pool.slots:
            due = self.refused.get(slot.inst.ctrl.key)
            if due and now >= due[0] and slot.inst.state is State.REMOVED and not self.exiting:
                self.refused[slot.inst.ctrl.key] = (float("inf"), due[1])   # until it answers
                self.begin(slot, slot.inst.ctrl)

    def deliver(self, inst: Instance, endpoint: ServeEndpoint) -> None:
        self.guarded("call", inst, inst.on_readable, endpoint)

    def send_worker(self, inst: Instance, frame: bytes, fds: Sequence[int]) -> None:
        if inst.worker is not None:
            self.guarded("lend", inst, self.fx.send, inst.worker, frame, fds)

    def lend(self, symbol: str, conn: http.Conn) -> bool:
        """Lend ``conn`` to an idle worker of ``symbol``, unless draining or stopping."""
        pool = self.pools.get(symbol)
        return pool is not None and not (self.draining or self.exiting) and pool.lend(conn)

    def submit(self, symbol: str, call: Call) -> None:
        self.busy_at = time.monotonic()
        pool = self.pools.get(symbol)
        if pool is None:
            call.done(wire.func_error(f"plugin {self.plugin.name} has no function named {symbol}"))
        elif self.exiting:
            call.done(wire.func_error(f"plugin {self.plugin.name} is shutting down: {self.exiting}"))
        else:
            pool.submit(call)

    def ready(self) -> Optional[str]:
        """None when every function has a running worker and no drain has begun."""
        if self.draining or self.exiting:
            return f"draining: {self.draining or self.exiting}"
        waiting = [sym for sym, pool in list(self.pools.items()) if not pool.ready()]
        return f"no running worker for {', '.join(waiting)}" if waiting else None

    def shutdown(self, reason: str, code: int = 0) -> None:
        """SIGTERM/SIGINT: first a drain (not ready, still answering), then the stop."""
        if self.draining or self.exiting or not self.s.serve_drain:
            self.stop_serving(reason, code)
            return
        self.draining = reason
        self.drain_until = time.monotonic() + self.s.serve_drain
        self.log.info("plugin %s: %s: draining for up to %gs (readyz answers 503)",
                      self.plugin.name, reason, self.s.serve_drain)

    def stop_serving(self, reason: str, code: int = 0) -> None:
        if self.server is not None:
            self.server.stop_accepting()   # open connections are answered until the loop ends
        for pool in self.pools.values():
            pool.fail_all(f"plugin {self.plugin.name} is shutting down: {reason}")
        super().shutdown(reason, code)

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.server is not None:
            self.guarded("http", None, self.server.tick, now)
        for pool in self.pools.values():
            self.retry_refused(pool, now)
            if any(s.busy() for s in pool.slots) or pool.queue:
                self.busy_at = now
            self.guarded("pool", None, pool.tick, now)
        if self.draining and not self.exiting and (
                now >= self.drain_until or now - self.busy_at >= IDLE_TO_STOP):
            self.stop_serving(self.draining)

    def close(self) -> None:
        try:
            for pool in self.pools.values():  # calls a removed worker's route still held
                for slot in pool.slots:
                    pool.replied(slot, wire.func_error(f"plugin {self.plugin.name} stopped"))
            super().close()
        finally:
            if self.server is not None:
                self.server.close()
            self.log.info("plugin %s: stopped serving", self.plugin.name)
