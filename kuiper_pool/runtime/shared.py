"""The supervisor's side of shared workers (``workers: per_symbol``; the process is host.py).

Each instance keeps its own :class:`~.effects.WorkerHandle` and link, so its state machine,
route, frames, state and pages are exactly those of an instance with a worker of its own;
only the process behind the handle is shared. The first instance of a symbol forks the
shared worker from the zygote with a control link of its own; every instance's link goes to
it over that link (ADOPT). What the instance is told maps onto the process so:

- its thread ending (ENDED on the control link) is that handle's exit, with the thread's code;
- the process's death is the exit of every handle on it, with the process's wait status;
- a stack-dump, SIGCONT or hang kill goes to the process (a hang is the process's: one
  heartbeat thread beats for all); any other kill gives the one instance up: its exit is
  reported on the next tick and its link closed, which ends its thread. A thread still
  running ``stop_grace`` later (plugin code that ignores its stop) retires the process: the
  other instances are moved to a fresh one (a recycle each, by each instance's state machine
  once it holds nothing of eKuiper's: ``moving``), then it is ended;
- a recycle (memory_limit_mb, an operator's restart, a reload) retires the process: the
  recycled instance starts in a fresh one, the others stay until they are recycled too (after
  a reload every one of them is outdated, so all of them are);
- a process left with no instance is let go (its control link closed) and SIGKILLed if it
  has not exited ``stop_grace`` later.
"""
from __future__ import annotations

import selectors
import signal
import socket
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from . import forensics, frames
from .health import Cause
from .protocol import Exited, Refused, Started

if TYPE_CHECKING:
    from .effects import LoopEffects, WorkerHandle
    from .instances import Instance
    from .zygote import Zygote

ENDS_INSTANCE = (signal.SIGKILL, signal.SIGTERM)
WHERE_GRACE = 1.0   # seconds a killed instance's exit waits for its process to say where its thread is


class SharedHost:
    """One shared worker process: its control link and the instances it serves."""

    def __init__(self, wid: int, inst: "Instance", zygote: "Zygote", link: frames.Link) -> None:
        self.wid = wid
        self.plugin = inst.plugin
        self.symbol = inst.ctrl.symbol
        self.kind = inst.kind
        self.stop_grace = inst.s.stop_grace
        self.zygote = zygote
        self.link = link
        self.pid = 0
        self.handles: Dict[int, "WorkerHandle"] = {}
        self.names: Dict[int, str] = {}         # instance wid -> "rule R op O instance I" till ENDED
        self.abandoned: Dict[int, float] = {}   # given-up instance wid -> when its thread must have ended
        self.asked: Dict[int, float] = {}       # instance wid asked WHERE -> until when its exit waits for AT
        self.at: Dict[int, str] = {}            # instance wid -> where its thread was, as AT said
        self.retired = ""        # why it takes no new instance
        self.moving = False      # its instances are moved to a fresh process (a stuck thread)
        self.closed_at = 0.0     # its control link was closed (no instance left)
        self.killed = False
        self.hung = ""           # why an instance found the process hung (it is killed)
        self.proc: Any = None    # its psutil.Process, made when first sampled (observe.py)
        self.rss = 0             # the process's figures as last sampled, counted once for all
        self.cpu_percent = 0.0   # its instances (each instance's vitals carry a copy, for its
        self.cpu_seconds = 0.0   # health checks: memory_limit_mb is the process's)

    def describe(self) -> str:
        return f"plugin {self.plugin} {self.kind} {self.symbol}: shared worker pid {self.pid}"


