"""``kuiper-pool reload`` and SIGHUP: serve the plugin's code as it is on disk now, without
stopping a rule.

1. A fresh zygote imports the plugin's main script and ``kuiper_pool.yaml`` anew
   (``zygote.py``, "a fresh zygote"); its first report is what the new code exposes.
2. Validation: the same kuiper_pool version, the same plugin name, every running instance's symbol present with its kind
   and its factory building an object with the methods it needs (in a throwaway child of the
   fresh zygote, as ``kuiper-pool validate`` checks), settings valid and none changed of those that only a plugin restart can apply
   (``FIXED``). On failure nothing changes: the fresh zygote exits and the answer is one line.
   ``--check`` stops here.
3. The switch: the fresh zygote takes over the run dir and the files to clean up, new workers
   come from it, the new settings apply (per instance, as each is replaced).
4. Instances are replaced one at a time, each like a recycle (``Instance.replace``): a sink's
   worker finishes what it holds (and waits for an ack on the way) and its unfinished items go
   to the new worker, a function call in flight finishes on the old worker within its
   call_deadline (``Route.runs_until``) while the next waits for the new one, a source
   is closed and opened again on the new code. Instances without a worker (backing off,
   failed, ended) get the new code at their next start.
5. The old zygote exits once its last worker has.

The loop never blocks on any of it: each step happens on the fresh zygote's reports and on
ticks.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .. import wire
from ..version import __version__
from ..api import PluginConfig
from ..config import Settings
from ..describe import problem
from .instances import BACKOFF, ENDED, FAILED, KINDS, REMOVED, RUNNING
from .protocol import Error, Hello
from .zygote import Zygote

if TYPE_CHECKING:
    from .supervisor import Supervisor

# settings a running supervisor cannot change: a reload that changes one is refused
FIXED = ("start_method", "transport", "runtime_dir", "metrics_address", "state_dir")
TABLES = {wire.TYPE_SOURCE: "sources", wire.TYPE_SINK: "sinks", wire.TYPE_FUNC: "functions"}
REPLACE_SLACK = 2.0   # seconds beyond stop_grace + start_timeout before an instance is reported
KEPT_OUTCOMES = 32    # outcomes still answered by id: a poller may ask after later reloads began


def _made_in_workers() -> None:
    raise RuntimeError("factories of reloaded code run in the workers only")


class Reloader:
    """At most one reload at a time; ``outcome`` is what ``kuiper-pool reload`` polls."""

    def __init__(self, sup: "Supervisor", main_argv: List[str]) -> None:
        self.sup = sup
        self.argv = main_argv
        self.log = sup.log
        self.seq = 0
        self.outcome: Dict[str, Any] = {}                 # the latest reload's
        self.outcomes: Dict[int, Dict[str, Any]] = {}     # the latest KEPT_OUTCOMES, by id
        self.check = False
        self.candidate: Optional[Zygote] = None
        self.hello_deadline = 0.0
        self.queue: List[str] = []        # keys of instances still to replace
        self.current = ""                 # the one being replaced
        self.current_since = 0.0
        self.asked = False
        self.replaced = 0
        self.problems: List[str] = []     # instances the reload could not bring to the new code
        self.leaving: List[Zygote] = []   # old or refused zygotes, released when workerless

    @property
    def name(self) -> str:
        return self.sup.plugin.name

    def busy(self) -> bool:
        return self.candidate is not None or bool(self.queue or self.current)

    # --- requests ---------------------------------------------------------------------------

    def begin(self, check: bool) -> Dict[str, Any]:
        """Start a reload (``check``: only validate); the outcome to poll."""
        if self.sup.exiting:
            return {"error": f"plugin {self.name} is shutting down: {self.sup.exiting}"}
        if self.busy():
            return {"error": f"plugin {self.name}: a reload is already in progress "
                             f"(reload {self.outcome.get('id')})"}
        if not self.argv:
            return {"error": f"plugin {self.name}: reload needs the plugin's main script"}
        self.seq += 1
        self.check = check
        self.outcome = {"id": self.seq, "check": check, "done": False, "ok": False, "lines": []}
        self.outcomes[self.seq] = self.outcome
        self.outcomes.pop(self.seq - KEPT_OUTCOMES, None)
        try:
            z = Zygote.launch(self.argv, self.sup.zygote.rundir)
        except OSError as e:
            self._refuse(f"cannot start {self.argv[0]}: {e.strerror or e}")
            return dict(self.outcome)
        self.candidate = z
        self.hello_deadline = time.monotonic() + self.sup.s.start_timeout
        self.sup.register(z.fileno(), lambda _m: self.on_candidate(z))
        self.log.info("plugin %s: %s: new code loading in zygote pid %d", self.name,
                      "reload check" if check else "reload", z.pid)
        return dict(self.outcome)

    def status(self, rid: Any) -> Dict[str, Any]:
        """The outcome of reload ``rid``, also once a SIGHUP's reload has begun after it."""
        outcome = self.outcomes.get(rid) if isinstance(rid, int) else None
        if outcome is None:
            return {"error": f"plugin {self.name}: no reload {rid}"}
        return dict(outcome)

    # --- the fresh zygote's first report ------------------------------------------------------------

    def on_candidate(self, z: Zygote) -> None:
        if z is not self.candidate:
            return
        try:
            events = z.events()
        except ValueError as e:  # never left to start_timeout: the refusal names the cause
            self._refuse(f"the new code's report cannot be read: {e}")
            return
        if events == []:
            return
        first = events[0] if events else None
        if first is None:
            why = "the new code exited before plugin.start"
        elif isinstance(first, Error):
            why = first.error or "the new code cannot serve (it did not say why)"
        elif isinstance(first, Hello):
            why = self._validate(first)
        else:
            why = f"unexpected first report {first!r}"
        if why or not isinstance(first, Hello):
            self._refuse(why)
            return
        if self.check:
            self._let_go(z)
            n = len(self._live())
            self._finish(True, f"plugin {self.name}: reload check passed: the new code serves "
                               f"all {n} instance(s)")
            return
        self._switch(z, first)

    def _validate(self, hello: Hello) -> str:
        """What keeps the new code from serving, or ''. The kuiper_pool version is checked
        first: the rest of the report, the zygote's and the workers' frames are spoken
        between one version's modules only."""
        version = hello.version
        if version != __version__:
            return (f"the new code imports kuiper_pool {version or 'of a version that does not say it'}, "
                    f"this supervisor runs kuiper_pool {__version__}: a different kuiper_pool applies "
                    f"only when eKuiper restarts the plugin")
        if hello.name != self.name:
            return f"the new code's plugin is named {hello.name!r}, not {self.name!r}"
        checks = hello.checks
        if "error" in checks:
            return str(checks["error"])
        for inst in self._live():
            table = checks[TABLES[inst.kind]]
            rule = f" (rule {inst.ctrl.rule_id})" if inst.kind != wire.TYPE_FUNC else ""
            if inst.ctrl.symbol not in table:
                return f"the new code has no {KINDS[inst.kind]} named {inst.ctrl.symbol}{rule}"
            found = problem(table[inst.ctrl.symbol])
            if found:
                return f"the new code's {KINDS[inst.kind]} {inst.ctrl.symbol}{rule}: {found}"
        new = Settings(**hello.settings)
        for key in FIXED:
            was, now = getattr(self.sup.s, key), getattr(new, key)
            if was != now:
                return (f"setting {key} changed from {was!r} to {now!r}: it applies only when "
                        f"eKuiper restarts the plugin")
        return ""

    def _refuse(self, why: str) -> None:
        z = self.candidate
        if z is not None:
            self._let_go(z)
        what = "reload check failed" if self.check else "reload refused, nothing changed"
        self._finish(False, f"plugin {self.name}: {what}: {' '.join(why.split())}")

    def _let_go(self, z: Zygote) -> None:
        """A fresh zygote that will not serve: it has no worker and nothing to clean up, and
        it may still be stuck in the plugin's imports, so it is killed."""
        self.sup.unregister(z.fileno())
        z.kill_now()
        self.candidate = None
        self.leaving.append(z)

    def _finish(self, ok: bool, line: str, *more: str) -> None:
        self.outcome.update(done=True, ok=ok, lines=[line, *more])
        for text in (line, *more):
            self.log.log(logging.INFO if ok else logging.ERROR, "%s", text)

    def _live(self) -> List[Any]:
        return [i for i in self.sup.instances.values() if i.state is not REMOVED]

    # --- the switch and the rolling replace -----------------------------------------------------

    def _switch(self, z: Zygote, hello: Hello) -> None:
        sup, fx = self.sup, self.sup.fx
        old = sup.zygote
        self.candidate = None
        sup.unregister(z.fileno())
        sup.attach_zygote(z)
        z.adopt(old)
        sup.zygote = fx.zygote = z
        self.leaving.append(old)
        settings = Settings(**hello.settings)
        sup.s = fx.s = settings
        fx.states.flush_interval = settings.state_flush_interval
        sup.plugin = PluginConfig(self.name, dict.fromkeys(hello.sources, _made_in_workers),
                                  dict.fromkeys(hello.sinks, _made_in_workers),
                                  dict.fromkeys(hello.functions, _made_in_workers))
        self.queue = [i.ctrl.key for i in self._live()]
        self.replaced = 0
        self.problems = []
        self.log.info("plugin %s: new code in zygote pid %d; replacing %d instance(s) one at a time",
                      self.name, z.pid, len(self.queue))
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        if self.candidate is not None and now > self.hello_deadline:
            self._refuse(f"the new code did not reach plugin.start within start_timeout "
                         f"{self.sup.s.start_timeout:g}s")
        while (self.queue or self.current) and self._step(now):
            pass
        if self.outcome and not self.outcome["done"] and not self.busy() and not self.check:
            self._finish(not self.problems, f"plugin {self.name}: reloaded: {self.replaced} "
                         f"instance(s) replaced by workers of the new code (zygote pid "
                         f"{self.sup.zygote.pid})", *self.problems)
        self.leaving = [z for z in self.leaving if not self._released(z)]

    def _released(self, z: Zygote) -> bool:
        """Let ``z`` exit once it has no worker left; True once it is reaped."""
        if self.sup.fx.made(z):
            return False
        if z.sock.fileno() >= 0:
            self.sup.unregister(z.fileno())
        return z.release()

    def _step(self, now: float) -> bool:
        """Advance the replace of the current instance; True when it is done (next one)."""
        sup = self.sup
        if not self.current:
            self.current, self.current_since, self.asked = self.queue.pop(0), now, False
        inst = sup.instances.get(self.current)
        w = inst.worker if inst is not None else None
        done = ""
        if inst is None or inst.state in (REMOVED, ENDED) or (w is None and not self.asked):
            done = "skip"  # gone, ended, or backing off/failed: its next start uses the new code
        elif w is not None and sup.fx.zygote_of(w) is sup.zygote:
            if inst.state is RUNNING:
                done = "replaced"
        elif w is None and inst.state in (BACKOFF, FAILED):
            done = f"{inst.where()}: the new worker did not start: {inst.last_error}"
        elif w is not None and not self.asked and inst.state is RUNNING:
            inst.s = sup.s.for_symbol(inst.ctrl.symbol)
            sup.guarded("reload", inst, lambda: setattr(self, "asked", inst.replace("reload")))
        if not done and inst is not None:
            limit = inst.s.stop_grace + inst.s.start_timeout + REPLACE_SLACK + (
                inst.s.call_deadline if inst.kind == wire.TYPE_FUNC else 0.0)  # a call finishes first
            if now - self.current_since > limit:
                done = f"{inst.where()}: not replaced within {limit:g}s ({inst.state}: {inst.last_error})"
        if not done:
            return False
        if done == "replaced":
            self.replaced += 1
        elif done != "skip":
            self.problems.append(" ".join(done.split()))
        self.current = ""
        return True

    def close(self) -> None:
        """The supervisor is leaving: let every zygote but the current one go."""
        if self.candidate is not None:
            self._let_go(self.candidate)
        for z in self.leaving:
            z.close()
        self.leaving = []
