"""The HTTP side of ``kuiper-pool serve``, inside the supervisor's selector loop: eKuiper's
REST executor posts each call to ``/<function>``; ``/livez`` and ``/readyz`` answer load
balancers and Kubernetes probes.

HTTP/1.1 with keep-alive and ``Content-Length`` bodies (what Go's ``http.Client`` sends),
parsed here on non-blocking sockets: no thread, no hand-off between threads, a call goes from
the socket to the pool and its reply from the worker's link to the socket in the same loop
(docs/serve.md, "Why HTTP in the loop"). One request at a time per connection (a pipelined
one waits in the buffer until the reply before it is written).

A connection whose next request is a call (its head peeked, nothing read) is lent to an
idle worker of its function (``lend``): the worker answers it and the calls after it itself,
until it gives the connection back (``take_back``); we keep our copy of the socket meanwhile,
unwatched.
"""
from __future__ import annotations

import selectors
import socket
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from .. import wire
from ..transport.outbox import Outbox
from ..transport.rest import (MAX_BODY, MAX_HEAD, CallError, HttpError, decode_args, encode_result, exec_request,
                              lendable, parse_head, response)
from .pool import Call

HEAD_TIMEOUT = 10.0    # seconds a started request may take to arrive whole
IDLE_TIMEOUT = 120.0   # seconds an idle keep-alive connection is kept (Go's client drops its own at 90)

Types = Dict[str, Tuple[Sequence[str], str]]   # function -> (argument types, result type)
Submit = Callable[[str, Call], None]
Register = Callable[[int, Callable[[int], None]], None]