class SharedHosts:
    """Every shared worker of the supervisor, and which instance runs in which."""

    def __init__(self, fx: "LoopEffects") -> None:
        self.fx = fx
        self.hosts: Dict[int, SharedHost] = {}     # the process's wid -> it
        self.host_of: Dict[int, SharedHost] = {}   # an instance's wid -> its process
        self.open: Dict[str, SharedHost] = {}      # symbol -> the process new instances join
        self.due: List[int] = []                   # given-up instances whose exit is reported next tick

    # --- instances joining and leaving -----------------------------------------------------

    def adopt(self, wid: int, link_end: socket.socket, inst: "Instance") -> SharedHost:
        """Send instance ``wid``'s link to its symbol's process, forked first if there is none
        (or only a retired one, or one of a zygote a reload replaced). OSError as a spawn's."""
        try:
            host = self.open.get(inst.ctrl.symbol)
            if host is None or host.zygote is not self.fx.zygote:
                host = self._start(inst)
            host.link.send(frames.encode_seq(frames.ADOPT, wid), [link_end.fileno()])
        finally:
            link_end.close()
        return host

    def attach(self, host: SharedHost, w: "WorkerHandle", inst: "Instance") -> None:
        host.handles[w.wid] = w
        c = inst.ctrl
        host.names[w.wid] = f"rule {c.rule_id} op {c.op_id} instance {c.instance_id}"
        self.host_of[w.wid] = host
        w.pid = host.pid
        w.shared = True

    def _start(self, inst: "Instance") -> SharedHost:
        fx = self.fx
        hwid, fx.next_wid = fx.next_wid, fx.next_wid + 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fx.zygote.start_worker(hwid, theirs, inst.ctrl.symbol)
        except OSError:
            ours.close()
            raise
        link = frames.Link(ours, lambda on: fx.want_write(link.fileno(), on))
        host = SharedHost(hwid, inst, fx.zygote, link)
        self.hosts[hwid] = host
        self.open[host.symbol] = host
        fx.register(link.fileno(), lambda mask: self.on_link(host, mask), None)
        link.send(frames.HostSpec(host.kind, host.symbol, inst.s.heartbeat_interval,
                                  forensics.dump_path(fx.zygote.rundir, hwid)).encode())
        return host

    def detach(self, w: "WorkerHandle") -> None:
        """Instance worker ``w`` exited: a process left with no instance is let go."""
        host = self.host_of.pop(w.wid, None)
        if host is None:
            return
        host.handles.pop(w.wid, None)
        if not host.handles and host.wid in self.hosts:
            self._close(host)

    def _close(self, host: SharedHost) -> None:
        if self.open.get(host.symbol) is host:
            del self.open[host.symbol]
        if not host.closed_at:
            host.closed_at = self.fx.now()
            self.fx.unregister(host.link.fileno())
            host.link.close()

    def retire(self, w: "WorkerHandle", why: str) -> None:
        """``w``'s process takes no new instance (it is recycled)."""
        host = self.host_of.get(w.wid)
        if host is not None:
            self._retire(host, why, move=False)

    def _retire(self, host: SharedHost, why: str, move: bool, leaving: int = 0) -> None:
        """``host`` takes no new instance; ``move``: its instances (but ``leaving``, a stuck
        one's wid) move to a fresh one."""
        if self.open.get(host.symbol) is host:
            del self.open[host.symbol]
        host.retired = host.retired or why
        if move and not host.moving:
            host.moving = True
            self.fx.log.warning("%s: %s; its %d other instances move to a fresh worker",
                                host.describe(), why, len(host.handles.keys() - {leaving}))

    # --- what the state machine asks for ---------------------------------------------------

    def signal(self, w: "WorkerHandle", sig: int) -> None:
        host = self.host_of[w.wid]
        if w.kill_cause is Cause.HANG and not host.hung:
            host.hung = w.kill_reason   # what its other instances are told when it dies
        if sig == forensics.DUMP_SIGNAL and w.kill_cause is not Cause.HANG and not host.closed_at:
            host.link.send(frames.encode_seq(frames.WHERE, w.wid))  # the thread's place, for its error
            host.asked[w.wid] = self.fx.now() + WHERE_GRACE
        if sig not in ENDS_INSTANCE or w.kill_cause is Cause.HANG:
            self._kill(host, sig)  # a stack dump, a SIGCONT, a hung process: the process's
        elif w.wid not in host.abandoned and w.wid in self.fx.workers:
            host.abandoned[w.wid] = self.fx.now() + host.stop_grace
            self.due.append(w.wid)

    def _kill(self, host: SharedHost, sig: int) -> None:
        if sig == signal.SIGKILL:  # no instance starts in a process about to die
            host.killed = True
            self._retire(host, "killed", move=False)
        host.zygote.kill(host.wid, sig)

    def dump(self, w: "WorkerHandle") -> Optional[forensics.Dump]:
        """What to say of where ``w`` was at its exit: its process's dump once that has died,
        or where its thread was as the live process said (AT); None: not a shared instance."""
        host = self.host_of.get(w.wid)
        if host is None:
            return None
        if host.wid in self.hosts:
            return forensics.Dump(host.at.get(w.wid, ""), False)
        return forensics.summary(forensics.read(forensics.dump_path(host.zygote.rundir, host.wid)))

    # --- what the processes report ---------------------------------------------------------

    def on_link(self, host: SharedHost, mask: int) -> None:
        if self.hosts.get(host.wid) is not host or host.closed_at:
            return
        if mask & selectors.EVENT_WRITE:
            host.link.flush()
        if not mask & selectors.EVENT_READ:
            return
        got = host.link.read()
        if got is None:  # the process is gone; the zygote's report tells how
            self.fx.unregister(host.link.fileno())
            return
        for ftype, payload in got:
            if ftype == frames.ENDED:
                self._ended(host, frames.Ended.decode(payload))
            elif ftype == frames.AT:
                wid, at = frames.split_seq(payload)
                host.at[wid] = at.decode(errors="replace")
                host.asked.pop(wid, None)

    def _ended(self, host: SharedHost, msg: frames.Ended) -> None:
        wid = msg.wid
        name = host.names.pop(wid, "")
        host.asked.pop(wid, None)
        host.at.pop(wid, None)
        if msg.stuck:
            self._retire(host, f"an instance's open did not return within stop_grace of its close "
                               f"({name}{', at ' + msg.at if msg.at else ''})", move=True, leaving=wid)
        host.abandoned.pop(wid, None)
        entry = self.fx.workers.get(wid)
        if entry is not None and self.host_of.get(wid) is host:
            self.fx.on_exit(entry, (msg.code & 0xFF) << 8)

    def on_report(self, ev: Union[Started, Exited, Refused]) -> bool:
        """A zygote report about a shared process (False: it is about no shared process)."""
        host = self.hosts.get(ev.wid)
        if host is None:
            return False
        if isinstance(ev, Started):
            host.pid = ev.pid
            for w in list(host.handles.values()):
                entry = self.fx.workers.get(w.wid)
                if entry is not None:
                    self.fx.guarded("started", entry[1], entry[1].on_started, w, host.pid)
        elif isinstance(ev, Exited):
            self.gone(host, ev.status)
        else:
            self.gone(host, 0, OSError(ev.errno, f"cannot fork: {ev.error}"))
        return True

    def gone(self, host: SharedHost, status: int, refused: Optional[OSError] = None) -> None:
        """The process died (or was never made): every instance in it exits with it."""
        self.hosts.pop(host.wid, None)
        self._close(host)
        for w in list(host.handles.values()):
            entry = self.fx.workers.get(w.wid)
            if entry is not None:
                if host.hung and not w.kill_reason:  # a hang is the whole process's
                    w.kill_reason, w.kill_cause = host.hung, Cause.HANG
                elif not w.fault and not w.kill_reason:
                    w.fault = f"its {host.describe()} ended"
                self.fx.on_exit(entry, status, refused)
        forensics.discard(forensics.dump_path(host.zygote.rundir, host.wid))

    def orphaned(self, z: "Zygote") -> None:
        """Zygote ``z`` died: its shared workers died with it (their instances are told by
        the caller, as every worker of ``z``)."""
        for host in [h for h in self.hosts.values() if h.zygote is z]:
            self.hosts.pop(host.wid, None)
            self._close(host)

    def tick(self, now: float) -> None:
        due, self.due = self.due, []
        for wid in due:  # a given-up instance: its exit, then its link closes (its thread ends)
            host = self.host_of.get(wid)
            if host is not None and now < host.asked.get(wid, 0.0):
                self.due.append(wid)  # its process has not said where its thread is yet
                continue
            entry = self.fx.workers.get(wid)
            if entry is not None:
                self.fx.on_exit(entry, signal.SIGKILL)
        for host in list(self.hosts.values()):
            late = [wid for wid, at in host.abandoned.items() if now >= at]
            for wid in late:
                del host.abandoned[wid]
                at = host.at.get(wid)
                self._retire(host, "an instance's thread did not end within stop_grace of being "
                                   f"given up ({host.names.get(wid, '')}{', at ' + at if at else ''})",
                             move=True, leaving=wid)
            if host.closed_at and not host.killed and now - host.closed_at >= host.stop_grace:
                self._kill(host, signal.SIGKILL)

    def moving(self, w: "WorkerHandle") -> str:
        """Why ``w``'s instance must move off its process ("": it need not); its state machine
        recycles it as soon as it holds nothing of eKuiper's (``Instance.check_health``)."""
        host = self.host_of.get(w.wid)
        if host is None or not host.moving:
            return ""
        return f"moved off the retired {host.describe()}: {host.retired}"

    def is_shared(self, w: "WorkerHandle") -> bool:
        return w.wid in self.host_of
