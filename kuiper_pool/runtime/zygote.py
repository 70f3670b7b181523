"""The zygote: a single-threaded process that makes workers and reports their exits.

nng aborts any forked child of a process that has opened an nng socket
(docs/transport.md), so with ``transport: nng`` the supervisor forks the zygote
before it opens any socket; with the native transport it answers eKuiper's
handshake first and the zygote closes the control channel it inherits. Every
worker is forked from the zygote (about 2 ms, plugin modules already loaded) or,
with ``start_method: spawn``, exec'd from it. The zygote is the workers' parent:
it alone reaps them, reports each exit status, and signals only children it has
not reaped yet, so a recycled pid is never hit.

Orphans: when the supervisor dies, whatever killed it, the kernel sends the
zygote SIGTERM (``PR_SET_PDEATHSIG``) and closes its link, and the zygote also
checks its parent every second; any of these makes it SIGKILL every worker, remove
the ipc files the supervisor listened on (only while they are the files it created,
checked by inode) and the private runtime directory, and exit. Workers set
``PR_SET_PDEATHSIG(SIGKILL)`` too, so they die with the zygote even if it is SIGKILLed.
A SIGTERM while the supervisor lives (sent to the whole tree) changes nothing here: the
supervisor stops every instance and then the zygote. SIGHUP and SIGINT are ignored by the
zygote and its workers (:data:`OPERATOR_SIGNALS`).

What plugin code starts dies with its worker: each worker leads its own process
group and is a child subreaper, so orphans of its descendants (``setsid``
children, double-forked daemons) re-parent to it while it lives; the zygote is a
subreaper too. When a worker exits, the zygote kills its process group, and any
child of the zygote that is not a worker is an orphan of a dead worker and is
killed with its group.

A reload (``reload.py``) needs the plugin's code as it is on disk now, which a fork of the
supervisor cannot give (and with ``transport: nng`` the supervisor must never fork): the
supervisor ``posix_spawn``s a fresh interpreter that runs the plugin's main script with
``FRESH_ENV`` set (``kuiper_pool.runtime.zygote <script> <args>``, started by
``launch.python_command``: the script's folder first on sys.path, never the working
directory), so that ``plugin.start`` becomes a zygote serving the existing supervisor over a
socketpair inherited as ``FRESH_FD``. Its first report says what the new code exposes (HELLO) or why
it cannot serve (ERROR). Until the supervisor adopts it, it removes no file when it exits.
"""
from __future__ import annotations

import _signal as c_signal  # the C module under signal.py (see _fork_worker)
import gc
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from ..version import __version__
from ..paths import identity, unlink_if_ours
from ..transport.outbox import Outbox, Watch
from . import heap, kinds
from .prctl import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl
from .protocol import (FRESH_ENV, Adopt, Disown, Error, Exited, Hello, Kill, Own, Refused, Retire, Started,
                       StartWorker, ZygoteMessage, decode_zygote, encode_zygote, recv_zygote)

FRESH_FD = 3   # where a fresh zygote finds its link
# What reaches a whole process group or tree (a closed terminal's SIGHUP, Ctrl-C, ``pkill -HUP
# -f <script>``) is the supervisor's to act on (reload, stop): the zygote ignores them, and its
# workers inherit that (plugin code may install handlers of its own in a worker).
OPERATOR_SIGNALS = (signal.SIGHUP, signal.SIGINT)


