"""A shared worker (``workers: per_symbol``): one process serving every instance of one
source or sink symbol, each in a thread of its own.

The supervisor forks it from the zygote like any worker and says so in the first frame on
its control link (HOST). Each instance it is given (ADOPT) brings its own link (the fd, by
SCM_RIGHTS), over which the thread runs exactly the code a worker of its own runs: the same
frames, state, pages and acks. What belongs to the process is done once here: its title, the
stack-dump file, the orphan check and the heartbeat (one thread beating for every instance).
A thread that ends is reported on the control link (ENDED, with its exit code), which the
supervisor takes as that instance's worker exit; the process's death is the exit of every
instance in it. An instance being killed (a deadline, start_timeout) is asked about (WHERE):
the process answers where its thread is in plugin code (AT), for the instance's error line.
A link the supervisor closed ends only its thread (:class:`LinkLost`); the control link's end
ends the process.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import traceback
from typing import Any, Callable, Dict, Set

from . import forensics, frames, proctitle

EXIT_CRASH = 70   # a thread's own error (a bug of ours), as the zygote reports a worker's

RunOne = Callable[[int, socket.socket, "Host"], int]


class LinkLost(BaseException):
    """An instance's link was closed by the supervisor (it gave the instance up): the thread
    ends. A BaseException, so plugin code's ``except Exception`` around a put_state does not
    keep the thread alive."""


class Host:
    """The shared worker's side: its control link, the instances it runs, the heartbeat."""

    def __init__(self, control: Any, spec: frames.HostSpec) -> None:
        self.control = control          # a worker.GuardedLink: its guard is the process's
        self.guard = control.guard
        self.spec = spec
        self.lock = threading.Lock()
        self.workers: Dict[int, Any] = {}   # wid -> the instance's worker.Worker, while it runs
        self.threads: Dict[int, int] = {}   # wid -> the ident of the thread running it
        self.stuck: Set[int] = set()        # reported ended while their thread still runs
        self.stopped = threading.Event()

    def serve(self, run_one: RunOne, plugin: str, spawned: bool) -> int:
        h = self.spec
        proctitle.set_title(f"kuiper-pool {'(exec) ' if spawned else ''}{plugin} {h.kind} "
                            f"{h.symbol} (shared)", h.symbol)
        self.guard.where = f"plugin {plugin} {h.kind} {h.symbol} (shared worker)"
        if h.dump_path:
            try:
                forensics.install(h.dump_path)
            except OSError as e:  # a nicety: the worker serves without it
                self.guard.log().warning("%s: no stack dump on a crash or hang: cannot create %s: %s",
                                       self.guard.where, h.dump_path, e.strerror or e)
        threading.Thread(target=self.heartbeat, args=(h.heartbeat_interval, os.getppid()),
                         daemon=True, name="kuiper_pool-heartbeat").start()
        while True:
            frame = self.control.recv()
            if frame is None:  # the supervisor let us go (no instance left) or is gone
                break
            if frame[0] == frames.ADOPT:
                wid = frames.split_seq(frame[1])[0]
                sock = socket.socket(fileno=self.control.fds.popleft())
                threading.Thread(target=self._thread, args=(run_one, wid, sock), daemon=True,
                                 name=f"kuiper_pool-instance-{wid}").start()
            elif frame[0] == frames.WHERE:
                wid = frames.split_seq(frame[1])[0]
                with self.lock:
                    ident = self.threads.get(wid, 0)
                try:
                    self.control.send(frames.encode_seq(frames.AT, wid, forensics.innermost(ident).encode()))
                except OSError:
                    pass  # the supervisor is gone: the heartbeat ends the process
        self.stopped.set()
        sys.stdout.flush()
        return 0

    def _thread(self, run_one: RunOne, wid: int, sock: socket.socket) -> None:
        code = EXIT_CRASH
        with self.lock:
            self.threads[wid] = threading.get_ident()
        try:
            code = run_one(wid, sock, self)
        except Exception as e:  # noqa: BLE001 - ours, not the plugin's: this instance alone ends
            print(f"kuiper_pool {self.guard.where} pid {os.getpid()}: instance {wid}: "
                  f"{type(e).__name__}: {e}\n{traceback.format_exc().rstrip()}", flush=True)
        finally:
            self.ended(wid, code)

    def add(self, wid: int, worker: Any) -> None:
        """Beat for ``worker`` from now on, starting now: the supervisor has waited since it
        asked for the instance (a worker of its own starts its heartbeat thread as early)."""
        with self.lock:
            self.workers[wid] = worker
        try:
            worker.beat()
        except (OSError, LinkLost):
            pass  # its link is closed already: the thread ends at its first read

    def ended(self, wid: int, code: int, stuck: bool = False) -> None:
        """Tell the supervisor instance ``wid`` is over, once. ``stuck``: its thread could not
        be made to return (a source's open outliving its close): it is left behind, and the
        supervisor moves the other instances to a fresh worker so this process can end; it
        is told where the thread is stuck."""
        with self.lock:
            if wid in self.stuck:  # its thread returned after all: reported already
                self.stuck.discard(wid)
                return
            if stuck:
                self.stuck.add(wid)
            self.workers.pop(wid, None)
            ident = self.threads.pop(wid, 0)
        at = forensics.innermost(ident) if stuck else ""
        try:
            self.control.send(frames.Ended(wid, code, stuck, at).encode())
        except OSError:
            pass  # the supervisor is gone: the heartbeat ends the process

    @staticmethod
    def link_lost() -> None:
        raise LinkLost()

    def heartbeat(self, interval: float, parent: int) -> None:
        """Every instance's heartbeat, from one thread: a process that cannot run this thread
        (stopped, deadlocked) is hung for all of them."""
        while not self.stopped.wait(interval):
            if os.getppid() != parent:
                self.control.lost()  # the zygote is gone: the process exits as an orphan
            with self.lock:
                running = list(self.workers.values())
            for worker in running:
                try:
                    worker.beat()
                except (OSError, LinkLost):
                    pass  # that instance's link is closed: its thread is ending
