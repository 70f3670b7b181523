"""Where a running supervisor can be asked how it is: a per-user private directory,
a status socket in it, and Prometheus text metrics on loopback when enabled.

Snapshot schema (``observe.snapshot()``, the status answer and the metrics all
use it)::

    {"plugin": str, "version": str, "pid": int, "zygote_pid": int, "uptime": float, "time": float,
     "instances": [{"symbol", "type", "rule", "op", "instance", "pid", "state",
                    "uptime", "restarts", "restart_causes": {cause: n},
                    "recent_restarts": [{at: time, cause: kind, error: text}],
                    "next_retry_at", "last_error", "last_error_at", "rss", "cpu_percent",
                    "items_in", "items_out", "errors"}]}

Times (``time``, ``at``, ``next_retry_at``, ``last_error_at``) are Unix time; ``next_retry_at``
is set while an instance waits to be started again (backoff, failed), ``last_error_at`` once it
has an error (``null`` otherwise), and ``last_error`` is never cut.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, Optional

from .. import paths
from ..transport.outbox import Outbox

Snapshot = Dict[str, Any]


class StatusError(RuntimeError):
    """No supervisor answers, or its answer is unusable (one line)."""


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
    path = live[0]
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
        except ConnectionRefusedError:
            raise StatusError(f"the supervisor of plugin {plugin} is not running "
                              f"(stale {path})") from None
        except OSError as e:
            raise StatusError(f"cannot ask the supervisor of plugin {plugin}: {e}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"the supervisor of plugin {plugin} gave an unreadable answer") from None


def query(plugin: str, runtime_dir: str = "", timeout: float = 3.0) -> Snapshot:
    """Ask the supervisor of ``plugin`` for its snapshot."""
    return request(plugin, {"cmd": "status"}, runtime_dir, timeout)


def prometheus(snap: Snapshot) -> str:
    """Prometheus text exposition of a snapshot."""
    plugin = snap["plugin"]
    lines = []

    def metric(name: str, kind: str, help_text: str, rows: list) -> None:
        lines.append(f"# HELP kuiper_pool_{name} {help_text}")
        lines.append(f"# TYPE kuiper_pool_{name} {kind}")
        for labels, value in rows:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"kuiper_pool_{name}{{{text}}} {value}")

    def per_instance(key: str) -> list:
        return [(_labels(plugin, i), i[key]) for i in snap["instances"]]

    metric("up", "gauge", "1 while the supervisor serves.", [({"plugin": plugin}, 1)])
    metric("instance_running", "gauge", "1 when the instance's worker is running.",
           [(_labels(plugin, i), int(i["state"] == "running")) for i in snap["instances"]])
    metric("items_in_total", "counter", "Items and calls received from eKuiper or emitted.",
           per_instance("items_in"))
    metric("items_out_total", "counter", "Items finished, calls answered, items emitted.",
           per_instance("items_out"))
    metric("errors_total", "counter", "Failed calls and dropped items.", per_instance("errors"))
    metric("restarts_total", "counter", "Worker restarts by cause.",
           [(dict(_labels(plugin, i), cause=cause), n)
            for i in snap["instances"] for cause, n in sorted(i["restart_causes"].items())])
    metric("resident_memory_bytes", "gauge", "Worker resident memory.", per_instance("rss"))
    metric("cpu_percent", "gauge", "Worker CPU use, percent of one core.", per_instance("cpu_percent"))
    return "\n".join(lines) + "\n"


def _labels(plugin: str, inst: Dict[str, Any]) -> Dict[str, str]:
    return {"plugin": plugin, "symbol": inst["symbol"], "type": inst["type"],
            "rule": inst["rule"], "op": inst["op"], "instance": str(inst["instance"])}


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """``GET /metrics`` on a loopback address, served from a thread off a cached snapshot."""

    def __init__(self, address: str, snapshot: Callable[[], Optional[Snapshot]]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # only when enabled

        host, _, port = address.rpartition(":")
        get = snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                snap = get()
                if self.path.split("?")[0] != "/metrics" or snap is None:
                    self.send_error(404)
                    return
                body = prometheus(snap).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        server_cls = ThreadingHTTPServer
        if ":" in host.strip("[]"):
            server_cls = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.server = server_cls((host.strip("[]"), int(port)), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="kuiper_pool-metrics")
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
