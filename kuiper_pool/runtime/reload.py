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
   come from it, and the workers' target generation is raised (``Effects.generation``).
4. The state machine retires every outdated worker as it replaces crashed ones, each like a
   recycle (``Instance.outdated``, ``check_health``): a sink's worker once it holds nothing
   of eKuiper's (an ack on the way is waited for) and its unfinished items go to the new
   worker, a function call in flight finishes on the old worker within its call_deadline
   (``Route.runs_until``) while the next waits for the new one, a source is closed and opened
   again on the new code; the new worker gets the new settings. Instances without a worker
   (backing off, failed, ended) get the new code at their next start.
5. The old zygote exits once its last worker has.

The loop never blocks on any of it: each step happens on the fresh zygote's reports, on the
state changes of the instance being replaced (the reloader listens to them,
``Effects.changed``) and on ticks (the time limits, a sink that was busy).
"""
from __future__ import annotations

import logging
import time
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Tuple

from .. import wire
from ..version import __version__
from ..api import PluginConfig
from ..config import Settings
from ..describe import problem
from .instances import ENDED, KINDS, REMOVED, RUNNING, Instance
from .protocol import Error, Hello
from .states import WAITING, Change
from .zygote import Zygote

if TYPE_CHECKING:
    from .supervisor import Supervisor

# settings a running supervisor cannot change: a reload that changes one is refused
FIXED = ("start_method", "transport", "runtime_dir", "metrics_address", "state_dir")
TABLES = {wire.TYPE_SOURCE: "sources", wire.TYPE_SINK: "sinks", wire.TYPE_FUNC: "functions"}
REPLACE_SLACK = 2.0   # seconds beyond stop_grace + start_timeout before an instance is reported
KEPT_OUTCOMES = 32    # outcomes still answered by id: a poller may ask after later reloads began


class Progress(Enum):
    """How the replace of one instance ended."""

    REPLACED = "replaced"   # a worker of the new code runs it
    SKIPPED = "skipped"     # gone, ended, or without a worker: its next start uses the new code
    PROBLEM = "problem"     # not brought to the new code (the outcome's lines say why)


class Replacing(NamedTuple):
    """An instance whose worker a reload retires."""

    key: str
    since: float


class Outcome:
    """What ``kuiper-pool reload`` polls (as a dict)."""

    __slots__ = ("id", "check", "done", "ok", "lines")

    def __init__(self, id: int, check: bool) -> None:  # noqa: A002 - the field the reload tool reads
        self.id = id
        self.check = check
        self.done = False
        self.ok = False
        self.lines: List[str] = []

    def as_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "check": self.check, "done": self.done, "ok": self.ok,
                "lines": list(self.lines)}


def _made_in_workers() -> None:
    raise RuntimeError("factories of reloaded code run in the workers only")


class Reloader:
    """At most one reload at a time; ``outcome`` is what ``kuiper-pool reload`` polls."""

    def __init__(self, sup: "Supervisor", main_argv: List[str]) -> None:
        self.sup = sup
        self.argv = main_argv
        self.log = sup.log
        self.seq = 0
        self.outcome: Optional[Outcome] = None           # the latest reload's
        self.outcomes: Dict[int, Outcome] = {}           # the latest KEPT_OUTCOMES, by id
        self.check = False
        self.candidate: Optional[Zygote] = None
        self.hello_deadline = 0.0
        self.replacing: Dict[str, Replacing] = {}   # instances not yet on the new code, by key
        self.replaced = 0
        self.problems: List[str] = []     # instances the reload could not bring to the new code
        self.leaving: List[Zygote] = []   # old or refused zygotes, released when workerless
        sup.fx.listeners.append(self.on_change)

    @property
    def name(self) -> str:
        return self.sup.plugin.name

    def busy(self) -> bool:
        return self.candidate is not None or bool(self.replacing)

    # --- requests ---------------------------------------------------------------------------

    def begin(self, check: bool) -> Dict[str, Any]:
        """Start a reload (``check``: only validate); the outcome to poll."""
        if self.sup.exiting:
            return {"error": f"plugin {self.name} is shutting down: {self.sup.exiting}"}
        if self.busy():
            return {"error": f"plugin {self.name}: a reload is already in progress "
                             f"(reload {self.seq})"}
        if not self.argv:
            return {"error": f"plugin {self.name}: reload needs the plugin's main script"}
        self.seq += 1
        self.check = check
        self.outcome = self.outcomes[self.seq] = Outcome(self.seq, check)
        self.outcomes.pop(self.seq - KEPT_OUTCOMES, None)
        try:
            z = Zygote.launch(self.argv, self.sup.zygote.rundir)
        except OSError as e:
            self._refuse(f"cannot start {self.argv[0]}: {e.strerror or e}")
            return self.outcome.as_dict()
        self.candidate = z
        self.hello_deadline = time.monotonic() + self.sup.s.start_timeout
        self.sup.register(z.fileno(), lambda _m: self.on_candidate(z))
        self.log.info("plugin %s: %s: new code loading in zygote pid %d", self.name,
                      "reload check" if check else "reload", z.pid)
        return self.outcome.as_dict()

    def status(self, rid: Any) -> Dict[str, Any]:
        """The outcome of reload ``rid``, also once a SIGHUP's reload has begun after it."""
        outcome = self.outcomes.get(rid) if isinstance(rid, int) else None
        if outcome is None:
            return {"error": f"plugin {self.name}: no reload {rid}"}
        return outcome.as_dict()

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
        assert self.outcome is not None
        self.outcome.done, self.outcome.ok, self.outcome.lines = True, ok, [line, *more]
        for text in (line, *more):
            self.log.log(logging.INFO if ok else logging.ERROR, "%s", text)

    def _live(self) -> List[Instance]:
        return [i for i in self.sup.instances.values() if i.state is not REMOVED]

    # --- the switch and the retiring of outdated workers ------------------------------------------

    def _switch(self, z: Zygote, hello: Hello) -> None:
        sup, fx = self.sup, self.sup.fx
        old = sup.zygote
        self.candidate = None
        sup.unregister(z.fileno())
        sup.attach_zygote(z)
        z.adopt(old)
        fx.switch(z, Settings(**hello.settings))
        self.leaving.append(old)
        sup.plugin = PluginConfig(self.name, dict.fromkeys(hello.sources, _made_in_workers),
                                  dict.fromkeys(hello.sinks, _made_in_workers),
                                  dict.fromkeys(hello.functions, _made_in_workers))
        now = time.monotonic()
        self.replacing = {i.ctrl.key: Replacing(i.ctrl.key, now) for i in self._live()}
        self.replaced = 0
        self.problems = []
        self.log.info("plugin %s: new code in zygote pid %d; retiring the workers of %d instance(s)",
                      self.name, z.pid, len(self.replacing))
        self.tick(now)

    def tick(self, now: float) -> None:
        if self.candidate is not None and now > self.hello_deadline:
            self._refuse(f"the new code did not reach plugin.start within start_timeout "
                         f"{self.sup.s.start_timeout:g}s")
        for r in list(self.replacing.values()):
            self._advance(r, now)
        self._done_replacing()
        self.leaving = [z for z in self.leaving if not self._released(z)]

    def _released(self, z: Zygote) -> bool:
        """Let ``z`` exit once it has no worker left; True once it is reaped."""
        if self.sup.fx.made(z):
            return False
        if z.sock.fileno() >= 0:
            self.sup.unregister(z.fileno())
        return z.release()

    def on_change(self, inst: Instance, change: Change) -> None:
        """An instance being replaced changed state: its replace may be done."""
        r = self.replacing.get(inst.ctrl.key)
        if r is not None:
            self._advance(r, time.monotonic())

    def _advance(self, r: Replacing, now: float) -> None:
        ended = self._step(r, now)
        if ended is None:
            return
        progress, text = ended
        if progress is Progress.REPLACED:
            self.replaced += 1
        elif progress is Progress.PROBLEM:
            self.problems.append(" ".join(text.split()))
        del self.replacing[r.key]
        self._done_replacing()

    def _done_replacing(self) -> None:
        """The outcome, as soon as the last instance is replaced: in the same turn of the loop,
        or a SIGHUP handled before the next tick would begin a reload over an unfinished one
        (whose poller would never hear its end)."""
        if self.outcome is not None and not self.outcome.done and not self.busy() and not self.check:
            self._finish(not self.problems, f"plugin {self.name}: reloaded: {self.replaced} "
                         f"instance(s) replaced by workers of the new code (zygote pid "
                         f"{self.sup.zygote.pid})", *self.problems)

    def _step(self, r: Replacing, now: float) -> Optional[Tuple[Progress, str]]:
        """Where the replace of ``r`` is: how it ended, or None while it goes on."""
        inst = self.sup.instances.get(r.key)
        if inst is None or inst.state in (REMOVED, ENDED):
            return Progress.SKIPPED, ""
        w = inst.worker
        if w is None and inst.state in WAITING:
            if inst.generation < self.sup.fx.generation:  # no new worker yet: its next start is one
                return Progress.SKIPPED, ""
            return Progress.PROBLEM, f"{inst.where()}: the new worker did not start: {inst.last_error}"
        if w is not None and not inst.outdated(w) and inst.state is RUNNING:
            return Progress.REPLACED, ""
        limit = inst.s.stop_grace + inst.s.start_timeout + REPLACE_SLACK + (
            inst.s.call_deadline if inst.kind == wire.TYPE_FUNC else 0.0)  # a call finishes first
        if now - r.since > limit:
            return Progress.PROBLEM, (f"{inst.where()}: not replaced within {limit:g}s "
                                      f"({inst.state}: {inst.last_error})")
        return None

    def close(self) -> None:
        """The supervisor is leaving: let every zygote but the current one go."""
        if self.candidate is not None:
            self._let_go(self.candidate)
        for z in self.leaving:
            z.close()
        self.leaving = []
