"""Prometheus text metrics of one or many supervisors' snapshots (schema in ``status.py``),
and the small HTTP server that serves them (a supervisor's ``metrics_address``, and
``kuiper-pool metrics``).

Every series of an instance exists from its start: counters at 0, one
``kuiper_pool_instance_state`` series per state (1 for the current one), one
``kuiper_pool_restarts_total`` series per cause, so ``increase()`` sees the first restart.
A snapshot of an older supervisor may lack a field: what it lacks is left out.

Memory and CPU are counted once per process, so that ``sum()`` over the series is the real
total: an instance with a worker of its own has them on its instance series; a shared worker
(``workers: per_symbol``) has them on series of its own, labelled ``worker="shared"`` and its
``pid`` (no rule, op or instance), and its instances have none. (An older supervisor's
snapshot, which has no ``shared_workers``, gives them on every instance, as it did.)
"""
from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Dict, Iterable, List, Tuple

from .health import RESTART_CAUSES
from .states import SHOWN

Snapshot = Dict[str, Any]
Labels = Dict[str, str]
STATES = tuple(s.value for s in SHOWN)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = f"kuiper_pool_{name}", kind, help_text
        self.samples: List[Tuple[Labels, float]] = []

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            yield f"{self.name}{{{text}}} {_number(value)}"


FAMILIES = (
    ("up", "gauge", "1 while the plugin's supervisor answers."),
    ("build_info", "gauge", "The kuiper_pool version and Python the supervisor runs; always 1."),
    ("start_time_seconds", "gauge", "When the supervisor started, seconds since the epoch."),
    ("instance_state", "gauge", "1 for the state the instance is in, 0 for the others."),
    ("items_in_total", "counter", "Items and calls received from eKuiper, or items a source emitted."),
    ("items_out_total", "counter", "Items finished, calls answered, items a source sent."),
    ("errors_total", "counter", "Failed calls, dropped items and emit_error calls."),
    ("restarts_total", "counter", "Unexpected worker ends by cause; each is restarted "
     "(at once, after backoff, or after failed_retry_min once failed)."),
    ("resident_memory_bytes", "gauge", "Resident memory of each worker process, counted once: "
     "an instance's own worker (0 without a worker), or a shared worker (worker=\"shared\", pid) "
     "for all its instances."),
    ("cpu_seconds_total", "counter", "CPU time (user + system) of an instance's own workers so far, "
     "or of one shared worker process (worker=\"shared\", pid); each process counted once."),
    ("shared_worker_instances", "gauge", "Instances a shared worker process (workers: per_symbol, "
     "worker=\"shared\", pid) runs; its memory and CPU are on its own series, not theirs."),
)
Sample = Tuple[str, Labels, float]
PROCESS = (("rss", "resident_memory_bytes"), ("cpu_seconds", "cpu_seconds_total"))  # snapshot key, family


def render(snaps: Iterable[Snapshot], down: Iterable[str] = ()) -> str:
    """The exposition of every snapshot, one family at a time (as the format requires),
    plus ``kuiper_pool_up 0`` for each plugin in ``down`` (found, but not answering) and for
    each snapshot that cannot be read (the others are served all the same)."""
    fam = {name: _Family(name, kind, text) for name, kind, text in FAMILIES}
    for plugin in down:
        fam["up"].samples.append(({"plugin": plugin}, 0))
    for snap in snaps:
        try:
            found = _samples(snap)
        except (KeyError, TypeError, ValueError, AttributeError):
            found = [("up", {"plugin": str(snap.get("plugin"))}, 0)]
        for name, labels, value in found:
            fam[name].samples.append((labels, value))
    return "\n".join(line for f in fam.values() for line in f.lines()) + "\n"


def _samples(snap: Snapshot) -> List[Sample]:
    """Every sample of one supervisor's snapshot (KeyError, TypeError... if it is malformed)."""
    plugin = str(snap["plugin"])
    out: List[Sample] = [("up", {"plugin": plugin}, 1)]
    if "version" in snap:
        out.append(("build_info", {"plugin": plugin, "version": str(snap["version"]),
                                   "python": str(snap.get("python", ""))}, 1))
    if "started" in snap:
        out.append(("start_time_seconds", {"plugin": plugin}, float(snap["started"])))
    shared = snap.get("shared_workers")
    for inst in snap.get("instances", ()):
        labels = instance_labels(plugin, inst)
        own = not (shared is not None and inst.get("shared"))  # else on its process's series
        out += [("instance_state", dict(labels, state=s), int(inst["state"] == s)) for s in STATES]
        causes = inst.get("restart_causes", {})
        out += [("restarts_total", dict(labels, cause=c), int(causes.get(c, 0)))
                for c in sorted(set(RESTART_CAUSES) | set(causes))]
        for key, name in (("items_in", "items_in_total"), ("items_out", "items_out_total"),
                          ("errors", "errors_total")) + (PROCESS if own else ()):
            if key in inst:
                out.append((name, labels, _check(inst[key])))
    for proc in shared or ():
        labels = {"plugin": plugin, "symbol": proc["symbol"], "type": proc["type"],
                  "worker": "shared", "pid": str(proc["pid"])}
        out.append(("shared_worker_instances", labels, len(proc["instances"])))
        out += [(name, labels, _check(proc[key])) for key, name in PROCESS]
    return out


def _check(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"not a number: {value!r}")
    return value


def instance_labels(plugin: str, inst: Dict[str, Any]) -> Labels:
    return {"plugin": plugin, "symbol": inst["symbol"], "type": inst["type"],
            "rule": inst["rule"], "op": inst["op"], "instance": str(inst["instance"])}


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


class MetricsServer:
    """``GET /metrics`` (and ``HEAD``, the same without a body) on ``host:port``, served from
    a thread; ``text()`` gives the exposition."""

    def __init__(self, address: str, text: Callable[[], str]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # only when enabled

        host, _, port = address.rpartition(":")
        host = host.strip("[]")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self.answer(body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self.answer(body=False)

            def answer(self, body: bool) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                data = text().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        server_cls = ThreadingHTTPServer
        if ":" in host:
            server_cls = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self.server = server_cls((host, int(port)), Handler)
        self.server.daemon_threads = True
        bound_host, bound_port = self.server.server_address[:2]
        self.url = f"http://{'[%s]' % bound_host if ':' in str(bound_host) else bound_host}:{bound_port}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="kuiper_pool-metrics")
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
