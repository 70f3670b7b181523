"""What eKuiper's control channel and the status socket ask of the supervisor: start and
stop commands (answered exactly once), status snapshots, an operator's restart and reload."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from .. import wire
from .effects import ctrl_fields
from .instances import ENDED, FAILED, KINDS, Instance, internal_error
from .observe import snapshot

if TYPE_CHECKING:
    from .supervisor import Supervisor

Answer = Callable[[bytes], None]


class Commands:
    """Turns commands into instance events; ``sup`` holds the instances and the loop."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup

    def on_control(self) -> None:
        control = self.sup.control
        assert control is not None
        raw = control.recv()
        if raw is None:
            return
        answered: List[bytes] = []

        def answer(data: bytes) -> None:
            if not answered and self.sup.control is not None:
                answered.append(data)
                self.sup.control.send(data)
        failure: Optional[Exception] = None
        try:
            self.command(raw, answer)
        except Exception as e:  # noqa: BLE001 - the loop logs it; eKuiper hears its cause
            failure = e
            raise
        finally:  # whatever happened, eKuiper waits for exactly one answer
            if not answered and not self.waiting_answer(answer):
                where = f"plugin {self.sup.plugin.name}"
                answer(wire.one_line(internal_error(where, failure) if failure is not None
                                     else f"{where}: internal error; see the plugin's log"))

    def waiting_answer(self, answer: Answer) -> bool:
        """Whether an instance keeps ``answer`` to send later (after READY or the worker's exit)."""
        return any(inst.pending is answer for inst in self.sup.instances.values())

    def command(self, raw: bytes, answer: Answer) -> None:
        sup = self.sup
        try:
            ctrl = wire.parse_command(raw)
        except wire.ProtocolError as e:
            sup.log.warning("plugin %s: bad command %r: %s", sup.plugin.name, raw[:200], e)
            answer(wire.one_line(f"plugin {sup.plugin.name}: {e}"))
            return
        if sup.exiting:
            answer(wire.one_line(f"plugin {sup.plugin.name} is shutting down: {sup.exiting}"))
        elif ctrl.cmd == wire.CMD_START:
            self.start(ctrl, answer)
        else:
            self.stop(ctrl, answer)

    def start(self, ctrl: wire.Control, answer: Answer) -> None:
        sup = self.sup
        if sup.plugin.get(ctrl.plugin_type, ctrl.symbol) is None:
            answer(wire.one_line(f"plugin {sup.plugin.name} has no {KINDS[ctrl.plugin_type]} "
                                 f"named {ctrl.symbol}"))
            return
        inst = sup.instances.get(ctrl.key)
        if inst is not None and inst.state not in (FAILED, ENDED):
            sup.guarded("start", inst, inst.start_again, answer)
            return
        if inst is not None:
            sup.guarded("start", inst, inst.remove)
        try:  # loads the kind's code on its first start: what fails refuses this start only
            inst = Instance(sup.plugin.name, ctrl, sup.s.for_symbol(ctrl.symbol), sup.fx)
        except Exception as e:  # noqa: BLE001 - any failure is this start's answer
            text = internal_error(f"plugin {sup.plugin.name} {ctrl.describe()}", e)
            sup.log.error("%s", text, exc_info=e, extra=ctrl_fields(ctrl))
            answer(wire.one_line(text))
            return
        sup.instances[ctrl.key] = inst
        sup.guarded("start", inst, inst.begin, answer)

    def stop(self, ctrl: wire.Control, answer: Answer) -> None:
        sup = self.sup
        inst = sup.instances.get(ctrl.key)
        if ctrl.plugin_type == wire.TYPE_FUNC or inst is None:
            # eKuiper never stops functions; an unknown instance is already stopped
            sup.log.info("plugin %s: stop of %s: nothing running", sup.plugin.name, ctrl.describe())
            answer(wire.OK)
            return
        sup.guarded("stop", inst, inst.stop, answer)

    # --- the status socket ------------------------------------------------------------------

    def on_status_request(self, req: Dict[str, Any]) -> Any:
        """What ``kuiper-pool status`` and ``kuiper-pool restart`` ask over the status socket."""
        if req.get("cmd") == "status":
            return snapshot(self.sup)
        if req.get("cmd") == "restart":
            symbol = req.get("symbol")
            if symbol is not None and not (isinstance(symbol, str) and symbol):  # not "all"
                return {"error": f"restart needs a symbol name or none (got {symbol!r})", "usage": True}
            p = self.sup.plugin
            if symbol is not None and symbol not in p.symbol_names():
                known = "; ".join(f"{kind} {', '.join(sorted(names))}" for kind, names in (
                    ("sources", p.sources), ("sinks", p.sinks), ("functions", p.functions)) if names)
                return {"error": f"plugin {p.name} has no symbol {symbol}; its symbols: {known or 'none'}",
                        "usage": True}
            return {"lines": self.restart(symbol)}
        if req.get("cmd") == "reload":  # answered at once; the outcome is polled (reload_status)
            return self.sup.reloader.begin(check=bool(req.get("check")))
        if req.get("cmd") == "reload_status":
            return self.sup.reloader.status(req.get("id"))
        return {"error": f"unknown request {req.get('cmd')!r}"}

    def restart(self, symbol: Optional[str]) -> List[str]:
        """Restart the instances of ``symbol`` (all without one) now: failed or backing-off
        ones start at once, running workers are recycled. One line per instance."""
        sup = self.sup
        lines = []
        for inst in list(sup.instances.values()):
            if symbol is not None and inst.ctrl.symbol != symbol:
                continue
            before, done = inst.state, []
            sup.guarded("restart", inst, lambda i=inst: done.append(i.retry_now()))
            what = "restarting" if done and done[0] else "nothing to restart"
            lines.append(f"{inst.where()}: {before}: {what}")
            if done and done[0]:
                sup.fx.note(inst, logging.WARNING, "restart requested by an operator (was %s)", before)
        if not lines:
            lines.append(f"plugin {sup.plugin.name} has no instance"
                         + (f" of {symbol}" if symbol else "") + " (no rule uses it now)")
        return lines
