#!/usr/bin/env python3
"""``kuiper-pool serve`` against the portable path and a hand-written service, in one run
(docs/serve.md).

    pip install -e '.[bench]'        # the official SDK, fastapi and uvicorn
    python bench/serve.py            # ~1 min; prints the table, writes bench/SERVE-RESULTS.md
    python bench/serve.py --smoke    # short windows; writes nothing

1. one CPU-bound symbol (bench/plugin/main.py ``burna``, ~20 ms a call on an idle core)
   called by 4 concurrent callers for a fixed window:
   * serve with 2 workers: 4 threads each POSTing on one kept-alive connection what eKuiper's
     REST executor posts for ``burna(loops)`` with the emitted schema (``{"arg0": "<int64>"}``);
   * the same function written by hand in a FastAPI app under ``uvicorn --workers 2``;
   * the portable path, kuiper_pool and the official SDK, through the eKuiper stand-in
     (``Host``): 4 threads calling the one function channel, which eKuiper serialises per
     symbol exactly so (one REQ/REP channel, a mutex per call);
2. per-call overhead: one caller calling ``noop`` back to back; p50 of serve's round trip
   (HTTP on loopback to the worker the connection is lent to) over a bare in-process call,
   and the floor under it: the same caller against a trivial server that answers every
   request with a fixed reply;
3. crash isolation: 4 long calls in flight, the busiest worker SIGKILLed: how many fail,
   under serve and under the hand-written service.

They take turns in rounds (medians over rounds): the machine may be shared. Every process
started is killed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import re
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import psutil  # noqa: E402

import run as portable  # noqa: E402  (bench/run.py: Session, call, exec_request)

RESULTS = os.path.join(HERE, "SERVE-RESULTS.md")
CALLERS = 4
WORKERS = 2
HAND = "hand-written"


def calibrate(target_ms: float = 20.0) -> int:
    """Loops of bench/plugin/main.py's Burn that take ~target_ms here."""
    loops = 100_000
    t0 = time.perf_counter()
    _burn(loops)
    per_loop = (time.perf_counter() - t0) / loops
    return max(1000, int(target_ms / 1000 / per_loop))


def _burn(loops: int) -> int:
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1000003
    return acc


def hammer(call: Callable[[], None], callers: int, seconds: float) -> float:
    """``callers`` threads call back to back for ``seconds``: calls/s."""
    counts = [0] * callers
    errors: List[BaseException] = []
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        try:
            while time.perf_counter() < stop_at:
                call()
                counts[i] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0)