def ignore_operator_signals() -> None:
    """Ignore :data:`OPERATOR_SIGNALS` (then unblock them: a fresh zygote starts with them
    blocked, so none can end it before this runs)."""
    for sig in OPERATOR_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, OPERATOR_SIGNALS)


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when the parent dies; exit if it already has."""
    try:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid checks remain
        pass
    if os.getppid() != expected_parent:
        os._exit(1)


def signal_text(sig: int) -> str:
    """``signal 9 (SIGKILL)``."""
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "?"
    return f"signal {sig} ({name})"


def describe_status(status: int) -> str:
    """``exit code 3`` or ``signal 9 (SIGKILL)`` from a raw wait status."""
    if os.WIFSIGNALED(status):
        return signal_text(os.WTERMSIG(status))
    return f"exit code {os.WEXITSTATUS(status)}"


WorkerMain = Callable[[socket.socket], int]


def other_threads() -> Tuple[int, str]:
    """How many threads this process has besides the calling one, and which, for a log line:
    Python threads by name, native ones (BLAS, OpenMP, ONNX Runtime pools) by their kernel
    name, with the thread pools threadpoolctl sees when it is installed."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: Python's own threads only
        tids = [t.native_id for t in threading.enumerate() if t.native_id is not None]
    me = threading.get_native_id()
    named = {t.native_id: t.name for t in threading.enumerate() if t.native_id not in (None, me)}
    python = [name for tid, name in named.items() if tid in tids]
    parts = [f"{name!r} (Python)" for name in python]
    native: Dict[str, int] = {}
    for tid in tids:
        if tid == me or tid in named:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # ended meanwhile
        native[comm] = native.get(comm, 0) + 1
    parts += [f"{n} native {comm!r}" for comm, n in native.items()]
    if native:
        try:
            from threadpoolctl import threadpool_info
            pools = ", ".join(f"{p['internal_api']} ({p['prefix']}) {p['num_threads']} threads"
                              for p in threadpool_info())
        except Exception:  # noqa: BLE001 - not installed or cannot inspect: the counts remain
            pools = ""
        if pools:
            parts.append(f"thread pools loaded: {pools}")
    return len(python) + sum(native.values()), "; ".join(parts)


class Closable(Protocol):
    def close(self) -> None: ...


