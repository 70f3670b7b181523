"""What the state machine may ask for, and its one implementation over the zygote, the
worker links and the loop.

``Instance`` and its route act only through :class:`Effects`: make a worker, send it a
frame (with descriptors), signal it, watch an endpoint of eKuiper's, keep state, log. What
only one kind does on eKuiper's sockets (a sink's data and ack connections, a function's
channel, lending them) is that kind's ``channel.py``, built on these primitives and made by
:meth:`Effects.io`. :class:`LoopEffects` does it inside the supervisor's selector loop and
turns what comes back (link frames, the zygote's reports) into the instance's events. Unit
tests replace it with a recorder and a fake clock (tests/test_instances_unit.py). Nothing
here imports a kind.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from types import ModuleType
from typing import (TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Type,
                    TypeVar)

from .. import wire
from ..config import Settings
from ..logs import supervisor_logger
from ..transport import load as load_transport
from . import forensics, frames
from .health import Cause, Vitals
from .protocol import Exited, Refused, Started, StartSpec
from .shared import SharedHosts
from .state import States, Store
from .states import Change
from .zygote import Zygote

if TYPE_CHECKING:
    from .instances import Instance

IO = TypeVar("IO")


class WorkerHandle:
    """What the state machine knows of one worker process (its link lives in the effects)."""

    def __init__(self, wid: int, now: float) -> None:
        self.wid = wid
        self.pid = 0
        self.generation = 0         # the code it runs: Effects.generation when it was made
        self.started_at = now
        self.vitals = Vitals(last_beat=now)
        self.kill_reason = ""       # why we end it (free text), beside ...
        self.kill_cause: Optional[Cause] = None  # ... the kind of reason, when we kill or recycle it
        self.fault = ""            # the error this worker reported (FAULT, READY) before exiting
        self.kill_at = 0.0          # when to escalate to SIGKILL
        self.page: Any = None       # the page its kind shares with it (a call page, a collect mark)
        self.page_seq = -1          # the page's work its route saw running on the previous tick
        self.pending_signal = 0     # sent at signal_at, once its stack has been dumped
        self.sigkill_sent = False   # a SIGKILL went out: a death by another signal came first
        self.signal_at = 0.0
        self.held = ""              # recycled with a call in flight: the kill reason past its deadline
        self.shared = False         # a thread of a shared worker: its vitals are the process's


class Effects(Protocol):
    """What a transition may do. :class:`LoopEffects` implements it; tests record it."""

    transport: ModuleType      # the transport module eKuiper's endpoints come from
    transport_name: str        # its setting's name
    lends: bool                # whether eKuiper's connections can be lent to a worker (native)
    generation: int            # the code new workers run; a reload raises it, older ones retire

    def now(self) -> float: ...
    def spawn(self, inst: "Instance") -> WorkerHandle: ...   # OSError when no process/fd can be had
    def settings_for(self, symbol: str) -> Settings: ...    # the settings of the current generation
    def send(self, w: WorkerHandle, frame: bytes, fds: Sequence[int] = ()) -> bool: ...  # False: it exited
    def signal(self, w: WorkerHandle, sig: int) -> None: ...
    def retire(self, w: WorkerHandle, why: str) -> None: ...   # recycled: its process takes no new instance
    def moving(self, w: WorkerHandle) -> str: ...   # why w must leave its shared process, or ""
    def io(self, cls: Type[IO]) -> IO: ...   # a kind's I/O object (its channel.py): cls(self)
    def watch(self, inst: "Instance", endpoint: Any, reading: bool) -> None: ...  # read it or not
    def own_path(self, path: str) -> None: ...     # an ipc path of ours: removed if we die
    def disown_path(self, path: str) -> None: ...
    def forget(self, inst: "Instance") -> None: ...
    def put_state(self, inst: "Instance", payload: bytes) -> None: ...   # a worker's PUT frame
    def cpu_seconds(self, w: WorkerHandle) -> Optional[float]: ...
    def dump(self, w: WorkerHandle) -> forensics.Dump: ...   # what its last stack dump says
    def note(self, inst: "Instance", level: int, msg: str, *args: object) -> None: ...
    def changed(self, inst: "Instance", change: Change) -> None: ...   # tell the listeners


Register = Callable[..., None]
Entry = Tuple[WorkerHandle, "Instance", frames.Link]
Listener = Callable[["Instance", Change], None]


class LoopEffects:
    """:class:`Effects` inside the supervisor's loop. ``register(fd, handler, inst, events)``,
    ``unregister(fd)`` and ``want_write(fd, on)`` (watch a registered fd for writing too
    while its outbox holds bytes: nothing here waits for a socket) are the loop's;
    ``guarded(where, inst, fn, *args)`` runs an instance's event so that what it raises
    ends at most that instance."""

    def __init__(self, settings: Settings, zygote: Zygote, register: Register,
                 unregister: Callable[[int], None], want_write: Callable[[int, bool], None],
                 guarded: Callable[..., None], forget: Callable[["Instance"], None]) -> None:
        self.s = settings
        self.zygote = zygote
        self.register, self.unregister, self.want_write = register, unregister, want_write
        self.guarded = guarded
        self._forget = forget
        self.log = supervisor_logger()
        self.workers: Dict[int, Entry] = {}
        self.made_by: Dict[int, Zygote] = {}  # wid -> its zygote (a reload leaves two for a while)
        self.procs: Dict[int, Any] = {}     # wid -> psutil.Process, made when first needed
        self.next_wid = 1
        self.transport = load_transport(settings.transport)
        self.transport_name = settings.transport
        self.lends = settings.transport == "sp"  # a native connection can be lent
        self.generation = 0
        self.states = States(settings.state_dir, settings.state_flush_interval)
        self.listeners: List[Listener] = []   # told of every state change, in order
        self.shared = SharedHosts(self)

    def now(self) -> float:
        return time.monotonic()

    # --- workers ---------------------------------------------------------------------------

    def spawn(self, inst: "Instance") -> WorkerHandle:
        """A new worker for ``inst``, sent its START and STATE. Whatever this raises, no
        worker is left behind: one already asked of the zygote is killed (its exit report
        then finds it no instance's current worker)."""
        state = frames.encode(frames.STATE, self._store(inst).frame_payload())  # before any fork
        wid, self.next_wid = self.next_wid, self.next_wid + 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        shared = inst.s.workers == "per_symbol" and inst.kind != wire.TYPE_FUNC
        try:
            if shared:  # a thread in its symbol's process (shared.py)
                host = self.shared.adopt(wid, theirs, inst)
            else:
                self.zygote.start_worker(wid, theirs, inst.ctrl.symbol)
        except OSError:
            ours.close()
            theirs.close()
            raise
        w = WorkerHandle(wid, time.monotonic())
        w.generation = self.generation
        if shared:
            self.shared.attach(host, w, inst)
        link = frames.Link(ours, lambda on: self.want_write(link.fileno(), on))
        entry = (w, inst, link)
        self.workers[wid] = entry
        self.made_by[wid] = self.zygote

        def on_link(mask: int) -> None:
            self.on_link(entry, mask)
        try:
            self.register(link.fileno(), on_link, inst)
            fd = inst.route.open_page(w, self.lends)
            start = StartSpec(inst.ctrl, inst.s.heartbeat_interval, inst.s.stop_grace,
                              self.s.dial_timeout, inst.s.max_calls, self.s.transport,
                              "" if shared else forensics.dump_path(self.zygote.rundir, wid), fd is not None,
                              inst.s.source_datasource).frame()
            try:
                link.send(start, [] if fd is None else [fd])   # any size: the rest waits in the outbox
            finally:
                if fd is not None:
                    os.close(fd)
            link.send(state)
        except BaseException:
            self.signal(w, signal.SIGKILL)
            raise
        return w

    def settings_for(self, symbol: str) -> Settings:
        return self.s.for_symbol(symbol)

    def switch(self, zygote: Zygote, settings: Settings) -> None:
        """A reload: new workers come from ``zygote`` with ``settings``; the older ones are
        outdated (the state machine retires them)."""
        self.zygote, self.s = zygote, settings
        self.states.flush_interval = settings.state_flush_interval
        self.generation += 1

    def send(self, w: WorkerHandle, frame: bytes, fds: Sequence[int] = ()) -> bool:
        entry = self.workers.get(w.wid)
        if entry is None:
            return False  # exited: its exit report is being handled
        entry[2].send(frame, fds)
        return True

    def signal(self, w: WorkerHandle, sig: int) -> None:
        if self.shared.is_shared(w):
            self.shared.signal(w, sig)
        else:
            self.made_by.get(w.wid, self.zygote).kill(w.wid, sig)

    def retire(self, w: WorkerHandle, why: str) -> None:
        self.shared.retire(w, why)

    def moving(self, w: WorkerHandle) -> str:
        return self.shared.moving(w)

    def zygote_of(self, w: WorkerHandle) -> Optional[Zygote]:
        return self.made_by.get(w.wid)

    def made(self, z: Zygote) -> bool:
        """Whether a worker of ``z`` is still alive."""
        return any(made is z for made in self.made_by.values())

    def on_link(self, entry: Entry, mask: int) -> None:
        w, inst, link = entry
        if self.workers.get(w.wid) is not entry:
            return  # stale: the worker's exit was handled after select returned this event
        if mask & selectors.EVENT_WRITE:
            link.flush()
        if not mask & selectors.EVENT_READ:
            return
        got = link.read()
        if got is None:  # the worker is gone; the zygote's exit report tells how
            self.unregister(link.fileno())
            return
        for ftype, payload in got:
            inst.on_frame(w, ftype, payload)

    def on_zygote(self, z: Zygote, mask: int) -> bool:
        """Requests zygote ``z`` can take now, then its reports; False when it is gone."""
        if mask & selectors.EVENT_WRITE:
            z.flush()
        if not mask & selectors.EVENT_READ:
            return True
        events = z.events()
        if events is None:
            self.unregister(z.fileno())
            return False
        for ev in events:
            if not isinstance(ev, (Started, Exited, Refused)) or self.shared.on_report(ev):
                continue
            entry = self.workers.get(ev.wid)
            if entry is None:
                continue
            if isinstance(ev, Started):
                self.guarded("started", entry[1], entry[1].on_started, entry[0], ev.pid)
            elif isinstance(ev, Exited):
                self.on_exit(entry, ev.status)
            else:  # the zygote could not fork it: as if spawn had raised
                self.on_exit(entry, 0, OSError(ev.errno, f"cannot fork: {ev.error}"))
        return True

    def orphaned(self, z: Zygote) -> None:
        """Zygote ``z`` died: its workers die with it (PDEATHSIG) unreported."""
        self.shared.orphaned(z)
        for wid, made in list(self.made_by.items()):
            if made is z and wid in self.workers:
                self.on_exit(self.workers[wid], signal.SIGKILL)

    def on_exit(self, entry: Entry, status: int, refused: Optional[OSError] = None) -> None:
        w, inst, link = entry
        del self.workers[w.wid]
        self.made_by.pop(w.wid, None)
        self.procs.pop(w.wid, None)
        # frames it sent just before exiting (READY error, FAULT, REPLY, DONE) may still be
        # unread: the zygote's report can be read first
        try:
            for ftype, payload in link.read() or []:
                self.guarded("frame", inst, inst.on_frame, w, ftype, payload)
        finally:
            self.unregister(link.fileno())
            link.close()
        if refused is not None:
            self.guarded("refused", inst, inst.on_refused, w, refused)
        else:
            self.guarded("exit", inst, inst.on_exit, w, status)
        if not self.shared.is_shared(w):
            forensics.discard(forensics.dump_path(self.zygote.rundir, w.wid))  # its instance may be gone
        self.shared.detach(w)

    def proc(self, w: WorkerHandle) -> Any:
        """psutil's handle of a worker (psutil is imported only when a figure is needed)."""
        proc = self.procs.get(w.wid)
        if proc is None and w.pid and w.wid in self.workers:
            proc = process_of(w.pid)
            if proc is not None:
                self.procs[w.wid] = proc
        return proc

    def cpu_seconds(self, w: WorkerHandle) -> Optional[float]:
        proc = self.proc(w)
        if proc is None:
            return None
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - psutil.Error: gone or not readable
            return None

    def dump(self, w: WorkerHandle) -> forensics.Dump:
        shared = self.shared.dump(w)
        if shared is not None:
            return shared
        return forensics.summary(forensics.read(forensics.dump_path(self.zygote.rundir, w.wid)))

    # --- eKuiper's endpoints ----------------------------------------------------------------

    def io(self, cls: Type[IO]) -> IO:
        return cls(self)  # type: ignore[call-arg]

    def watch(self, inst: "Instance", endpoint: Any, reading: bool) -> None:
        fd = endpoint.fileno()
        if fd < 0:
            return
        self.unregister(fd)
        if reading:
            def on_readable(_mask: int) -> None:
                inst.on_readable(endpoint)
            self.register(fd, on_readable, inst)

    def own_path(self, path: str) -> None:
        self.zygote.own_path(path)

    def disown_path(self, path: str) -> None:
        self.zygote.disown_path(path)

    # --- state ---------------------------------------------------------------------------

    def _store(self, inst: "Instance") -> Store:
        return self.states.store(inst.plugin, inst.ctrl.key, inst.s.state_max_bytes,
                                 lambda problem: self.note(inst, logging.WARNING, "%s", problem))

    def put_state(self, inst: "Instance", payload: bytes) -> None:
        refused = self._store(inst).apply(payload)
        if refused:  # the worker checks the limit first: only a worker gone astray gets here
            self.note(inst, logging.ERROR, "%s", refused)

    def flush_state(self, now: Optional[float] = None) -> None:
        """Write changed state to state_dir: on ticks (``now``), or all of it now."""
        def failed(store: Optional[Store], e: OSError) -> None:
            if store is None:
                self.log.error("cannot start the state syncer: %s; state is synced in the loop",
                               e.strerror or e)
            else:
                self.log.error("cannot write state to %s: %s", store.path, e.strerror or e)
        if now is None:
            self.states.flush(failed)
        else:
            self.states.tick(now, failed)

    # --- the rest ------------------------------------------------------------------------

    def forget(self, inst: "Instance") -> None:
        self._forget(inst)

    def changed(self, inst: "Instance", change: Change) -> None:
        for listener in self.listeners:
            listener(inst, change)

    def note(self, inst: "Instance", level: int, msg: str, *args: object) -> None:
        """Log about one instance: plugin, symbol and rule in the record, pid in the text."""
        self.log.log(level, "%s: " + msg, inst.where(), *args, extra=fields(inst))


def process_of(pid: int) -> Any:
    """psutil's handle of process ``pid``, None if it is gone (psutil is imported only when a
    figure is needed)."""
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def fields(inst: Optional["Instance"]) -> Dict[str, str]:
    """The log record fields naming ``inst``."""
    return {} if inst is None else ctrl_fields(inst.ctrl)


def ctrl_fields(ctrl: wire.Control) -> Dict[str, str]:
    """The log record fields naming the instance ``ctrl`` starts or stops."""
    return {"symbol": ctrl.symbol, "rule": ctrl.rule_id or "-"}