def latencies(call: Callable[[], None], n: int) -> List[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return sorted(out)


# --- the HTTP services -------------------------------------------------------------------------

HANDWRITTEN = """\
# What users write by hand today: the plugin's function in a FastAPI app, uvicorn --workers 2.
import json, os, sys
sys.path.insert(0, {plugin_dir!r})
os.environ.setdefault("BENCH_RUNTIME", "pool")
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from main import Burn, Noop

app, burn, noop = FastAPI(), Burn(), Noop()


class Args(BaseModel):
    arg0: str = ""


@app.get("/readyz", response_class=PlainTextResponse)
def readyz():
    return "ok"


@app.post("/burna", response_class=PlainTextResponse)
def burna(args: Args):
    return json.dumps(burn.exec([int(args.arg0 or 0)], None))


@app.post("/noop", response_class=PlainTextResponse)
def noop_(args: Args):
    return noop.exec([args.arg0], None)
"""


FLOOR = """\
# The floor: a keep-alive HTTP server that answers every request at once with a fixed reply.
import socket, sys
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
reply = b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 2\\r\\n\\r\\nok"
while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(65536):
        conn.sendall(reply)
    conn.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpService:
    """One HTTP service process tree, in the bench's session like the portable plugins (the
    kernel's autogroups share CPU per session). ``serving`` lists the pids that run calls."""

    def __init__(self, log: str, argv: List[str], env: Dict[str, str], port: int,
                 serving: Callable[[psutil.Process], List[psutil.Process]]) -> None:
        self.port = port
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.serving = serving
        deadline = time.monotonic() + 60
        while not self.ready():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} did not become ready; see {log}")
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            c.request("GET", "/readyz")
            return c.getresponse().status == 200
        except OSError:
            return False

    def workers(self) -> List[psutil.Process]:
        return self.serving(psutil.Process(self.proc.pid))

    def caller(self, path: str, body: bytes) -> Callable[[], None]:
        """One eKuiper executor's calls as Go's http.Client makes them: the request in one
        write on a kept-alive connection (5 s timeout), the reply read up to Content-Length;
        a kept connection the server closed while idle is replaced and the request sent again
        (Go's transport does so when nothing of a reply was read). A raw socket, so that the
        figure is the server's cost, not Python's http.client's."""
        local = threading.local()
        request = (f"POST /{path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

        def call() -> None:
            for reused in (getattr(local, "sock", None) is not None, False):
                if getattr(local, "sock", None) is None:
                    local.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    local.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    local.sock.sendall(request)
                    reply = _read_reply(local.sock)
                except OSError:
                    reply = b""
                if reply:
                    break
                local.sock.close()
                local.sock = None
                if not reused:
                    raise RuntimeError(f"{path}: the server closed the connection")
            if reply[9:12] != b"200":
                raise RuntimeError(f"{path}: {reply[:300]!r}")
        return call

    def close(self) -> None:
        procs: List[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(10)
        self.log.close()


def _read_reply(sock: socket.socket) -> bytes:
    """One whole HTTP reply, or b"" when the connection ends first."""
    buf = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b""
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            length = int(re.search(rb"(?i)Content-Length: (\d+)", buf[:end]).group(1))
            if len(buf) >= end + 4 + length:
                return buf


def bench_plugin(root: str, name: str) -> str:
    """A copy of bench/plugin/main.py as a plugin folder; ``burna`` served by WORKERS workers."""
    d = os.path.join(root, name)
    os.makedirs(d)
    shutil.copy(portable.PLUGIN_MAIN, os.path.join(d, "main.py"))
    with open(os.path.join(d, name + ".json"), "w") as f:
        json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                   "sources": ["flood", "idle"], "sinks": ["count"],
                   "functions": [name + "noop", name + "burna"]}, f)
    with open(os.path.join(d, "kuiper_pool.yaml"), "w") as f:
        json.dump({"serve_workers": 1, "symbols": {
            name + "burna": {"serve_workers": WORKERS, "serve_args": "int64"},
            name + "noop": {"serve_args": "string"}}}, f)
    return d


def start_serve(root: str, name: str) -> HttpService:
    d, port = bench_plugin(root, name), free_port()
    env = dict(os.environ, BENCH_RUNTIME=portable.POOL, BENCH_PLUGIN=name, BENCH_PREFIX=name,
               PYTHONPATH=os.pathsep.join(p for p in (portable.REPO, os.environ.get("PYTHONPATH")) if p))
    argv = [sys.executable, "-m", "kuiper_pool.tools.cli", "serve", d, "--listen", f"127.0.0.1:{port}"]
    # the workers are the zygote's children
    return HttpService(os.path.join(root, name + ".log"), argv, env, port,
                       lambda p: [w for z in p.children() for w in z.children()])


def start_handwritten(root: str, name: str) -> HttpService:
    d, port = os.path.join(root, name), free_port()
    os.makedirs(d)
    with open(os.path.join(d, "app.py"), "w") as f:
        f.write(HANDWRITTEN.format(plugin_dir=os.path.dirname(portable.PLUGIN_MAIN)))
    argv = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", d, "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(WORKERS), "--log-level", "warning"]
    return HttpService(os.path.join(root, name + ".log"), argv, dict(os.environ), port,
                       lambda p: p.children())


def start_floor(root: str) -> HttpService:
    port = free_port()
    return HttpService(os.path.join(root, "floor.log"), [sys.executable, "-c", FLOOR, str(port)],
                       dict(os.environ), port, lambda p: [p])