class Zygote:
    """Supervisor-side handle of the zygote process."""

    def __init__(self, load_worker: Callable[[], WorkerMain], rundir: str,
                 spawn_argv: Optional[List[str]] = None, inherited: Sequence[Closable] = (),
                 exec_all: bool = True, env: Optional[Mapping[str, str]] = None,
                 symbol_env: Optional[Mapping[str, Mapping[str, str]]] = None) -> None:
        """Fork the zygote now. It calls ``load_worker`` once, before serving, for the
        function each forked worker runs (what it imports is then shared by every worker
        and kept off the supervisor's start). ``spawn_argv``, if given, is the command a
        worker execs (the link fd number is appended) instead of a fork: every worker with
        ``exec_all``, else only those of symbols in ``symbol_env``, which exec with that
        symbol's variables added. ``env`` is added to every worker's environment where it
        is not set yet. ``inherited``: what the supervisor has opened so far (eKuiper's
        control channel), closed in the zygote at once. ``rundir`` is removed when the
        zygote exits."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():  # threads alive were reported once, at start
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                # until _serve handles SIGTERM (load_worker takes a while): the link's EOF
                # also tells of the supervisor's death, and the cleanup must not be skipped
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                ignore_operator_signals()
                parent_end.close()
                for closable in inherited:  # a copy of the fd, not a shutdown: ours are unaffected
                    closable.close()
                die_with_parent(supervisor_pid, signal.SIGTERM)
                code = _become(child_end, load_worker, spawn_argv, rundir, supervisor_pid,
                               exec_all, env, symbol_env)
            finally:
                os._exit(code)
        child_end.close()
        self._attach(pid, parent_end, rundir)

    def _attach(self, pid: int, sock: socket.socket, rundir: str) -> None:
        self.pid = pid
        self.rundir = rundir
        self.sock = sock
        self.sock.setblocking(False)
        # never blocks the supervisor: requests the zygote has not taken yet wait here, in
        # order, while the owner watches for write readiness (``watch``, then ``flush``);
        # they are few and small (one per worker start, kill or listened path)
        self.outbox = Outbox(self.sock, packets=True)
        self.owned: Dict[str, List[int]] = {}   # what it removes if the supervisor dies
        self.reaped = False

    @classmethod
    def launch(cls, argv: List[str], rundir: str) -> "Zygote":
        """A fresh zygote: ``argv`` (the plugin's main script under
        ``kuiper_pool.runtime.zygote``) exec'd with ``posix_spawn`` (no fork of the supervisor,
        no atfork handler runs), its link inherited as FRESH_FD and nothing else of ours:
        not eKuiper's channels, whatever their library left inheritable. It starts with the
        operator's signals blocked (:data:`OPERATOR_SIGNALS`) until :func:`main` ignores them.
        OSError if it cannot start."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, FRESH_ENV: f"{os.getpid()}:{rundir}"}
        actions = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd != child_end.fileno()]
        try:
            pid = os.posix_spawn(argv[0], argv, env, setsigmask=OPERATOR_SIGNALS,
                                 file_actions=actions + [(os.POSIX_SPAWN_DUP2, child_end.fileno(), FRESH_FD)])
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self = cls.__new__(cls)
        self._attach(pid, parent_end, rundir)
        return self

    def fileno(self) -> int:
        return self.sock.fileno()

    def watch(self, watch: Watch) -> None:
        """Call ``watch(True)`` when requests start waiting, ``watch(False)`` when all went."""
        self.outbox.watch = watch

    def flush(self) -> None:
        self._guard(self.outbox.flush)

    def start_worker(self, wid: int, link: socket.socket, symbol: str = "") -> None:
        """Ask for a worker of ``symbol`` that talks over ``link`` (this side keeps no copy of it)."""
        msg, _none = encode_zygote(StartWorker(wid, symbol))   # small: never in a memfd
        try:
            self._guard(self.outbox.write, msg, [link.fileno()])
        finally:
            link.close()

    def kill(self, wid: int, sig: int = signal.SIGKILL) -> None:
        """Signal worker ``wid`` unless it has already exited."""
        self._send(Kill(wid, int(sig)))

    def own_path(self, path: str) -> None:
        """An ipc file the supervisor listens on: removed if the supervisor dies, but only
        while it is still this very file (a later supervisor may have made its own)."""
        try:
            ident = identity(path)
        except OSError:
            return
        self.owned[path] = list(ident)
        self._send(Own(path, list(ident)))

    def disown_path(self, path: str) -> None:
        self.owned.pop(path, None)
        self._send(Disown(path))

    def adopt(self, old: "Zygote") -> None:
        """Take over from ``old`` (a reload): clean up its run dir and files if we die."""
        self.rundir, self.owned = old.rundir, dict(old.owned)
        self._send(Adopt(self.rundir, self.owned))
        old.owned = {}
        old._send(Retire())

    def kill_now(self) -> None:
        """SIGKILL the zygote itself (one that was never adopted: it owns nothing)."""
        if not self.reaped:
            _signal(self.pid, signal.SIGKILL)

    def release(self) -> bool:
        """Let it go without waiting once it has taken every request (a retired zygote must
        not miss its RETIRE): it exits when its link closes, killing any worker left; True
        once it has been reaped."""
        if self.sock.fileno() >= 0:
            self.flush()
            if len(self.outbox):
                return False
            self.sock.close()
        if not self.reaped:
            try:
                self.reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:
                self.reaped = True
        return self.reaped

    def _send(self, msg: ZygoteMessage) -> None:
        data, fds = encode_zygote(msg)
        try:
            self._guard(self.outbox.write, data, fds)
        finally:
            _close_all(fds)

    @staticmethod
    def _guard(fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except OSError:
            pass  # zygote gone: the supervisor notices through EOF

    def events(self) -> Optional[List[ZygoteMessage]]:
        """Pending reports (Started, Exited, Refused; a fresh one's Hello or Error); None when
        the zygote is gone. ValueError naming the cause for a report that cannot be read."""
        out = []
        while True:
            try:
                data, fds = recv_zygote(self.sock, 1)
            except BlockingIOError:
                return out
            except OSError:
                return None
            if not data:
                return None if not out else out
            out.append(decode_zygote(data, fds)[0])

    def close(self) -> None:
        """Make the zygote kill every worker left and exit; reap it."""
        self.flush()
        try:
            self.sock.close()
        finally:
            if not self.reaped:
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
                self.reaped = True


SWEEP_EVERY = 1.0   # seconds between sweeps for orphans and for the supervisor's death


def set_subreaper() -> None:
    """Orphaned descendants re-parent to us instead of init (Linux; elsewhere a no-op)."""
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def children_of(pid: int) -> List[int]:
    """Live children of ``pid``, read from /proc (no psutil in the zygote). For this process,
    its own ``children`` file (one read, Linux 3.5+) instead of every process's ``stat``: the
    zygote sweeps every second, which with 500 workers meant opening ~1,000 files a second."""
    if pid == os.getpid():
        try:
            with open(f"/proc/self/task/{pid}/children", "rb") as f:
                return [int(p) for p in f.read().split()]
        except OSError:  # an older kernel: look at every process
            pass
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(name))
    return out


