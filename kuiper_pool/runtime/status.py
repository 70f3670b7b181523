"""Where a running supervisor can be asked how it is: a status socket in the per-user
private directory, answering ``kuiper-pool status``, ``restart``, ``reload`` and the
metrics (``metrics.py``: the supervisor's own ``metrics_address``, or ``kuiper-pool
metrics`` for every plugin).

Snapshot schema (``observe.snapshot()``, the status answer and the metrics all
use it)::

    {"plugin": str, "version": str, "pid": int, "zygote_pid": int, "uptime": float, "time": float,
     "python": str, "started": float,
     "instances": [{"symbol", "type", "rule", "op", "instance", "pid", "shared", "state",
                    "uptime", "restarts", "restart_causes": {cause: n},
                    "recent_restarts": [{at: time, cause: kind, error: text}],
                    "next_retry_at", "last_error", "last_error_at", "rss", "cpu_percent",
                    "items_in", "items_out", "errors", "cpu_seconds"}],
     "shared_workers": [{"symbol", "type", "pid", "instances": [{"rule", "op", "instance"}],
                         "rss", "cpu_percent", "cpu_seconds"}]}

Times (``time``, ``at``, ``next_retry_at``, ``last_error_at``, ``started``) are Unix time;
``next_retry_at`` is set while an instance waits to be started again (backoff, failed),
``last_error_at`` once it has an error (``null`` otherwise), and ``last_error`` is never cut.
``version`` is the supervisor's kuiper_pool, ``started`` its start, ``restarts`` the sum of
``restart_causes``, ``cpu_seconds`` the CPU time of all the instance's own workers so far.
``shared`` is true while the instance runs in a worker shared by its symbol's instances
(``workers: per_symbol``): ``pid`` is that process's, shared by them, and so are ``rss``,
``cpu_percent`` and the current process's part of ``cpu_seconds``, repeated on each of them.
``shared_workers`` lists each live shared process once, with the instances it runs (none
while it is let go, or is ending with a thread that would not stop) and those figures: to
total memory or CPU, add up the instances that are not ``shared`` and the shared workers.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import time
from typing import Any, Callable, Dict, Optional

from .. import paths
from ..transport.outbox import Outbox

Snapshot = Dict[str, Any]


class StatusError(RuntimeError):
    """No supervisor answers, or its answer is unusable (one line)."""


class NotRunning(StatusError):
    """The socket is there, but no supervisor listens on it (a killed one's)."""


class NoSupervisor(StatusError):
    """No status socket where the plugin's supervisor would make it."""


MAX_CLIENTS = 16        # status clients served at once; more are closed at once
CLIENT_TIMEOUT = 2.0    # seconds a client gets to send its request and read the answer

class _Client:
    def __init__(self, conn: socket.socket, now: float) -> None:
        self.conn = conn
        self.since = now
        self.request = b""
        self.answer = Outbox(conn)
        self.answered = False


class StatusServer:
    """Answers one JSON request per connection (``{"cmd": "status"}`` or ``{"cmd":
    "restart", "symbol": ...}``) from the supervisor's selector loop, never blocking it:
    requests are read and answers written as the sockets allow; a client that stalls is
    dropped after CLIENT_TIMEOUT."""

    def __init__(self, path: str, handle: Callable[[Dict[str, Any]], Any],
                 watch: Callable[[int, int, Callable[[int], None]], None],
                 unwatch: Callable[[int], None]) -> None:
        self.path = path
        self.handle = handle
        self.watch, self.unwatch = watch, unwatch
        self.clients: Dict[int, _Client] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)  # a stale socket of a killed supervisor of the same plugin
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # 0600 whatever the umask
        try:
            self.sock.bind(path)
        except OSError:
            self.sock.close()
            raise
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.spare: Optional[int] = os.open(os.devnull, os.O_RDONLY)  # see on_accept

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # out of fds: take the client with the spare fd and hang up
            if self.spare is not None:
                os.close(self.spare)
                try:
                    self.sock.accept()[0].close()
                except OSError:
                    pass
                self.spare = os.open(os.devnull, os.O_RDONLY)
            return
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        client = self.clients[conn.fileno()] = _Client(conn, time.monotonic())
        self.watch(conn.fileno(), selectors.EVENT_READ, lambda mask: self.on_client(client, mask))

    def on_client(self, client: _Client, mask: int) -> None:
        if self.clients.get(client.conn.fileno()) is not client:
            return
        if mask & selectors.EVENT_READ and not client.answered:
            try:
                data = client.conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data or len(client.request) > 65536:
                self.drop(client)
                return
            client.request += data
            if b"\n" not in client.request:
                return
            try:
                request = json.loads(client.request.split(b"\n", 1)[0])
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                answer = self.handle(request)
            except ValueError as e:
                answer = {"error": f"bad request: {e}"}
            client.answered = True
            try:
                done = client.answer.write(json.dumps(answer).encode() + b"\n")
            except OSError:
                done = True
            if not done:
                self.unwatch(client.conn.fileno())
                self.watch(client.conn.fileno(), selectors.EVENT_WRITE,
                           lambda m: self.on_client(client, m))
                return
            self.drop(client)
        elif mask & selectors.EVENT_WRITE:
            try:
                done = client.answer.flush()
            except OSError:
                done = True
            if done:
                self.drop(client)

    def tick(self, now: float) -> None:
        for client in list(self.clients.values()):
            if now - client.since > CLIENT_TIMEOUT:
                self.drop(client)

    def drop(self, client: _Client) -> None:
        fd = client.conn.fileno()
        if self.clients.pop(fd, None) is client:
            self.unwatch(fd)
        client.conn.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self.drop(client)
        self.sock.close()
        if self.spare is not None:
            os.close(self.spare)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def request(plugin: str, req: Dict[str, Any], runtime_dir: str = "", timeout: float = 3.0) -> Any:
    """Send ``req`` to the supervisor of ``plugin``; its answer."""
    found = [paths.status_socket(plugin, base=b) for b in paths.private_bases(runtime_dir)]
    live = [p for p in found if os.path.exists(p)]
    if not live:
        first = found[0] if found else paths.status_socket(plugin, base=paths.usual_base(runtime_dir))
        raise NoSupervisor(f"no kuiper_pool supervisor is running for plugin {plugin} (no {first})")
    return ask(live[0], req, timeout, f"plugin {plugin}")


def ask(path: str, req: Dict[str, Any], timeout: float, whose: str) -> Any:
    """Send ``req`` to the status socket ``path`` (of ``whose``); its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (ConnectionRefusedError, FileNotFoundError):
            raise NotRunning(f"the supervisor of {whose} is not running "
                              f"(stale {path})") from None
        except OSError as e:
            raise StatusError(f"cannot ask the supervisor of {whose}: {e}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"the supervisor of {whose} gave an unreadable answer") from None


def query(plugin: str, runtime_dir: str = "", timeout: float = 3.0) -> Snapshot:
    """Ask the supervisor of ``plugin`` for its snapshot."""
    return request(plugin, {"cmd": "status"}, runtime_dir, timeout)