def setup_http(service: HttpService, burn: str, noop: str, loops: int,
               closers: List[Callable[[], None]]) -> Tuple[Callable, Callable]:
    """(burn call, noop call) of an HTTP service: one caller connection per thread."""
    closers.append(service.close)
    return (service.caller(burn, json.dumps({"arg0": str(loops)}).encode()),
            service.caller(noop, b'{"arg0":"x"}'))


def crash_isolation(service: HttpService, burn: str, loops: int, tries: int, workers: int) -> Tuple[int, int]:
    """``CALLERS`` calls of ~10x a burn call in flight at once; SIGKILL the busiest worker
    while they run. (calls that failed, calls made), over ``tries``."""
    failed = made = 0
    for _ in range(tries):
        results: List[bool] = []
        started = threading.Barrier(CALLERS + 1)
        call = service.caller(burn, json.dumps({"arg0": str(loops * 10)}).encode())

        def one() -> None:
            started.wait()
            try:
                call()
                results.append(True)
            except (OSError, RuntimeError):
                results.append(False)
        threads = [threading.Thread(target=one) for _ in range(CALLERS)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.05)   # the calls reach the workers
        before = {p.pid: p.cpu_times().user for p in service.workers()}
        time.sleep(0.05)
        busiest = max(service.workers(), key=lambda p: p.cpu_times().user - before.get(p.pid, 0.0))
        busiest.kill()
        for t in threads:
            t.join(30)
        failed += results.count(False)
        made += CALLERS
        deadline = time.monotonic() + 30
        while len(service.workers()) < workers:   # the killed one replaced
            if time.monotonic() > deadline:
                raise RuntimeError("a killed worker was not replaced within 30 s")
            time.sleep(0.05)
    return failed, made


def setup_portable(root: str, tag: str, runtime: str, loops: int,
                   closers: List[Callable[[], None]]) -> Tuple[Callable, Callable]:
    """(burn call, noop call) through the portable path: eKuiper's one channel per symbol."""
    sess = portable.Session(root, tag, runtime, 0, "")
    closers.append(sess.close)
    fh = sess.host.start_function(sess.name + "burna")
    fn = sess.host.start_function(sess.name + "noop")
    burn, noop = portable.exec_request([loops]), portable.exec_request(["x"])
    return (lambda: portable.call(fh, burn)), (lambda: portable.call(fn, noop))


