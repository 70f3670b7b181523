"""The HTTP side of ``kuiper-pool serve``: eKuiper's REST executor posts each call to
``/<function>``; ``/livez`` and ``/readyz`` answer load balancers and Kubernetes probes.

Python's ``http.server`` in threads (one per connection; eKuiper keeps its connection
open): a handler parses the body, hands the call to the supervisor's loop (:class:`Inbox`)
and waits for the reply; the loop alone touches instances and workers.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .. import wire
from .pool import Call
from .schema import CONTENT_TEXT, CallError, decode_args, encode_result, exec_request

MAX_BODY = 64 << 20   # bytes of one call's body (an image as base64 fits)


class Inbox:
    """Calls from handler threads to the loop: a queue and a pipe that wakes the selector."""

    def __init__(self) -> None:
        self.calls: Deque[Tuple[str, Call]] = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)

    def put(self, symbol: str, call: Call) -> None:
        self.calls.append((symbol, call))
        os.write(self.wake_w, b"c")

    def drain(self) -> List[Tuple[str, Call]]:
        """In the loop: every call waiting."""
        try:
            os.read(self.wake_r, 65536)
        except BlockingIOError:
            pass
        out = []
        while self.calls:
            out.append(self.calls.popleft())
        return out

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)


class Functions:
    """What the handlers need to know of the served functions: argument and result types,
    how long to wait for a reply, and the loop's readiness."""

    def __init__(self, types: Dict[str, Tuple[Sequence[str], str]], wait: float, inbox: Inbox,
                 ready: Callable[[], Optional[str]]) -> None:
        self.types = types
        self.wait = wait
        self.inbox = inbox
        self.ready = ready    # None: ready; else why not


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as Go's http.Client expects
    # the status line, headers and body leave in one write, flushed after each request, and
    # with Nagle off: otherwise a reply waits for the caller's delayed ACK (40 ms)
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: "Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/livez":
            self.reply(200, b"ok")
        elif self.path == "/readyz":
            why = self.server.functions.ready()
            self.reply(503, why.encode()) if why else self.reply(200, b"ok")
        else:
            self.reply(404, f"no such endpoint {self.path}; functions are POSTed to /<name>".encode())

    def do_POST(self) -> None:  # noqa: N802
        fns = self.server.functions
        name = self.path.lstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self.reply(413, f"a body of {length} bytes is over {MAX_BODY}".encode())
            return
        body = self.rfile.read(length)
        types = fns.types.get(name)
        if types is None:
            self.reply(404, f"no function named {name!r}; served: {', '.join(sorted(fns.types))}".encode())
            return
        try:
            request = exec_request(decode_args(body, types[0]))
        except CallError as e:
            self.reply(400, wire.one_line(f"function {name}: {e}"))
            return
        got: List[bytes] = []
        answered = threading.Event()

        def done(data: bytes) -> None:
            got.append(data)
            answered.set()
        fns.inbox.put(name, Call(request, done, time.monotonic()))
        if not answered.wait(fns.wait):
            self.reply(504, wire.one_line(f"function {name}: no reply within {fns.wait:g}s"))
            return
        self.reply(*encode_result(got[0], types[1]))

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TEXT)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass    # calls are counted per worker (status, metrics); errors are logged by the loop


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], functions: Functions) -> None:
        self.functions = functions
        super().__init__(address, Handler)


def start(listen: str, functions: Functions) -> Tuple[Server, threading.Thread]:
    """Listen on ``host:port`` and serve in a thread (OSError: cannot listen)."""
    host, _, port = listen.rpartition(":")
    server = Server((host.strip("[]"), int(port)), functions)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="kuiper-pool-serve-http", daemon=True)
    thread.start()
    return server, thread
