"""One running symbol instance and the worker process currently serving it.

State machine of an instance (transitions assert the state they leave):

    STARTING --READY ok--> RUNNING --crash--> BACKOFF --delay--> STARTING
        |                     |  \\--recycle--> RECYCLING --exit--> STARTING
        |                     \\--stop--> STOPPING --exit--> (removed)
        \\--first start fails--> (removed, eKuiper gets the error)
    BACKOFF --too many restarts in flap_window--> FAILED
    RUNNING --source open returned--> ENDED
"""
from __future__ import annotations

import socket
from typing import Callable, Dict, Optional, Union

from .. import wire
from . import frames
from .health import RestartPolicy, Vitals
from .routes import FunctionRoute, SinkRoute

STARTING = "starting"
RUNNING = "running"
BACKOFF = "backoff"
RECYCLING = "recycling"
STOPPING = "stopping"
FAILED = "failed"
ENDED = "ended"

Answer = Callable[[bytes], None]


class WorkerHandle:
    """The supervisor's end of one worker: its link, output buffer and vitals."""

    def __init__(self, wid: int, link: socket.socket, now: float) -> None:
        self.wid = wid
        self.pid = 0
        self.link = link
        link.setblocking(False)
        self.inbox = frames.FrameBuffer()
        self.outbox = bytearray()
        self.vitals = Vitals(last_beat=now)
        self.kill_reason = ""
        self.fault = ""            # the error this worker reported (FAULT, READY) before exiting
        self.kill_at = 0.0          # when to escalate to SIGKILL

    def send(self, frame: bytes) -> None:
        self.outbox += frame
        self.flush()

    def flush(self) -> None:
        """Write what the socket takes now; the rest waits for EVENT_WRITE."""
        while self.outbox:
            try:
                n = self.link.send(self.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.outbox.clear()  # the worker is gone; its exit report follows
                return
            del self.outbox[:n]

    def read(self) -> Optional[list]:
        """Whole frames received so far; None at EOF."""
        out: list = []
        while True:
            try:
                data = self.link.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                return None if not out else out
            if not data:
                return None if not out else out
            out.extend(self.inbox.feed(data))
            if len(data) < 1 << 18:  # drained; select is level-triggered and wakes us for more
                return out


class Instance:
    """A source/sink instance or a function symbol, across all of its workers."""

    def __init__(self, ctrl: wire.Control, policy: RestartPolicy) -> None:
        self.ctrl = ctrl
        self.state = STARTING
        self.policy = policy
        self.worker: Optional[WorkerHandle] = None
        self.route: Union[SinkRoute, FunctionRoute, None] = None
        self.pending: Optional[Answer] = None       # the start/stop answer eKuiper waits for
        self.restart_at = 0.0
        self.restarts = 0
        self.restart_causes: Dict[str, int] = {}
        self.last_error = ""
        self.running_since = 0.0
        self.items_in = 0
        self.items_out = 0
        self.errors = 0

    def move(self, new: str, *expected: str) -> None:
        assert not expected or self.state in expected, (
            f"{self.ctrl.describe()}: {self.state} -> {new} (expected {expected})")
        self.state = new

    def answer(self, data: bytes) -> None:
        """Answer the command eKuiper waits on, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending(data)