class _Zygote:
    """The zygote's side: its children, the paths it must remove, reports it owes."""

    def __init__(self, sock: socket.socket, worker_main: WorkerMain,
                 spawn_argv: Optional[List[str]], supervisor: int, rundir: str, exec_all: bool,
                 symbol_env: Dict[str, Mapping[str, str]]) -> None:
        self.sock = sock
        self.rundir = rundir                   # removed at exit ("" : nothing, not adopted yet)
        self.worker_main = worker_main
        self.spawn_argv = spawn_argv
        self.exec_all = exec_all
        self.symbol_env = symbol_env
        self.supervisor = supervisor
        self.me = os.getpid()
        self.workers: Dict[int, int] = {}      # pid -> wid
        self.by_wid: Dict[int, int] = {}       # wid -> pid
        self.owned: Dict[str, Tuple[int, ...]] = {}  # path -> its identity when owned
        self.unsent: List[Tuple[bytes, List[int]]] = []   # reports and their descriptors
        self.leaving = False
        self.asked = False                     # a worker was asked for (see _serve's prepare)

    def report(self, msg: ZygoteMessage) -> None:
        """Never blocks: a supervisor that does not read gets its reports later, a dead one never."""
        self.unsent.append(encode_zygote(msg))
        self.flush()

    def flush(self) -> None:
        while self.unsent:
            data, fds = self.unsent[0]
            try:
                socket.send_fds(self.sock, [data], fds, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the supervisor is gone
                for _data, left in self.unsent:
                    _close_all(left)
                self.unsent.clear()
                self.leaving = True
                return
            _close_all(fds)
            self.unsent.pop(0)

    def apply(self, req: ZygoteMessage, fds: List[int]) -> None:
        if isinstance(req, StartWorker) and fds and not self.leaving:
            self.asked = True
            try:
                pid = _fork_worker(self, fds[0], req.symbol)
            except OSError as e:  # at the process limit (pids.max, RLIMIT_NPROC), out of memory
                self.report(Refused(req.wid, e.errno or 0, e.strerror or str(e)))
            else:
                self.workers[pid] = req.wid
                self.by_wid[req.wid] = pid
                self.report(Started(req.wid, pid))
        elif isinstance(req, Kill):
            pid = self.by_wid.get(req.wid)
            if pid is not None:
                _signal(pid, req.sig)
        elif isinstance(req, Own):
            self.owned[req.path] = tuple(req.ident)
        elif isinstance(req, Disown):
            self.owned.pop(req.path, None)
        elif isinstance(req, Adopt):
            self.rundir = req.rundir
            self.owned.update((path, tuple(ident)) for path, ident in req.paths.items())
        elif isinstance(req, Retire):
            self.rundir, self.owned = "", {}
        for fd in fds:  # a forked worker has its copy of the link
            os.close(fd)

    def reap(self) -> None:
        """Reap whatever exited; a worker's exit is reported and its process group killed
        (what it started with Popen or fork dies with it)."""
        swept = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            wid = self.workers.pop(pid, None)
            if wid is not None:
                self.by_wid.pop(wid, None)
                _killpg(pid)
                self.report(Exited(wid, pid, status))
                swept = True
        if swept:
            self.sweep()

    def sweep(self) -> None:
        """A child we did not fork is an orphan of a dead worker (workers are subreapers of
        their own descendants while they live): kill it and its group."""
        for pid in children_of(self.me):
            if pid not in self.workers:
                _killpg(pid)
                _signal(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Kill every worker and everything they started; remove the files we own (only if
        they are still the ones we created: a new supervisor may have made its own)."""
        for pid in list(self.workers):
            _killpg(pid)
            _signal(pid, signal.SIGKILL)
        self.drain_requests()
        for path, ident in self.owned.items():
            unlink_if_ours(path, ident)
        if self.rundir:
            import shutil

            shutil.rmtree(self.rundir, ignore_errors=True)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            self.sweep()
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.01)

    def drain_requests(self) -> None:
        """Own/disown requests still queued: a supervisor killed early may have sent them
        before we read them."""
        self.sock.setblocking(False)
        while True:
            try:
                msg, fds = recv_zygote(self.sock)
                if not msg:
                    return
                req, fds = decode_zygote(msg, fds)
            except (OSError, ValueError):
                return
            _close_all(fds)
            if isinstance(req, (Own, Disown, Adopt, Retire)):
                self.apply(req, [])


def _serve(sock: socket.socket, worker_main: WorkerMain, spawn_argv: Optional[List[str]],
           rundir: str, supervisor: int, exec_all: bool,
           symbol_env: Dict[str, Mapping[str, str]]) -> int:
    """The zygote's loop: start workers, forward kills, report exits; clean up at the end.
    Signal handlers only wake the loop (an exception raised at an arbitrary point could
    skip the cleanup); the loop also notices the supervisor's death by itself."""
    from . import forensics  # the zygote's own imports come after its fork

    ignore_operator_signals()
    # the stack-dump signal is harmless to a worker until its own dump file is in place:
    # forked workers inherit faulthandler writing to /dev/null (forensics.install points it
    # at their file), exec'd ones ignore it until they install theirs (see _fork_worker)
    forensics.prepare()
    set_subreaper()
    z = _Zygote(sock, worker_main, spawn_argv, supervisor, rundir, exec_all, symbol_env)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    # SIGTERM is PDEATHSIG (the supervisor died), or sent to the whole tree, which the
    # supervisor stops gracefully: either way the loop leaves only once the supervisor is gone
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # What later workers share is prepared after the first worker is forked, a step at a
    # time while no request waits: eKuiper sends its first start right after the handshake,
    # and that worker (the plugin's first item) should not wait for work done for later ones.
    prepare = [] if exec_all else [*kinds.preloads(), _share_heap]
    z.wake = (wake_r, wake_w)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    try:
        while not z.leaving:
            if z.unsent:
                sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            events = sel.select(0 if prepare and z.asked else SWEEP_EVERY)
            if not events and prepare and z.asked:
                prepare.pop(0)()
                continue
            for key, mask in events:
                if key.fileobj == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    z.reap()
                    continue
                if mask & selectors.EVENT_WRITE:
                    z.flush()
                    if not z.unsent:
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    req: Optional[ZygoteMessage] = None
                    try:
                        msg, fds = recv_zygote(sock)
                        if msg:
                            req, fds = decode_zygote(msg, fds)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except (OSError, ValueError):  # unreadable: as the supervisor's end
                        req = None
                    if req is None:  # supervisor gone or done: every worker goes down
                        z.leaving = True
                        break
                    z.apply(req, fds)
            if os.getppid() != supervisor:
                z.leaving = True
            if not events:
                z.reap()
                z.sweep()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        z.cleanup()
    return 0


def _share_heap() -> None:
    """Leave the zygote's heap as the workers forked from now on should share it."""
    gc.collect()  # no garbage left to leave holes in the heap once its free blocks are taken
    heap.fill_free_blocks()
    gc.freeze()  # keep the preloaded heap shared copy-on-write with the workers


# --- a fresh zygote (reload) --------------------------------------------------------------

def fresh_link() -> Optional[Tuple[socket.socket, int, str]]:
    """In a fresh zygote: its link, the supervisor's pid and the run dir; None otherwise.
    The variable is consumed, so nothing this process starts inherits it."""
    value = os.environ.pop(FRESH_ENV, None)
    if value is None:
        return None
    supervisor, _, rundir = value.partition(":")
    die_with_parent(int(supervisor), signal.SIGTERM)
    return socket.socket(fileno=FRESH_FD), int(supervisor), rundir


def in_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a throwaway child (what plugin code does there stays there); its
    JSON-encodable result, or ``{"error": why}`` when the child died."""
    r, w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            data = json.dumps(fn(), default=repr).encode()
            with os.fdopen(w, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as src:
        data = src.read()
    _pid, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"checking the symbols ended the process with {describe_status(status)}"}
    return json.loads(data)


def serve_fresh(link: Tuple[socket.socket, int, str], hello: Hello,
                load_worker: Callable[[], WorkerMain], spawn_argv: Optional[List[str]],
                exec_all: bool, env: Mapping[str, str],
                symbol_env: Mapping[str, Mapping[str, str]]) -> int:
    """Report what the new code exposes, then serve as a zygote made at start does (see
    :class:`Zygote`; nothing to clean up until the supervisor adopts us)."""
    sock, supervisor, _rundir = link
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once adopted, the loop's cleanup must run
    _send_now(sock, hello)
    return _become(sock, load_worker, spawn_argv, "", supervisor, exec_all, env, symbol_env)


def _become(sock: socket.socket, load_worker: Callable[[], WorkerMain],
            spawn_argv: Optional[List[str]], rundir: str, supervisor: int, exec_all: bool,
            env: Optional[Mapping[str, str]], symbol_env: Optional[Mapping[str, Mapping[str, str]]]) -> int:
    """This process serves as the zygote: ``env`` where not set yet, the worker loaded, the loop."""
    for key, value in (env or {}).items():
        os.environ.setdefault(key, value)
    return _serve(sock, load_worker(), spawn_argv, rundir, supervisor, exec_all, dict(symbol_env or {}))


def _inheritable_fds() -> List[int]:
    """This process's descriptors beyond stdio that an exec'd child would inherit."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                out.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


def report_error(sock: Optional[socket.socket], text: str) -> None:
    """A fresh zygote cannot serve: tell the supervisor why, in one line."""
    line = " ".join(text.split())
    try:
        if sock is None:
            sock = socket.socket(fileno=os.dup(FRESH_FD))
        _send_now(sock, Error(line))
    except OSError:
        print(f"kuiper_pool fresh zygote: {line}", flush=True)


def _send_now(sock: socket.socket, msg: ZygoteMessage) -> None:
    """A fresh zygote's first report, whatever its size (a blocking send)."""
    data, fds = encode_zygote(msg)
    try:
        socket.send_fds(sock, [data], fds)
    finally:
        _close_all(fds)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def main(argv: List[str]) -> int:
    """``kuiper_pool.runtime.zygote <main script> <args>`` (started by
    ``launch.python_command`` with the script's folder first on sys.path): run the plugin's
    main script as eKuiper would, as ``__main__``; its ``plugin.start`` serves as the fresh
    zygote and never returns. An exception raised while importing or building the config is
    reported in one line."""
    import runpy
    import traceback

    ignore_operator_signals()
    script = argv[1]
    sys.argv = argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    except Exception as e:  # noqa: BLE001 - the plugin's own code failed: that is the answer
        frames = traceback.extract_tb(e.__traceback__)
        at = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}: " if frames else ""
        report_error(None, f"{at}{type(e).__name__}: {e}")
        return 1
    report_error(None, f"{script} returned without calling plugin.start")
    return 1


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _fork_worker(z: _Zygote, link_fd: int, symbol: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):  # OPERATOR_SIGNALS stay ignored: the supervisor's
            # _signal's, not signal.signal, which turns the old handler (the zygote's function)
            # into the Handlers enum through Enum's ValueError path: ~128 KiB of the zygote's
            # pages copied into every worker
            c_signal.signal(sig, c_signal.SIG_DFL)
        z.sock.close()
        for fd in z.wake:
            os.close(fd)
        die_with_parent(z.me)
        os.setpgid(0, 0)  # the worker's group: what it starts with Popen or fork dies with it
        set_subreaper()   # orphans of its descendants come to it while it lives, then to us
        if z.spawn_argv and (z.exec_all or symbol in z.symbol_env):
            from .forensics import DUMP_SIGNAL

            signal.signal(DUMP_SIGNAL, signal.SIG_IGN)  # kept across exec, unlike a handler
            os.set_inheritable(link_fd, True)  # the symbol's variables apply from the first import
            os.execve(z.spawn_argv[0], z.spawn_argv + [str(link_fd), __version__],
                      {**os.environ, **z.symbol_env.get(symbol, {})})
        code = z.worker_main(socket.socket(fileno=link_fd))
    except BaseException as e:  # noqa: BLE001 - the child must never return into the zygote loop
        if not isinstance(e, SystemExit):
            try:
                print(f"kuiper_pool worker pid {os.getpid()}: {type(e).__name__}: {e}", flush=True)
            except OSError:
                pass
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else code
    finally:
        os._exit(code)
    return 0  # unreachable


if __name__ == "__main__":
    # the canonical module serves (plugin.start imports it, not this __main__ copy)
    from kuiper_pool.runtime.zygote import main as _main

    sys.exit(_main(sys.argv))