def bare_p50(n: int) -> float:
    """A bare call of the function: Noop.exec in this process."""
    sys.path.insert(0, os.path.dirname(portable.PLUGIN_MAIN))
    os.environ.setdefault("BENCH_RUNTIME", portable.POOL)
    import main as plugin_main  # bench/plugin/main.py

    fn = plugin_main.Noop()
    return statistics.median(latencies(lambda: fn.exec(["x"], None), n))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="short windows; write no results file")
    ap.add_argument("--tag", default="sb" + uuid.uuid4().hex[:6],
                    help="prefix of every plugin name and folder of the run (default: random)")
    args = ap.parse_args()
    window, n_lat, rounds, tries = (0.5, 200, 1, 1) if args.smoke else (1.5, 1000, 5, 5)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    loops = max(calibrate() for _ in range(3))   # the fastest sample: this machine may be busy
    root = tempfile.mkdtemp(prefix="kp-serve-bench-")
    tag = args.tag
    closers: List[Callable[[], None]] = []
    with_hand = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn"))   # the bench extra
    names = ("serve", HAND, portable.POOL, portable.OFFICIAL)
    rates: Dict[str, List[float]] = {n: [] for n in names}
    p50s: Dict[str, List[float]] = {n: [] for n in names}
    floor_p50s: List[float] = []
    crashes: Dict[str, Tuple[int, int]] = {}
    try:
        served = start_serve(root, f"{tag}s")
        calls = {"serve": setup_http(served, f"{tag}sburna", f"{tag}snoop", loops, closers)}
        if with_hand:
            hand = start_handwritten(root, f"{tag}h")
            calls[HAND] = setup_http(hand, "burna", "noop", loops, closers)
        calls[portable.POOL] = setup_portable(root, tag, portable.POOL, loops, closers)
        calls[portable.OFFICIAL] = setup_portable(root, tag, portable.OFFICIAL, loops, closers)
        floor = start_floor(root)
        closers.append(floor.close)
        floor_call = floor.caller("noop", b'{"arg0":"x"}')
        for burn, noop in calls.values():   # warm-up: every worker has run
            latencies(noop, 200)
            hammer(burn, CALLERS, 0.3)
        latencies(floor_call, 200)
        # they take turns, so that whatever else loads this machine loads them alike
        for _round in range(rounds):
            floor_p50s.append(statistics.median(latencies(floor_call, n_lat)))
            for name, (burn, noop) in calls.items():
                p50s[name].append(statistics.median(latencies(noop, n_lat)))
                rates[name].append(hammer(burn, CALLERS, window))
        crashes["serve"] = crash_isolation(served, f"{tag}sburna", loops, tries, WORKERS + 1)
        if with_hand:
            crashes[HAND] = crash_isolation(hand, "burna", loops, tries, WORKERS)
    finally:
        for close in closers:
            close()
        shutil.rmtree(root, ignore_errors=True)
    nan = float("nan")   # not measured
    serve_rate, hand_rate, pool_rate, off_rate = (statistics.median(rates[n] or [nan]) for n in names)
    serve_p50, hand_p50, pool_p50, off_p50 = (statistics.median(p50s[n] or [nan]) for n in names)
    bare = bare_p50(n_lat)
    rows = [
        ("calls/s, burna (~20 ms) x 4 callers: serve, 2 workers", f"{serve_rate:.1f}"),
        ("calls/s, the same through the portable path, kuiper_pool", f"{pool_rate:.1f}"),
        ("calls/s, the same through the portable path, official SDK", f"{off_rate:.1f}"),
        ("calls/s, the same hand-written: FastAPI + uvicorn --workers 2", f"{hand_rate:.1f}"),
        ("ratio serve / portable kuiper_pool", f"{serve_rate / pool_rate:.2f}x"),
        ("ratio serve / portable official SDK", f"{serve_rate / off_rate:.2f}x"),
        ("ratio serve / hand-written", f"{serve_rate / hand_rate:.2f}x"),
        (f"calls failed when the busiest worker is SIGKILLed with {CALLERS} calls in flight: serve",
         "{} of {}".format(*crashes["serve"])),
        ("the same, hand-written (uvicorn)", "{} of {}".format(*crashes[HAND]) if HAND in crashes
         else "not measured: pip install -e '.[bench]'"),
        ("p50 of one noop call, serve (REST round trip)", f"{serve_p50 * 1e6:.0f} us"),
        ("p50 of one noop call, hand-written", f"{hand_p50 * 1e6:.0f} us"),
        ("p50 of one noop call, portable kuiper_pool", f"{pool_p50 * 1e6:.0f} us"),
        ("p50 of one noop call, portable official SDK", f"{off_p50 * 1e6:.0f} us"),
        ("p50 of a bare in-process noop call", f"{bare * 1e6:.1f} us"),
        ("p50 of a keep-alive round trip to a trivial HTTP server (the floor)",
         f"{statistics.median(floor_p50s) * 1e6:.0f} us"),
        ("per-call overhead of serve over a bare call, p50", f"{(serve_p50 - bare) * 1e6:.0f} us"),
    ]
    table = "\n".join(["| figure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])
    head = (f"# kuiper-pool serve benchmark\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, burn loops {loops}, "
            f"{rounds} rounds taking turns of a {window:g} s window and {n_lat} latency samples "
            f"(medians), load average before the run {load}.\n\n")
    print(head + table)
    if not args.smoke:
        with open(RESULTS, "w") as f:
            f.write(head + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
