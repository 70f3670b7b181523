"""Worker main: runs exactly one source/sink instance or one function symbol.

The worker reads its instance from the first frame on its link, builds the
plugin object with the author's factory, configures it, reports READY, then
serves until told to stop. What it does in between is its kind's (``kinds/<kind>/serve.py``,
loaded when the START names the kind): here is only what every worker has, the link
guarded against forks, the heartbeat thread that lets the supervisor tell a slow worker
from a hung one, READY and FAULT.
"""
from __future__ import annotations

import _thread
import logging
import os
import socket
import sys
import threading
import traceback
from typing import Any, Callable, List, Optional, Set, Tuple

from .. import logs, wire
from ..api import PluginConfig
from . import forensics, frames, kinds, proctitle
from .context import WorkerContext
from .host import Host, LinkLost
from .protocol import StartSpec
from .state import LocalState

EXIT_OK = 0
EXIT_CONFIGURE = 3    # configure or the factory failed; READY carried the error
EXIT_ORPHAN = 4       # the supervisor went away
EXIT_CRASH = 70       # plugin code raised; FAULT carried the error
EXIT_FORKED = 1       # a process forked by plugin code came back into kuiper_pool's code
EXIT_VERSION = 6      # an exec'd worker found another kuiper_pool installed than its zygote's


class ForkGuard:
    """eKuiper's channels, the call page and the link belong to the worker process alone.

    A process that plugin code forks inherits them; if its code returns instead of ending
    with ``os._exit`` (a library whose child raises, a forgotten ``_exit``), it would run the
    worker's loop: read the worker's frames, answer eKuiper's calls, write the page. At fork
    the child's copies of the link and of a lent connection become /dev/null and its page
    mapping is closed; the first time it reaches kuiper_pool's code it exits with one line.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.forked = False  # set in a forked child: a flag test, not a getpid per emitted item
        self.fds: Set[int] = set()
        self.pages: Set[Any] = set()   # call pages, sink pages (one per instance): closed at fork in the child
        self.where = ""
        self.log: Callable[[], logging.Logger] = logs.supervisor_logger  # the instance's, once known
        os.register_at_fork(after_in_child=self.after_fork_in_child)

    def after_fork_in_child(self) -> None:
        self.forked = True
        null = os.open(os.devnull, os.O_RDWR)
        for fd in self.fds:  # the numbers stay taken: nothing of the child's can reuse them
            try:
                os.dup2(null, fd)
            except OSError:
                pass
        os.close(null)
        for page in self.pages:
            page.close()

    def check(self) -> None:
        """Exit at once in a process forked by plugin code; nothing in the worker itself."""
        if self.forked:
            self.log().error(
                "%s: a process forked by plugin code (pid %d, from worker pid %d) returned into "
                "the worker instead of exiting; it exits now", self.where, os.getpid(), self.pid)
            sys.stdout.flush()
            os._exit(EXIT_FORKED)


def _orphaned() -> None:
    os._exit(EXIT_ORPHAN)


def _exit_ok() -> None:
    sys.stdout.flush()
    os._exit(EXIT_OK)


class GuardedLink(frames.BlockingLink):
    """The worker's link, usable by the worker process alone (see :class:`ForkGuard`).
    ``lost`` runs when the supervisor closed it: the process exits (the supervisor is gone,
    as the heartbeat finds too), or in a shared worker the instance's thread ends."""

    def __init__(self, sock: socket.socket, guard: ForkGuard,
                 lost: Callable[[], None] = _orphaned) -> None:
        super().__init__(sock)
        self.guard = guard
        self.lost = lost
        guard.fds.add(sock.fileno())

    def send(self, frame: bytes) -> None:
        self.guard.check()
        if self.sock.fileno() < 0:
            return  # a shared worker's instance ended: a late ack of plugin code goes nowhere
        try:
            super().send(frame)
        except ConnectionError:
            self.lost()

    def close(self) -> None:
        """Close it and the descriptors it received that nothing took (a shared worker's
        instance ended; the process goes on)."""
        self.guard.fds.discard(self.sock.fileno())
        self.sock.close()
        while self.fds:
            os.close(self.fds.popleft())

    def recv(self) -> Optional[Tuple[int, bytes]]:
        self.guard.check()
        return super().recv()


