"""Where a running supervisor can be asked how it is: a per-user private directory,
a status socket in it, and Prometheus text metrics on loopback when enabled.

Snapshot schema (``Supervisor.snapshot()``, the status answer and the metrics all
use it)::

    {"plugin": str, "pid": int, "zygote_pid": int, "uptime": float, "time": float,
     "instances": [{"symbol", "type", "rule", "op", "instance", "pid", "state",
                    "uptime", "restarts", "restart_causes": {cause: n},
                    "last_error", "rss", "cpu_percent", "items_in", "items_out",
                    "errors"}]}
"""
from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import threading
from typing import Any, Callable, Dict, Optional

Snapshot = Dict[str, Any]


class StatusError(RuntimeError):
    """No supervisor answers, or its answer is unusable (one line)."""


def private_base(runtime_dir: str = "") -> str:
    """``<runtime_dir or tmp>/kuiper_pool-<uid>``, mode 0700 and ours, created if needed."""
    base = os.path.join(runtime_dir or tempfile.gettempdir(), f"kuiper_pool-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{base} must be a directory owned by uid {os.getuid()} with mode "
                              f"0700; remove or fix it")
    return base


def socket_path(plugin: str, runtime_dir: str = "") -> str:
    return os.path.join(private_base(runtime_dir), f"{plugin}.sock")


class StatusServer:
    """Answers one JSON snapshot per connection; driven by the supervisor's selector loop."""

    def __init__(self, path: str, snapshot: Callable[[], Snapshot]) -> None:
        self.path = path
        self.snapshot = snapshot
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)  # a stale socket of a killed supervisor of the same plugin
        except FileNotFoundError:
            pass
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                conn.sendall(json.dumps(self.snapshot()).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def query(plugin: str, runtime_dir: str = "", timeout: float = 3.0) -> Snapshot:
    """Ask the supervisor of ``plugin`` for its snapshot."""
    path = os.path.join(runtime_dir or tempfile.gettempdir(), f"kuiper_pool-{os.getuid()}",
                        f"{plugin}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except FileNotFoundError:
            raise StatusError(f"no kuiper_pool supervisor is running for plugin {plugin} "
                              f"(no {path})") from None
        except ConnectionRefusedError:
            raise StatusError(f"the supervisor of plugin {plugin} is not running "
                              f"(stale {path})") from None
        except OSError as e:
            raise StatusError(f"cannot ask the supervisor of plugin {plugin}: {e}") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise StatusError(f"the supervisor of plugin {plugin} gave an unreadable answer") from None


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