class Conn:
    """One client connection: what it sent and not yet parsed, what waits to be written."""

    def __init__(self, sock: socket.socket, want_write: Callable[[int, bool], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.out = Outbox(sock, lambda on: want_write(self.fd, on))
        self.busy = False          # a call of this connection is with the pool
        self.closing = False       # close once the reply is written
        self.open = True
        self.continued = False     # 100 Continue sent for the request being read
        self.lent = False          # a worker holds it: not watched here
        self.read_next = False     # given back: we read its next request (the worker would not serve it)
        self.owed = ""             # the next request's answer: the error of the worker that died running it
        self.since = time.monotonic()   # the last request answered, or the connection made


class HttpServer:
    """Accepts and serves connections in the loop. ``submit(function, call)`` gives a call
    to the pool; ``lend(function, conn)`` lends a connection to one of its idle workers
    (False: none is); ``ready()`` is None when ready, else why not."""

    def __init__(self, listen: str, types: Types, submit: Submit, lend: Callable[[str, Conn], bool],
                 ready: Callable[[], Optional[str]], register: Register, unregister: Callable[[int], None],
                 want_write: Callable[[int, bool], None]) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, int(port)), family=family, backlog=256)
        self.listener.setblocking(False)
        self.types, self.submit, self.lend, self.ready = types, submit, lend, ready
        self.register, self.unregister, self.want_write = register, unregister, want_write
        self.conns: Dict[int, Conn] = {}
        register(self.listener.fileno(), self.on_accept)

    # --- connections ----------------------------------------------------------------------------

    def on_accept(self, _mask: int) -> None:
        while self.listener is not None:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # out of descriptors, or the client already gone: try on the next event
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a reply is one write
            conn = self.conns[sock.fileno()] = Conn(sock, self.want_write)
            self.watch(conn)

    def watch(self, conn: Conn) -> None:
        self.register(conn.fd, lambda mask: self.on_conn(conn, mask))

    def on_conn(self, conn: Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and conn.out.flush() and conn.closing:
                self.drop(conn)
                return
            if mask & selectors.EVENT_READ:
                if not (conn.buf or conn.busy or conn.closing or conn.read_next or len(conn.out)) \
                        and self.try_lend(conn):
                    return
                data = conn.sock.recv(1 << 16)
                if not data:
                    self.drop(conn)
                    return
                if not conn.buf:
                    conn.since = time.monotonic()   # a request starts: HEAD_TIMEOUT runs from now
                conn.buf += data
                self.serve(conn)
        except OSError:   # reset by the peer
            self.drop(conn)

    def try_lend(self, conn: Conn) -> bool:
        """Whether ``conn``, whose next request is a call (its head peeked, nothing read),
        went to a worker of its function."""
        try:
            req = parse_head(conn.sock.recv(MAX_HEAD, socket.MSG_PEEK))
        except HttpError:
            return False
        # a kept-alive POST that a worker takes whole; lend() finds the function and a worker
        if req is None or not lendable(req, req.path) or not self.lend(req.path[1:], conn):
            return False
        conn.lent = True
        self.unregister(conn.fd)
        return True

    def take_back(self, conn: Conn, owed: Optional[str], drop: bool) -> None:
        """A worker gave ``conn`` back or is gone: watch it again; ``owed`` answers the request
        waiting in it (the dead worker's call); ``drop`` when the worker may have written part
        of an answer."""
        conn.lent = False
        if not conn.open:
            return
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)   # as the worker may have left it
        except OSError:
            drop = True
        if drop:
            self.drop(conn)
            return
        conn.owed = owed or ""
        conn.read_next = True
        conn.since = time.monotonic()
        self.watch(conn)

    def drop(self, conn: Conn) -> None:
        if not conn.open:
            return
        conn.open = False
        if not conn.lent:
            self.unregister(conn.fd)
        self.conns.pop(conn.fd, None)
        conn.out.clear()
        conn.sock.close()

    # --- requests -------------------------------------------------------------------------------

    def serve(self, conn: Conn) -> None:
        """Answer the requests in ``conn``'s buffer, one at a time."""
        while conn.open and not conn.busy and not conn.closing:
            try:
                request = self.parse(conn)
            except HttpError as e:
                self.respond(conn, e.status, str(e).encode(), close=True)
                return
            if request is None:
                if len(conn.buf) > MAX_HEAD + MAX_BODY:
                    self.drop(conn)
                return
            self.handle(conn, *request)

    def parse(self, conn: Conn) -> Optional[Tuple[str, str, bool, bytes]]:
        """(method, path, keep-alive, body) of the first whole request, taken from the buffer."""
        buf = conn.buf
        req = parse_head(buf)
        if req is None:
            return None
        if len(buf) < req.total:
            if req.expect and not conn.continued:
                conn.continued = True
                conn.out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(buf[req.head_end:req.total])
        del buf[:req.total]
        conn.continued = False
        return req.method, req.path, req.keep, body

    def handle(self, conn: Conn, method: str, path: str, keep: bool, body: bytes) -> None:
        conn.read_next = False
        if conn.owed:  # the call a worker died running
            owed, conn.owed = conn.owed, ""
            self.respond(conn, 500, wire.one_line(owed), not keep)
            return
        if method == "GET":
            if path == "/livez":
                self.respond(conn, 200, b"ok", not keep)
            elif path == "/readyz":
                why = self.ready()
                self.respond(conn, 503 if why else 200, why.encode() if why else b"ok", not keep)
            else:
                self.respond(conn, 404, f"no such endpoint {path}; functions are POSTed to "
                                        f"/<name>".encode(), not keep)
            return
        if method != "POST":
            self.respond(conn, 405, f"{method} is not served".encode(), not keep)
            return
        name = path.lstrip("/")
        types = self.types.get(name)
        if types is None:
            self.respond(conn, 404, f"no function named {name!r}; served: "
                                    f"{', '.join(sorted(self.types))}".encode(), not keep)
            return
        try:
            request = exec_request(decode_args(body, types[0]))
        except CallError as e:
            self.respond(conn, 400, wire.one_line(f"function {name}: {e}"), not keep)
            return
        conn.busy = True

        def done(reply: bytes) -> None:
            conn.busy = False
            if conn.open:
                self.respond(conn, *encode_result(reply, types[1]), close=not keep)
                self.serve(conn)   # a request pipelined behind this one
        self.submit(name, Call(request, done, time.monotonic()))

    def respond(self, conn: Conn, status: int, body: bytes, close: bool = False) -> None:
        conn.since = time.monotonic()
        conn.closing = close
        try:
            if conn.out.write(response(status, body, close)) and close:
                self.drop(conn)
        except OSError:
            self.drop(conn)

    # --- the clock and the end ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Drop connections that hold a request half sent too long, or idle too long."""
        for conn in list(self.conns.values()):
            if conn.busy or conn.lent or len(conn.out):
                continue
            if now - conn.since > (HEAD_TIMEOUT if conn.buf else IDLE_TIMEOUT):
                self.drop(conn)

    def stop_accepting(self) -> None:
        if self.listener is not None:
            self.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None  # type: ignore[assignment]

    def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.conns.values()):
            self.drop(conn)