class Worker:
    """State shared by the runner and the heartbeat thread."""

    def __init__(self, link: GuardedLink, plugin: PluginConfig, spec: StartSpec,
                 state: bytes, shared: bool = False) -> None:
        self.link = link
        self.guard = link.guard
        self.plugin = plugin
        self.ctrl = spec.control
        self.spec = spec
        self.state = LocalState(state, lambda entry: link.send(frames.encode(frames.PUT, entry)),
                                self.where(), self.ctrl.plugin_type == wire.TYPE_FUNC)
        self.processed = 0
        self.busy_since = 0.0
        self.ctx: Optional[WorkerContext] = None  # a source's: its emit_error count is reported
        self.stopped = threading.Event()
        self._log: Optional[logging.Logger] = None
        self.page: Any = None   # its kind's page, if any (hold_page)
        self.shared = shared
        self.releases: List[Callable[[], None]] = []   # see release
        # what the process does when a source's open outlives its close by stop_grace;
        # a shared worker ends only the instance (host.py)
        self.give_up: Callable[[], None] = _exit_ok
        if not shared:  # a shared worker's guard names the process (host.py)
            self.guard.where, self.guard.log = self.where(), lambda: self.log

    @property
    def log(self) -> logging.Logger:
        """The instance's logger, made when first used: making a logger of a new name touches
        every logger of the process (logging clears their caches), pages an idle worker would
        otherwise copy from the zygote."""
        if self._log is None:
            self._log = logs.instance_logger(self.ctrl.symbol, self.ctrl.rule_id or None,
                                             self.ctrl.op_id, self.ctrl.instance_id)
        return self._log

    def where(self) -> str:
        return f"plugin {self.plugin.name} {self.ctrl.describe()}"

    def release(self, close: Callable[[], None]) -> None:
        """``close`` runs when the instance ends in a shared worker, whose process goes on
        (its sockets, pipes and pages); a worker of its own just exits."""
        self.releases.append(close)

    def hold_page(self, page: Any) -> None:
        """The page this instance shares with the supervisor (None: none): closed in a
        child that plugin code forks."""
        self.page = page
        if page is not None:
            self.guard.pages.add(page)

    def heartbeat(self, interval: float, parent: int) -> None:
        while not self.stopped.wait(interval):
            if os.getppid() != parent:
                os._exit(EXIT_ORPHAN)
            try:
                self.beat()
            except OSError:
                os._exit(EXIT_ORPHAN)

    def beat(self) -> None:
        """One heartbeat: progress, the running call's start, the process's CPU time (the
        supervisor compares it with psutil's: busy or hung)."""
        t = os.times()
        self.link.send(frames.Beat(self.processed, self.busy_since, t.user + t.system,
                                   self.ctx.errors if self.ctx is not None else 0).encode())

    def ready(self, error: Optional[str]) -> None:
        self.link.send(frames.Ready(error).encode())

    def fault(self, stage: str, exc: BaseException) -> int:
        """Report plugin code that raised; the supervisor restarts the instance."""
        text = f"{self.where()}: {stage} raised {type(exc).__name__}: {exc}"
        self.log.error("%s\n%s", text, traceback.format_exc().rstrip())
        try:
            self.link.send(frames.Fault(" ".join(text.split())).encode())
        except OSError:
            pass
        return EXIT_CRASH

    def configure(self, call: Callable[[], Any]) -> bool:
        """Run the plugin's configure (or open); False when it raised (READY says why)."""
        try:
            call()
        except Exception as e:  # noqa: BLE001
            self.ready(" ".join(f"{self.where()}: configure failed: {type(e).__name__}: {e}".split()))
            return False
        return True


