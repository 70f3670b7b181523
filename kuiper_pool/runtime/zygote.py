"""The zygote: a single-threaded process that makes workers and reports their exits.

nng aborts any forked child of a process that has opened an nng socket
(TRANSPORT-FACTS.md), so the supervisor forks the zygote before it opens any
socket, and every worker is forked from the zygote (about 2 ms, plugin modules
already loaded) or, with ``start_method: spawn``, exec'd from it. The zygote is
the workers' parent: it alone reaps them, reports each exit status, and signals
only children it has not reaped yet, so a recycled pid is never hit.

Orphans: when the supervisor dies, whatever killed it, the kernel sends the
zygote SIGTERM (``PR_SET_PDEATHSIG``) and closes its link; either makes the
zygote SIGKILL every worker, remove the ipc files the supervisor listened on and
the private runtime directory, and exit. Workers set ``PR_SET_PDEATHSIG(SIGKILL)``
too, so they die with the zygote even if it is SIGKILLed.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import sys
from typing import Callable, Dict, List, Optional, Set

PR_SET_PDEATHSIG = 1
MAX_MSG = 65536


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when the parent dies; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid checks remain
        pass
    if os.getppid() != expected_parent:
        os._exit(1)


def describe_status(status: int) -> str:
    """``exit code 3`` or ``signal 9 (SIGKILL)`` from a raw wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"signal {sig} ({name})"
    return f"exit code {os.WEXITSTATUS(status)}"


WorkerMain = Callable[[socket.socket], int]


class Zygote:
    """Supervisor-side handle of the zygote process."""

    def __init__(self, worker_main: WorkerMain, rundir: str,
                 spawn_argv: Optional[List[str]] = None) -> None:
        """Fork the zygote now. ``spawn_argv``, if given, makes workers exec that command
        (the link fd number is appended) instead of running ``worker_main`` in a fork.
        ``rundir`` is removed when the zygote exits."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the zygote
            code = 1
            try:
                parent_end.close()
                die_with_parent(supervisor_pid, signal.SIGTERM)
                code = _serve(child_end, worker_main, spawn_argv, rundir)
            finally:
                os._exit(code)
        child_end.close()
        self.pid = pid
        self.sock = parent_end
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def start_worker(self, wid: int, link: socket.socket) -> None:
        """Ask for a worker that talks over ``link`` (this side keeps no copy of it)."""
        msg = json.dumps({"op": "start", "wid": wid}).encode()
        self.sock.setblocking(True)
        try:
            socket.send_fds(self.sock, [msg], [link.fileno()])
        finally:
            self.sock.setblocking(False)
        link.close()

    def kill(self, wid: int, sig: int = signal.SIGKILL) -> None:
        """Signal worker ``wid`` unless it has already exited."""
        self._send({"op": "kill", "wid": wid, "sig": int(sig)})

    def own_path(self, path: str) -> None:
        """An ipc file the supervisor listens on: removed if the supervisor dies."""
        self._send({"op": "own", "path": path})

    def disown_path(self, path: str) -> None:
        self._send({"op": "disown", "path": path})

    def _send(self, obj: dict) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.send(json.dumps(obj).encode())
        except OSError:
            pass  # zygote gone: the supervisor notices through EOF
        finally:
            self.sock.setblocking(False)

    def events(self) -> Optional[List[dict]]:
        """Pending ``started``/``exited`` events; None when the zygote is gone."""
        out = []
        while True:
            try:
                data = self.sock.recv(MAX_MSG)
            except BlockingIOError:
                return out
            except OSError:
                return None
            if not data:
                return None if not out else out
            out.append(json.loads(data))

    def close(self) -> None:
        """Make the zygote kill every worker left and exit; reap it."""
        try:
            self.sock.close()
        finally:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


class _Terminated(Exception):
    pass


_leaving = False  # set once on the way out: a late SIGTERM must not abort the cleanup


def _on_term(*_: object) -> None:
    global _leaving
    if not _leaving:  # PDEATHSIG and the link's EOF arrive together when the supervisor dies
        _leaving = True
        raise _Terminated()


def _serve(sock: socket.socket, worker_main: WorkerMain, spawn_argv: Optional[List[str]],
           rundir: str) -> int:
    """The zygote's loop: start workers, forward kills, report exits; clean up at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, _on_term)       # PDEATHSIG: the supervisor died
    children: Dict[int, int] = {}  # pid -> wid
    owned: Set[str] = set()
    try:
        _loop(sock, worker_main, spawn_argv, children, owned)
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in children:
            _signal(pid, signal.SIGKILL)
        while children:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            children.pop(pid, None)
        _drain_paths(sock, owned)
        for path in owned:
            try:
                os.unlink(path)
            except OSError:
                pass
        shutil.rmtree(rundir, ignore_errors=True)
    return 0


def _loop(sock: socket.socket, worker_main: WorkerMain, spawn_argv: Optional[List[str]],
          children: Dict[int, int], owned: Set[str]) -> None:
    global _leaving
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    gc.freeze()  # keep the preloaded heap shared copy-on-write with the workers
    by_wid: Dict[int, int] = {}    # wid -> pid
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    me = os.getpid()

    def report(obj: dict) -> None:
        try:
            sock.send(json.dumps(obj).encode())
        except OSError:
            pass

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = children.pop(pid, None)
            if wid is not None:
                by_wid.pop(wid, None)
                report({"op": "exited", "wid": wid, "pid": pid, "status": status})

    while True:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                reap()
                continue
            try:
                msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 4)
            except InterruptedError:
                continue
            if not msg:  # supervisor gone or done: _serve takes every worker down
                _leaving = True
                return
            req = json.loads(msg)
            if req["op"] == "start":
                pid = _fork_worker(me, sock, wake_r, wake_w, fds[0], worker_main, spawn_argv)
                os.close(fds[0])
                children[pid] = req["wid"]
                by_wid[req["wid"]] = pid
                report({"op": "started", "wid": req["wid"], "pid": pid})
            elif req["op"] == "kill":
                pid = by_wid.get(req["wid"])
                if pid is not None:
                    _signal(pid, req["sig"])
            elif req["op"] == "own":
                owned.add(req["path"])
            elif req["op"] == "disown":
                owned.discard(req["path"])


def _drain_paths(sock: socket.socket, owned: Set[str]) -> None:
    """Apply own/disown requests still queued: a supervisor killed early may have sent them
    before the zygote read them."""
    sock.setblocking(False)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 4)
        except OSError:
            return
        for fd in fds:
            os.close(fd)
        if not msg:
            return
        req = json.loads(msg)
        if req["op"] == "own":
            owned.add(req["path"])
        elif req["op"] == "disown":
            owned.discard(req["path"])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _fork_worker(zygote_pid: int, sock: socket.socket, wake_r: int, wake_w: int, link_fd: int,
                 worker_main: WorkerMain, spawn_argv: Optional[List[str]]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # SIGINT stays ignored: the supervisor stops us
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        die_with_parent(zygote_pid)
        if spawn_argv:
            os.set_inheritable(link_fd, True)
            os.execv(spawn_argv[0], spawn_argv + [str(link_fd)])
        code = worker_main(socket.socket(fileno=link_fd))
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

