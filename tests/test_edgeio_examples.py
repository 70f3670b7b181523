"""examples/edgeio under the official SDK and kuiper_pool, side by side, through real processes:
an HTTP source polling a stdlib server on 127.0.0.1, a file-tail source following a file that
grows (a partial line included), and a matplotlib (Agg) sink writing PNGs. Each runtime must
emit the same items and draw the same pictures. Skipped, with one line, without matplotlib."""
from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List

import pytest

pytest.importorskip("matplotlib", reason=f"matplotlib is not installed for Python {sys.version.split()[0]} "
                                         f"(the ml-test extra; skipped where it has no wheel)")

from conftest import wait_until  # noqa: E402
from side_by_side import RUNTIMES, copy_example  # noqa: E402


class _Sensor(BaseHTTPRequestHandler):
    """GET /<anything> -> {"n": k, "temp": ...}, k counting per path from 0."""

    counts: Dict[str, int] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        with self.lock:
            n = self.counts[self.path] = self.counts.get(self.path, -1) + 1
        body = json.dumps({"n": n, "temp": 20.0 + (n % 5) / 2}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def sensor():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sensor)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    t.join(5)


def _items(handle, n: int) -> List[dict]:
    return [handle.recv(timeout=20.0) for _ in range(n)]


def test_network_and_file_sources_and_a_plot_sink_equal_the_official_sdk(tmp_path, unique, host_runs, sensor):
    log = tmp_path / "device.log"
    initial = '{"level": "info", "v": 1}\nplain text line\n{"level": "warn", "v": 2}\npartial'
    out: Dict[str, Dict[str, object]] = {}
    for runtime in RUNTIMES:
        d, env, p = copy_example("edgeio", str(tmp_path), runtime, unique)
        host = host_runs.launch(d, env=env)
        got: Dict[str, object] = {}
        http = host.start_source(p + "http_poll", f"h{p}", config={"url": f"{sensor}/{runtime}",
                                                                   "interval": 0.02, "count": 5})
        got["http"] = [m["message"] for m in _items(http, 5)]
        log.write_text(initial)
        tail = host.start_source(p + "file_tail", f"f{p}", config={"path": str(log), "poll": 0.02})
        got["tail"] = [m["message"] for m in _items(tail, 3)]
        with open(log, "a") as f:  # the partial line completes; one more line follows
            f.write(" now complete\n7\n")
        got["tail"] += [m["message"] for m in _items(tail, 2)]
        plots = tmp_path / f"plots-{runtime}"
        sink = host.start_sink(p + "plot", f"s{p}", config={"dir": str(plots), "every": 5}, require_ack=True)
        for i in range(10):
            assert sink.collect(json.dumps({"y": (i * 37) % 11}).encode(), timeout=20.0) == {}
        pngs = [plots / "plot-0.png", plots / "plot-1.png"]
        wait_until(lambda: all(os.path.exists(f) and os.path.getsize(f) for f in pngs), timeout=20,
                   message="two PNGs")
        got["png"] = [f.read_bytes() for f in pngs]
        out[runtime] = got
        host.close()
    assert out["kuiper_pool"]["http"] == out["official"]["http"]
    assert [m["n"] for m in out["official"]["http"]] == [0, 1, 2, 3, 4]
    assert out["kuiper_pool"]["tail"] == out["official"]["tail"] == [
        {"level": "info", "v": 1}, {"line": "plain text line"}, {"level": "warn", "v": 2},
        {"line": "partial now complete"}, {"line": "7"}]
    assert out["kuiper_pool"]["png"] == out["official"]["png"]
    assert all(png.startswith(b"\x89PNG") for png in out["official"]["png"])