def start_thread(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in a thread of kuiper_pool's own, never joined (a worker ends with
    ``os._exit``; an exec'd one's interpreter does not wait for it). A bare ``_thread``, not a
    ``threading.Thread``, whose objects and registries (events, conditions, a weak set) copy
    ~100 KiB of the zygote's pages into every worker; ``threading`` sees it as a dummy thread
    if code running in it asks."""
    _thread.start_new_thread(fn, args)


def run(link_sock: socket.socket, plugin: PluginConfig, spawned: bool = False) -> int:
    """Serve one instance over ``link_sock`` (or, told so by its first frame, be the shared
    worker of a symbol's instances: host.py); return the exit code. ``spawned``: this worker
    was exec'd (``start_method: spawn``), not forked, which its process title says."""
    link = GuardedLink(link_sock, ForkGuard())
    first = link.recv()
    if first is not None and first[0] == frames.HOST:
        return Host(link, frames.HostSpec.decode(first[1])).serve(
            lambda wid, sock, host: _run_shared(wid, sock, host, plugin), plugin.name, spawned)
    worker = _receive(link, plugin, first, False)
    if worker is None:
        return EXIT_ORPHAN
    c = worker.ctrl
    # most telling first: the title is cut to the length of the command line it replaces
    proctitle.set_title(f"kuiper-pool {'(exec) ' if spawned else ''}{plugin.name} {_kind(c)} {c.symbol}"
                        + (f" {c.rule_id}/{c.op_id}/{c.instance_id}" if c.rule_id else ""), c.symbol)
    if worker.spec.dump_path:
        try:
            forensics.install(worker.spec.dump_path)
        except OSError as e:  # a nicety: the worker serves without it
            worker.log.warning("%s: no stack dump on a crash or hang: cannot create %s: %s",
                               worker.where(), worker.spec.dump_path, e.strerror or e)
    start_thread(worker.heartbeat, worker.spec.heartbeat_interval, os.getppid())
    return _serve(worker)


def _kind(c: wire.Control) -> str:
    return "function" if c.plugin_type == wire.TYPE_FUNC else c.plugin_type


def _receive(link: GuardedLink, plugin: PluginConfig, first: Optional[Tuple[int, bytes]],
             shared: bool) -> Optional[Worker]:
    """The instance a link's START and STATE frames describe; None if the link closed first."""
    if first is None or first[0] != frames.START:
        return None
    spec = StartSpec.decode(first[1])
    state = link.recv()  # always follows START
    if state is None or state[0] != frames.STATE:
        return None
    return Worker(link, plugin, spec, state[1], shared)


def _serve(worker: Worker) -> int:
    """Load its kind's half, build the plugin object with the author's factory, run it."""
    try:
        runner = kinds.serve_for(worker.ctrl.plugin_type)
    except Exception as e:  # noqa: BLE001 - a broken install: only this kind's starts are refused
        text = " ".join(f"{worker.where()}: internal error: cannot load the {_kind(worker.ctrl)} "
                        f"worker: {type(e).__name__}: {e}".split())
        worker.log.error("%s", text)
        worker.ready(text)
        return EXIT_CONFIGURE
    factory = worker.plugin.get(worker.ctrl.plugin_type, worker.ctrl.symbol)
    try:
        obj = factory() if factory is not None else None
        if obj is None:
            raise LookupError(f"factory for {worker.ctrl.symbol} returned nothing")
    except Exception as e:  # noqa: BLE001 - any plugin error becomes the start answer
        worker.ready(f"{worker.where()}: factory raised {type(e).__name__}: {e}")
        return EXIT_CONFIGURE
    try:
        return runner(worker, obj)
    finally:
        worker.stopped.set()
        worker.guard.pages.discard(worker.page)
        for close in reversed(worker.releases if worker.shared else []):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - the instance has ended either way
                worker.log.warning("%s: cannot release %s: %s", worker.where(), close, e)
        sys.stdout.flush()


def _run_shared(wid: int, sock: socket.socket, host: Host, plugin: PluginConfig) -> int:
    """One instance of a shared worker, in a thread of its own: its link, frames and state
    are those of a worker of its own; a link the supervisor closed ends only this thread."""
    link = GuardedLink(sock, host.guard, host.link_lost)
    try:
        worker = _receive(link, plugin, link.recv(), True)
        if worker is None:
            return EXIT_ORPHAN
        worker.give_up = lambda: host.ended(wid, EXIT_OK, stuck=True)
        host.add(wid, worker)
        return _serve(worker)
    except LinkLost:
        return EXIT_ORPHAN
    finally:
        link.close()


# --- spawn start method ----------------------------------------------------------------

def spawn_main(argv: list) -> int:
    """``kuiper_pool.runtime.worker <payload fd> <log_level> <link fd> <zygote's kuiper_pool
    version>`` (started by ``launch.python_command`` with the plugin's folder first on
    sys.path): load the cloudpickled factories from the sealed memfd the supervisor wrote and
    every spawned worker inherits (never a path, never a socket), serve. The version comes
    last, where a worker of an older kuiper_pool ignores it."""
    import cloudpickle

    from ..version import __version__

    payload, level, fd = int(argv[1]), argv[2], int(argv[3])
    made_by = argv[4] if len(argv) > 4 else "a version that does not say it"
    if made_by != __version__:  # its frames may not be the supervisor's: serve nothing
        print(f"kuiper_pool worker pid {os.getpid()}: kuiper_pool {__version__} is installed now, "
              f"the plugin's supervisor runs {made_by}: restart the plugin in eKuiper to run the "
              f"installed version", flush=True)
        return EXIT_VERSION
    size, chunks, offset = os.fstat(payload).st_size, [], 0
    while offset < size:  # pread: the fd's offset is shared with every other spawned worker
        chunk = os.pread(payload, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    os.close(payload)
    plugin = PluginConfig(**cloudpickle.loads(b"".join(chunks)))
    logs.setup(plugin.name, level)
    try:
        return run(socket.socket(fileno=fd), plugin, spawned=True)
    except ConnectionError:  # the supervisor went away, as a forked worker's zygote reports it
        return EXIT_ORPHAN


if __name__ == "__main__":
    sys.exit(spawn_main(sys.argv))
