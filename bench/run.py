#!/usr/bin/env python3
"""kuiper_pool against the official eKuiper Python SDK: one plugin, one emulator, one run.

    python bench/run.py                # medians of 3 runs, writes bench/RESULTS.md (~3 min)
    python bench/run.py --runs 5
    python bench/run.py --smoke        # tiny counts (~10 s); writes a file only with --results

The same plugin (bench/plugin/main.py, an import switch on BENCH_RUNTIME) runs under both
runtimes through the same eKuiper stand-in (kuiper_pool.tools.emulator.Host). Each run measures
both runtimes (the order alternates between runs), each in fresh plugin processes named
uniquely, and kills every process tree it started. The table gives the median over runs
of each figure and the ratio kuiper_pool/official. kuiper_pool is measured as installed:
its modules are byte-compiled first (compileall, as pip does at install), like the official
SDK in site-packages.

The host's data sockets speak SP natively (``Host(data_transport="sp")``), as eKuiper's Go
host (mangos) does: its PULL reads whole batches of frames and its PUSH writes one frame per
write, so the host is not the bottleneck (a pynng host caps near 30-45k msg/s). The rows
marked "(pynng host)" repeat the source and sink figures against a pynng host, for comparison.
Control and function channels are pynng in both hosts.

1. source throughput: ``flood`` emits back to back; the host counts what arrives on
   eKuiper's PULL socket in a fixed window (raw messages taken in batches, after a warm-up);
2. sink throughput: the host pushes N items as fast as its socket takes them (with
   requireAck it waits for each ack, as eKuiper does); the time runs from the first send
   until the sink, having collected the N-th item, creates a marker file that the host polls;
3. function Exec: one host thread calls a trivial function back to back;
4. parallelism: two host threads call two CPU-bound symbols (as two rules would), and a
   flooding source is counted while one host thread calls a CPU-bound function;
5. worker restart (SIGKILL of a function worker until a call succeeds again), plugin
   start (Popen) to the control handshake and to the first source item, memory for
   1/50/500 idle source instances and the time their start commands took (from the first
   command to the last answer; bench/startup.py measures plugin start-up under eKuiper's
   runtime stand-in); rows "5s." repeat start-up and memory with ``workers: per_symbol``
   (every idle source a thread of one shared worker), next to the official SDK measured
   again the same way (threads are its only granularity);
6. ceilings: raw native SP and raw nng over ipc between this process and a bare peer
   process (for 1-3), and the CPU-bound loop of 4 in one bare process against two at once
   (for 4).

Rows marked (b) give the CPU time of the plugin's processes per item or call. The hand-written
analysis in bench/NOTES.md (what bounds each missed goal) is appended to RESULTS.md.
"""
from __future__ import annotations

import argparse
import compileall
import datetime
import glob
import itertools
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import psutil  # noqa: E402
import pynng  # noqa: E402

import kuiper_pool  # noqa: E402
import reap  # noqa: E402
from kuiper_pool.tools.emulator import Host, NativePull, SourceHandle, go_json  # noqa: E402
from kuiper_pool import paths  # noqa: E402
from kuiper_pool.transport import sp  # noqa: E402

PLUGIN_MAIN = os.path.join(HERE, "plugin", "main.py")
NNG_PEER = os.path.join(HERE, "nng_raw.py")
NOTES = os.path.join(HERE, "NOTES.md")
POOL, OFFICIAL = "pool", "official"
RUNTIMES = (POOL, OFFICIAL)
FMETA = go_json({"ruleId": "benchrule", "opId": "op", "instanceId": 0, "funcId": 0}).decode()
SINK_ITEM = b'{"device":"dev-0001","temperature":21.5,"humidity":40,"ts":1700000000000}'


@dataclass(frozen=True)
class Sizes:
    warmup: float          # seconds of traffic before any window starts
    window: float          # source throughput window
    sink_items: int        # items pushed without requireAck
    sink_items_pynng: int  # the same against the pynng host
    sink_ack_items: int    # items pushed with requireAck
    func_window: float     # trivial function calls
    cpu_window: float      # CPU-bound windows (two symbols; source beside a function)
    burn_loops: int        # loop count of one CPU-bound call (~15 ms at 200k)
    memory_counts: Tuple[int, ...]
    mem_settle: float      # seconds between the last start and the memory sample
    restarts: int          # SIGKILLed workers per run (each a different symbol's first crash)
    rtt_calls: int         # raw Req->Rep round trips
    big_items: Tuple[int, int]  # sink items and function calls of 1 MiB, of 8 MiB


FULL = Sizes(0.3, 2.0, 100_000, 20000, 3000, 2.0, 3.0, 200_000, (1, 50, 500), 1.0, 5, 5000, (200, 30))
SMOKE = Sizes(0.05, 0.25, 2000, 300, 100, 0.25, 0.5, 50_000, (1, 2), 0.1, 2, 200, (4, 2))
# Images travel as base64 JSON: the big-payload rows' sizes (label -> bytes of the payload)
BIG = (("1m", 1 << 20), ("8m", 8 << 20))


class BenchError(RuntimeError):
    pass


# --- one plugin process (tree) under the emulator ----------------------------------------------

class Session:
    """One copy of the bench plugin under one runtime, driven by one emulator Host.
    Every process of its tree is remembered and killed in ``close``."""

    def __init__(self, root: str, tag: str, runtime: str, run: int, label: str,
                 pid_symbols: int = 0, data_transport: str = "sp", workers: str = "per_instance") -> None:
        self.runtime = runtime
        self.workers = workers
        self.name = f"{tag}{'p' if runtime == POOL else 'o'}{run}{label}"
        self.dir = os.path.join(root, self.name)
        os.makedirs(self.dir)
        shutil.copy(PLUGIN_MAIN, os.path.join(self.dir, "main.py"))
        with open(os.path.join(self.dir, "kuiper_pool.yaml"), "w") as f:  # the official SDK ignores it
            f.write(f"workers: {workers}\n")
        functions = [self.name + k for k in ("noop", "nbytes", "burna", "burnb")] + \
            [f"{self.name}pid{i}" for i in range(pid_symbols)]
        with open(os.path.join(self.dir, self.name + ".json"), "w") as f:
            json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                       "sources": ["flood", "idle"], "sinks": ["count"], "functions": functions}, f)
        self.log_path = os.path.join(root, self.name + ".log")
        self.log = open(self.log_path, "ab")
        env = {"BENCH_RUNTIME": runtime, "BENCH_PLUGIN": self.name, "BENCH_PREFIX": self.name,
               "BENCH_PID_SYMBOLS": str(pid_symbols),
               "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
        self.host = Host(self.dir, env=env, stdout=self.log, init_timeout=30.0, command_timeout=30.0,
                         data_transport=data_transport)
        self.procs: Dict[int, psutil.Process] = {}
        self._rules = itertools.count()

    def rule(self) -> str:
        return f"{self.name}r{next(self._rules)}"

    def root(self) -> Optional[psutil.Process]:
        if self.host.process is None:
            return None
        try:
            return psutil.Process(self.host.process.pid)
        except psutil.Error:
            return None

    def tree(self) -> List[psutil.Process]:
        root = self.root()
        if root is None:
            return []
        try:
            return [root] + root.children(recursive=True)
        except psutil.Error:
            return [root]

    def track(self) -> None:
        for p in self.tree():
            self.procs.setdefault(p.pid, p)

    def close(self) -> None:
        """Stop everything as eKuiper would (close sockets, stop, SIGKILL the plugin), then
        make sure no process of the tree is left (the zygote cleans up on its own; wait for
        it, then SIGKILL whatever remains)."""
        try:
            self.track()
            closer = threading.Thread(target=self.host.close, daemon=True, name="bench-close")
            closer.start()
            closer.join(30.0)
            if closer.is_alive():  # see stop_handle: an nng close that never returns
                HUNG.append(f"{self.name}: host.close")
                print(f"  warning: closing {self.name} hung; killing its processes", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - cleanup goes on
            print(f"  warning: closing {self.name}: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            try:
                self.host.kill()
            except Exception:  # noqa: BLE001
                pass
            live = []
            for p in self.procs.values():
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        live.append(p)
                except psutil.Error:
                    pass
            reap.end(live, 5.0)
            self.log.close()

    def tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""


# --- host-side helpers --------------------------------------------------------------------------

Pull = Union[pynng.Socket, NativePull, sp.PullEndpoint]
BATCH = 4096  # messages taken per recv_many


def _pull(handle: SourceHandle) -> Pull:
    """eKuiper's PULL socket of a source instance (emulator internals: counting raw messages
    keeps JSON decoding in the host out of the measured path, for both runtimes alike)."""
    sock = handle._sock  # noqa: SLF001
    if sock is None:
        raise BenchError("source handle is stopped")
    return sock


def take(sock: Pull, n: int) -> List[bytes]:
    """Up to ``n`` raw messages, waiting at most ~0.1 s for the first."""
    if isinstance(sock, pynng.Socket):
        try:
            return [sock.recv()]
        except pynng.Timeout:
            return []
    got = sock.recv_many(n)
    if not got:
        if isinstance(sock, NativePull):
            sock.wait(0.1)
        else:
            select.select([sock], [], [], 0.1)
        got = sock.recv_many(n)
    return got


def recv_first(sess: Session, handle: SourceHandle, timeout: float = 15.0) -> bytes:
    sock = _pull(handle)
    deadline = time.monotonic() + timeout
    while True:
        got = take(sock, 1)
        if got:
            return got[0]
        if not sess.host.alive():
            raise BenchError(f"plugin {sess.name} died: {sess.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"no item from {handle.ctrl['symbolName']} within {timeout:g}s")


HUNG: List[str] = []  # emulator sockets whose close never returned (see stop_handle)


def stop_handle(sess: Session, handle, timeout: float = 15.0) -> None:
    """``handle.stop()`` with a watchdog. pynng 0.8.1 (nng 1.6.0) can hang for good in
    ``nng_close`` of the host's PULL socket when the plugin closes its PUSH end at the same
    moment (seen once with the official SDK, whose source ends itself after a 1 s send
    timeout). On a hang the handle is detached from the Host so that closing the session
    does not touch it again, and the run reports an error instead of hanging."""
    done = threading.Event()
    failure: List[BaseException] = []

    def stop() -> None:
        try:
            handle.stop()
        except BaseException as e:  # noqa: BLE001
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=stop, daemon=True, name="bench-stop").start()
    if not done.wait(timeout):
        sess.host._forget(handle)  # noqa: SLF001 - emulator internals, see above
        HUNG.append(f"{sess.name}: {handle.url}")
        raise BenchError(f"closing the emulator's socket {handle.url} hung for {timeout:g}s "
                         f"(pynng/nng close hang); abandoned")
    if failure:
        raise failure[0]


def drain(sock: Pull, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        take(sock, BATCH)


def count(sock: Pull, seconds: float) -> float:
    """Messages per second received on ``sock`` during ``seconds`` (batches, never decoded)."""
    clock = time.perf_counter
    n = 0
    t0 = clock()
    end = t0 + seconds
    while True:
        n += len(take(sock, BATCH))
        t = clock()
        if t >= end:
            return n / (t - t0)


def tree_cpu(sess: Session) -> float:
    """CPU seconds (user + system, all threads) used so far by the plugin's live processes."""
    total = 0.0
    for p in sess.tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def exec_request(args: List[Any]) -> bytes:
    return go_json({"func": "Exec", "arg": list(args) + [FMETA]})


def call(fh, raw: bytes, timeout: float = 30.0) -> Any:
    reply = fh.request(raw, timeout=timeout)
    if not reply.get("state"):
        raise BenchError(f"function {fh.symbol} failed: {reply.get('result')}")
    return reply["result"]


def percentile(sorted_values: List[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- measurements -------------------------------------------------------------------------------

def two_symbols(fa, fb, loops: int, seconds: float) -> Tuple[float, float]:
    """Two host threads call two CPU-bound symbols back to back for ``seconds``, as two
    rules would: total calls/s, and the median time one call spends inside ``exec``."""
    burn = exec_request([loops])
    call(fa, burn)
    call(fb, burn)
    counts, ends = [0, 0], [0.0, 0.0]
    inside: List[float] = []
    errors: List[BaseException] = []
    barrier = threading.Barrier(3)
    window: List[float] = []

    def hammer(i: int, fh) -> None:
        try:
            barrier.wait()
            stop_at = window[0]
            while time.perf_counter() < stop_at:
                inside.append(call(fh, burn)["ms"])
                counts[i] += 1
            ends[i] = time.perf_counter()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i, f), daemon=True) for i, f in enumerate((fa, fb))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    window.append(t0 + seconds)
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (max(ends) - t0), statistics.median(inside)


def measure_source(sess: Session, handle: SourceHandle, key: str, sz: Sizes, out: Dict[str, Any]) -> None:
    """Items/s of a flooding source instance counted in a window, and the plugin's CPU per item."""
    sock = _pull(handle)
    drain(sock, sz.warmup)
    c0, t0 = tree_cpu(sess), time.perf_counter()
    out[key] = count(sock, sz.window)
    items = out[key] * (time.perf_counter() - t0)
    out[key + "_cpu_us"] = (tree_cpu(sess) - c0) / items * 1e6
    stop_handle(sess, handle)


def measure_sink(sess: Session, key: str, n: int, ack: bool, out: Dict[str, Any],
                 item: bytes = SINK_ITEM) -> None:
    """Items/s of the ``count`` sink for ``n`` items pushed back to back (with requireAck each
    waits for its ack), until the sink's marker file appears; the plugin's CPU per item."""
    host = sess.host
    rule = sess.rule()
    marker = os.path.join(sess.dir, rule + ".done")
    s = host.start_sink("count", rule, config={"expect": n, "marker": marker}, require_ack=ack)
    sess.track()
    c0 = tree_cpu(sess)
    t0 = time.perf_counter()
    if ack:
        for _ in range(n):
            reply = s.collect(item, timeout=10.0)
            if reply:
                raise BenchError(f"sink acked with {reply}")
    else:
        send = s.send
        for _ in range(n):
            send(item)
    deadline = time.monotonic() + 60.0
    while not os.path.exists(marker):
        if time.monotonic() > deadline or not host.alive():
            raise BenchError(f"sink never collected {n} items: {sess.tail()}")
        time.sleep(0.0002)
    out[key] = n / (time.perf_counter() - t0)
    out[key + "_cpu_us"] = (tree_cpu(sess) - c0) / n * 1e6
    stop_handle(sess, s)


def measure_big(sess: Session, sz: Sizes, out: Dict[str, Any]) -> None:
    """1 MiB and 8 MiB items (a base64 image in JSON) on every path: a source emitting them,
    a sink collecting them with and without requireAck, a function taking one per call."""
    sess.host.start()
    sess.track()
    fh = sess.host.start_function(sess.name + "nbytes")
    for (label, size), n in zip(BIG, sz.big_items):
        measure_source(sess, start_flood(sess, size), f"source_{label}", sz, out)
        item = b'{"img":"' + b"A" * size + b'"}'
        measure_sink(sess, f"sink_noack_{label}", n, False, out, item)
        measure_sink(sess, f"sink_ack_{label}", n, True, out, item)
        raw = exec_request(["A" * size])
        if call(fh, raw) != size:
            raise BenchError(f"nbytes did not count {size} bytes")
        t0 = time.perf_counter()
        for _ in range(n):
            call(fh, raw)
        out[f"func_{label}"] = n / (time.perf_counter() - t0)


def start_flood(sess: Session, size: int) -> SourceHandle:
    handle = sess.host.start_source("flood", sess.rule(), config={"size": size})
    msg = json.loads(recv_first(sess, handle))
    if len(msg["message"]["pad"]) != size:
        raise BenchError(f"flood sent {msg!r:.100}")
    return handle


def measure_pynng_host(sess: Session, sz: Sizes, out: Dict[str, Any]) -> None:
    """Source and sink throughput against a pynng host, for comparison."""
    sess.host.start()
    sess.track()
    measure_source(sess, start_flood(sess, 0), "source_small_pynng", sz, out)
    measure_sink(sess, "sink_noack_pynng", sz.sink_items_pynng, False, out)


def measure_main(sess: Session, sz: Sizes, out: Dict[str, Any]) -> None:
    """Sections 1-4 and the start times of section 5 in one plugin process."""
    host = sess.host
    # 5b. plugin start to handshake and to first item: exec, handshake, start command, first message
    t0 = time.perf_counter()
    host.start()
    out["start_handshake_ms"] = host.handshake_seconds * 1000
    h = host.start_source("flood", sess.rule(), config={"size": 0})
    recv_first(sess, h)
    out["start_first_item_ms"] = (time.perf_counter() - t0) * 1000
    sess.track()

    # 1. source throughput, small and 4 KiB items
    measure_source(sess, h, "source_small", sz, out)
    measure_source(sess, start_flood(sess, 4096), "source_4k", sz, out)

    # 2. sink throughput without and with requireAck
    measure_sink(sess, "sink_noack", sz.sink_items, False, out)
    measure_sink(sess, "sink_ack", sz.sink_ack_items, True, out)

    # 3. function Exec calls/s and latency, trivial function
    fh = host.start_function(sess.name + "noop")
    raw = exec_request([1])
    for _ in range(50):
        call(fh, raw)
    lat: List[float] = []
    clock = time.perf_counter
    sess.track()
    c0 = tree_cpu(sess)
    t_start = clock()
    end = t_start + sz.func_window
    while True:
        t = clock()
        reply = fh.request(raw)
        t2 = clock()
        lat.append(t2 - t)
        if not reply["state"]:
            raise BenchError(f"noop failed: {reply}")
        if t2 >= end:
            break
    lat.sort()
    out["func_calls"] = len(lat) / (t2 - t_start)
    out["func_cpu_us"] = (tree_cpu(sess) - c0) / len(lat) * 1e6
    out["func_p50_us"] = percentile(lat, 0.50) * 1e6
    out["func_p99_us"] = percentile(lat, 0.99) * 1e6

    # 4a. two CPU-bound symbols called at the same time by two host threads
    fa = host.start_function(sess.name + "burna")
    fb = host.start_function(sess.name + "burnb")
    sess.track()
    burn = exec_request([sz.burn_loops])
    call(fa, burn)
    call(fb, burn)
    alone, alone_inside = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        alone_inside.append(call(fa, burn)["ms"])
        alone.append((time.perf_counter() - t0) * 1000)
    out["burn_inside_ms"] = statistics.median(alone_inside)
    out["burn_ms"] = statistics.median(alone)
    out["two_cpu_calls"], out["two_cpu_inside_ms"] = two_symbols(fa, fb, sz.burn_loops, sz.cpu_window)
    out["two_cpu_long_calls"], out["two_cpu_long_inside_ms"] = two_symbols(
        fa, fb, sz.burn_loops * 3, sz.cpu_window)
    errors: List[BaseException] = []

    # 4b. a flooding source while one host thread calls a CPU-bound function back to back
    h = host.start_source("flood", sess.rule(), config={"size": 0})
    recv_first(sess, h)
    stop = threading.Event()
    calls = [0]

    def burner() -> None:
        try:
            while not stop.is_set():
                call(fa, burn)
                calls[0] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=burner, daemon=True)
    t.start()
    try:
        sock = _pull(h)
        drain(sock, max(sz.warmup, 0.1))
        c0, t0 = calls[0], time.perf_counter()
        out["source_beside_cpu"] = count(sock, sz.cpu_window)
        out["burn_beside_source"] = (calls[0] - c0) / (time.perf_counter() - t0)
        # stop the source before waiting for the last CPU-bound call: an unread official
        # source ends itself after its 1 s send timeout, racing the host's close
        stop_handle(sess, h)
    finally:
        stop.set()
        t.join(timeout=30)
    if errors:
        raise errors[0]


def measure_restart(sess: Session, sz: Sizes, out: Dict[str, Any]) -> None:
    """kuiper_pool only: SIGKILL a function worker, time until a call succeeds again. Each
    sample is a different symbol's first crash (later crashes within flap_window back off)."""
    raw = exec_request([0])
    times = []
    for i in range(sz.restarts):
        fh = sess.host.start_function(f"{sess.name}pid{i}")
        old = call(fh, raw)
        tree = sess.tree()
        workers = {p.pid for p in tree[1:]} - {p.pid for p in tree[0].children()}  # not the zygote
        if old not in workers:  # never signal anything but a worker of this plugin
            raise BenchError(f"function {fh.symbol} answered pid {old}, not one of the plugin's "
                             f"worker processes {sorted(workers)}")
        t0 = time.perf_counter()
        os.kill(old, signal.SIGKILL)
        deadline = t0 + 15.0
        while True:
            reply = fh.request(raw, timeout=15.0)
            if reply["state"] and reply["result"] != old:
                break
            if time.perf_counter() > deadline:
                raise BenchError(f"worker of {fh.symbol} not serving 15 s after SIGKILL: {reply}")
        times.append((time.perf_counter() - t0) * 1000)
        sess.track()
    out["restart_ms"] = statistics.median(times)
    out["restart_max_ms"] = max(times)


def memory_figures(sess: Session) -> Dict[str, float]:
    """Sums over the plugin's process tree (supervisor, zygote, workers for kuiper_pool; the
    one process for the official SDK) and averages over kuiper_pool's worker processes."""
    root = sess.root()
    if root is None:
        raise BenchError(f"plugin {sess.name} is not running")
    direct = {p.pid for p in root.children()}
    tot = {"rss": 0, "uss": 0, "pss": 0}
    workers: List[Dict[str, int]] = []
    for p in sess.tree():
        try:
            with p.oneshot():
                info = p.memory_full_info()
        except psutil.Error:
            continue
        fig = {"rss": info.rss, "uss": info.uss, "pss": getattr(info, "pss", info.uss)}
        for k in tot:
            tot[k] += fig[k]
        if p.pid != root.pid and p.pid not in direct:  # below the zygote: a worker
            workers.append(fig)
    mib = 1048576
    out = {f"total_{k}": v / mib for k, v in tot.items()}
    out["procs"] = len(workers)
    for k in ("rss", "uss", "pss"):
        out[f"worker_{k}"] = statistics.mean(w[k] for w in workers) / mib if workers else float("nan")
    return out


def measure_memory(sess: Session, sz: Sizes, out: Dict[str, Any]) -> None:
    """Plugin start to handshake and to the first item of a flooding source (stopped then),
    then 1/50/500 idle sources of one symbol: totals, per instance and per worker process.
    Keys: ``pi_start_...`` and ``mem...`` per_instance, ``ps_...`` per_symbol (the official
    SDK, whose only granularity is threads, is measured alike in both sessions)."""
    key = "ps_" if sess.workers == "per_symbol" else ""
    startup = key or "pi_"
    t0 = time.perf_counter()
    sess.host.start()
    out[f"{startup}start_handshake_ms"] = sess.host.handshake_seconds * 1000
    h = sess.host.start_source("flood", sess.rule(), config={"size": 0})
    recv_first(sess, h)
    out[f"{startup}start_first_item_ms"] = (time.perf_counter() - t0) * 1000
    stop_handle(sess, h)
    sess.track()
    time.sleep(sz.mem_settle)
    base = memory_figures(sess)
    out[f"{key}mem0_pss"] = base["total_pss"]
    started, starting = 0, 0.0
    for n in sz.memory_counts:
        t0 = time.perf_counter()
        while started < n:
            sess.host.start_source("idle", sess.rule())
            started += 1
        starting += time.perf_counter() - t0
        out[f"{key}start{n}_ms"] = starting * 1000  # from the first start command to the n-th answer
        sess.track()
        time.sleep(sz.mem_settle)
        m = memory_figures(sess)
        for k in ("rss", "uss", "pss"):
            out[f"{key}mem{n}_{k}"] = m[f"total_{k}"]
        out[f"{key}mem{n}_per_pss"] = (m["total_pss"] - base["total_pss"]) / n
        out[f"{key}mem{n}_per_uss"] = (m["total_uss"] - base["total_uss"]) / n
        if sess.runtime == POOL:
            procs = 1 if sess.workers == "per_symbol" else n
            if m["procs"] != procs:
                raise BenchError(f"{n} sources ({sess.workers}) but {m['procs']} worker processes")
            for k in ("rss", "uss", "pss"):
                out[f"{key}mem{n}_worker_{k}"] = m[f"worker_{k}"]


# --only: the parts (session labels) a partial run measures
ONLY = {"big": ("b",), "memory": ("k", "s")}


def run_runtime(root: str, tag: str, runtime: str, run: int, sz: Sizes,
                errors: List[str], only: Optional[str] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for label, pid_symbols, fn in (("m", sz.restarts if runtime == POOL else 0, None),
                                   ("n", 0, measure_pynng_host), ("b", 0, measure_big),
                                   ("k", 0, measure_memory), ("s", 0, measure_memory)):
        if only is not None and label not in ONLY[only]:
            continue
        # idle sources send nothing: the memory sessions' host is pynng too, whose listeners
        # (unlike the native host's select()) take any number of sources
        sess = Session(root, tag, runtime, run, label, pid_symbols,
                       data_transport="nng" if fn in (measure_pynng_host, measure_memory) else "sp",
                       workers="per_symbol" if label == "s" else "per_instance")
        try:
            if fn is None:
                measure_main(sess, sz, out)
                if runtime == POOL:
                    measure_restart(sess, sz, out)
            else:
                fn(sess, sz, out)
        except Exception as e:  # noqa: BLE001 - record, clean up, go on with the next part
            part = "main" if fn is None else fn.__name__[len("measure_"):]
            text = f"run {run} {runtime} ({part}): {type(e).__name__}: {e}"
            errors.append(text)
            print("  ERROR " + text, file=sys.stderr)
            traceback.print_exc()
            tail = sess.tail()
            if tail:
                print("  plugin log tail:\n" + tail, file=sys.stderr)
        finally:
            sess.close()
    return out


# --- 6. raw nng between two bare processes --------------------------------------------------------

def _peer(args: List[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, NNG_PEER] + args, stdout=subprocess.DEVNULL, env=env)


def _end(child: Optional[subprocess.Popen]) -> None:
    if child is not None and child.poll() is None:
        child.kill()
    if child is not None:
        child.wait()


def raw_push_pull(tag: str, size: int, sz: Sizes, native: bool) -> float:
    """msg/s from a bare peer process pushing ``size``-byte messages flat out to this one."""
    url = f"ipc:///tmp/{tag}_raw{'sp' if native else 'nng'}pp.ipc"
    if native:
        pull: Pull = sp.PullEndpoint(url)
    else:
        pull = pynng.Pull0(recv_timeout=100)
        pull.recv_max_size = 0
        pull.listen(url)
    child = None
    try:
        child = _peer(["sp-push" if native else "push", url, str(size)])
        deadline = time.monotonic() + 15.0
        while not take(pull, 1):
            if child.poll() is not None or time.monotonic() > deadline:
                raise BenchError("raw push peer sent nothing")
        drain(pull, sz.warmup)
        return count(pull, sz.window)
    finally:
        pull.close()
        _end(child)


def nng_req_rep(tag: str, sz: Sizes) -> Tuple[float, float]:
    url = f"ipc:///tmp/{tag}_rawrr.ipc"
    req = pynng.Req0(recv_timeout=15000, send_timeout=15000, resend_time=0)
    req.listen(url)
    child = None
    try:
        child = _peer(["rep", url])
        for _ in range(200):
            req.send(b"x" * 64)
            req.recv()
        lat = []
        clock = time.perf_counter
        msg = b"x" * 64
        for _ in range(sz.rtt_calls):
            t = clock()
            req.send(msg)
            req.recv()
            lat.append(clock() - t)
        lat.sort()
        return percentile(lat, 0.5) * 1e6, percentile(lat, 0.99) * 1e6
    finally:
        req.close()
        _end(child)


def sp_req_rep(tag: str, sz: Sizes) -> Tuple[float, float]:
    """Round trips of a native SP REQ (this process, blocking) to a bare native REP peer."""
    path = f"/tmp/{tag}_rawsprr.ipc"
    listener, ident = sp.listen(path)
    child = conn = None
    try:
        child = _peer(["sp-rep", "ipc://" + path])
        if not select.select([listener], [], [], 15.0)[0]:
            raise BenchError("raw sp rep peer did not connect")
        conn, _ = listener.accept()
        conn.setblocking(True)
        conn.settimeout(15.0)
        conn.sendall(sp.header(sp.REQ))
        got = b""
        while len(got) < 8:
            got += conn.recv(8 - len(got))
        sp.check_header(got, sp.REP, path)
        reader, rid, msg = sp.FrameReader(), 0x80000000, b"x" * 64
        clock = time.perf_counter

        def round_trip() -> None:
            nonlocal rid
            rid = sp.next_id(rid)
            conn.sendall(sp.frame(rid.to_bytes(4, "big") + msg))
            while True:
                data = conn.recv(sp.READ_SIZE)
                if not data:
                    raise BenchError("raw sp rep peer closed the connection")
                if reader.feed(data):
                    return

        for _ in range(200):
            round_trip()
        lat = []
        for _ in range(sz.rtt_calls):
            t = clock()
            round_trip()
            lat.append(clock() - t)
        lat.sort()
        return percentile(lat, 0.5) * 1e6, percentile(lat, 0.99) * 1e6
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        paths.unlink_if_ours(path, ident)
        _end(child)


def cpu_scaling(sz: Sizes) -> Tuple[float, float]:
    """Calls/s of the CPU-bound loop in one bare process, and in two at once (summed)."""
    def burners(k: int) -> float:
        procs = []
        try:
            procs = [subprocess.Popen([sys.executable, NNG_PEER, "burn", str(sz.cpu_window),
                                       str(sz.burn_loops)], stdout=subprocess.PIPE, text=True)
                     for _ in range(k)]
            return sum(float(p.communicate(timeout=sz.cpu_window + 30)[0]) for p in procs)
        finally:
            for p in procs:
                _end(p)
    return burners(1), burners(2)


def run_raw(tag: str, sz: Sizes, errors: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    try:
        out["sp_pp_100"] = raw_push_pull(tag, 100, sz, native=True)
        out["sp_pp_4k"] = raw_push_pull(tag, 4096, sz, native=True)
        for label, size in BIG:
            out[f"sp_pp_{label}"] = raw_push_pull(tag, size, sz, native=True)
        out["sp_rr_p50_us"], out["sp_rr_p99_us"] = sp_req_rep(tag, sz)
        out["nng_pp_100"] = raw_push_pull(tag, 100, sz, native=False)
        out["nng_pp_4k"] = raw_push_pull(tag, 4096, sz, native=False)
        out["nng_rr_p50_us"], out["nng_rr_p99_us"] = nng_req_rep(tag, sz)
        out["cpu_one"], out["cpu_two"] = cpu_scaling(sz)
        out["cpu_scaling"] = out["cpu_two"] / out["cpu_one"]
    except Exception as e:  # noqa: BLE001
        errors.append(f"raw transports: {type(e).__name__}: {e}")
        traceback.print_exc()
    return out


# --- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str                       # format of the values
    goal: str = ""                 # text shown in the goal column
    check: Optional[Callable[[Optional[float], Optional[float], Optional[float]], bool]] = None
    ratio: bool = True             # False where a ratio means nothing (official ~0)
    ceiling: str = ""              # the raw row (RAW_ROWS key) that bounds this path on this box


def _ratio_at_least(x: float):
    return lambda pool, off, ratio: ratio is not None and ratio >= x


def _ratio_at_most(x: float):
    return lambda pool, off, ratio: ratio is not None and ratio <= x


def rows(sz: Sizes) -> List[Row]:
    out = [
        Row("source_small", "1. source items/s, small items", "{:,.0f}", "ratio >= 1.5", _ratio_at_least(1.5),
            ceiling="sp_pp_100"),
        Row("source_4k", "1. source items/s, 4 KiB items", "{:,.0f}", "ratio >= 1.5", _ratio_at_least(1.5),
            ceiling="sp_pp_4k"),
        Row("source_small_cpu_us", "1. plugin CPU us per small source item (b)", "{:,.1f}"),
        Row("source_4k_cpu_us", "1. plugin CPU us per 4 KiB source item (b)", "{:,.1f}"),
        Row("source_small_pynng", "1. source items/s, small items (pynng host)", "{:,.0f}"),
        Row("sink_noack", "2. sink items/s, no requireAck", "{:,.0f}", "ratio >= 2.0", _ratio_at_least(2.0),
            ceiling="sp_pp_100"),
        Row("sink_ack", "2. sink items/s, requireAck", "{:,.0f}", "ratio >= 1.0", _ratio_at_least(1.0)),
        Row("sink_noack_cpu_us", "2. plugin CPU us per sink item, no requireAck (b)", "{:,.1f}"),
        Row("sink_ack_cpu_us", "2. plugin CPU us per sink item, requireAck (b)", "{:,.1f}"),
        Row("sink_noack_pynng", "2. sink items/s, no requireAck (pynng host)", "{:,.0f}"),
        Row("func_calls", "3. function Exec calls/s (trivial)", "{:,.0f}"),
        Row("func_p50_us", "3. function Exec p50 latency, us", "{:,.0f}", "ratio <= 0.9", _ratio_at_most(0.9),
            ceiling="sp_rr_p50_us"),
        Row("func_p99_us", "3. function Exec p99 latency, us", "{:,.0f}", "ratio <= 1.0", _ratio_at_most(1.0),
            ceiling="sp_rr_p99_us"),
        Row("func_cpu_us", "3. plugin CPU us per function call (b)", "{:,.1f}"),
        Row("burn_ms", "4. one CPU-bound call alone, ms (host view)", "{:,.1f}"),
        Row("burn_inside_ms", "4. one CPU-bound call alone, ms (inside exec)", "{:,.1f}"),
        Row("two_cpu_calls", "4. two CPU-bound symbols, calls/s total", "{:,.1f}", "ratio >= 1.8", _ratio_at_least(1.8),
            ceiling="cpu_two"),
        Row("two_cpu_inside_ms", "4. two CPU-bound symbols, ms per call inside exec", "{:,.1f}"),
        Row("two_cpu_long_calls", "4. same with 3x longer calls, calls/s total", "{:,.1f}"),
        Row("two_cpu_long_inside_ms", "4. same with 3x longer calls, ms per call inside exec", "{:,.1f}"),
        Row("source_beside_cpu", "4. source items/s beside a CPU-bound function", "{:,.0f}"),
        Row("burn_beside_source", "4. CPU-bound calls/s beside that source", "{:,.1f}"),
    ]
    for label, size in BIG:
        mib = f"{size >> 20} MiB"
        out += [
            Row(f"source_{label}", f"7. source items/s, {mib} items", "{:,.1f}", "ratio >= 1.0",
                _ratio_at_least(1.0), ceiling=f"sp_pp_{label}"),
            Row(f"sink_noack_{label}", f"7. sink items/s, {mib} items, no requireAck", "{:,.1f}", "ratio >= 1.0",
                _ratio_at_least(1.0), ceiling=f"sp_pp_{label}"),
            Row(f"sink_ack_{label}", f"7. sink items/s, {mib} items, requireAck", "{:,.1f}", "ratio >= 1.0",
                _ratio_at_least(1.0)),
            Row(f"func_{label}", f"7. function calls/s, {mib} argument", "{:,.1f}", "ratio >= 1.0",
                _ratio_at_least(1.0)),
        ]
    out += [
        Row("restart_ms", "5. worker restart, SIGKILL to serving, ms (median)", "{:,.1f}", "pool < 100 ms",
            lambda pool, off, ratio: pool is not None and pool < 100),
        Row("restart_max_ms", "5. worker restart, slowest sample, ms", "{:,.1f}"),
        Row("start_handshake_ms", "5. plugin start to control handshake, ms", "{:,.1f}", "ratio <= 1.2",
            _ratio_at_most(1.2)),
        Row("start_first_item_ms", "5. plugin start to first source item, ms", "{:,.0f}"),
    ]
    out += _startup_rows("pi_", "5. per_instance")
    for n in sz.memory_counts:
        out += [
            Row(f"start{n}_ms", f"5. start {n} idle source(s), ms until the last start is answered",
                "{:,.0f}"),
            Row(f"mem{n}_pss", f"5. memory, {n} source(s): total PSS MiB", "{:,.1f}"),
            Row(f"mem{n}_uss", f"5. memory, {n} source(s): total USS MiB", "{:,.1f}"),
            Row(f"mem{n}_rss", f"5. memory, {n} source(s): total RSS MiB", "{:,.1f}"),
            Row(f"mem{n}_per_pss", f"5. memory, {n} source(s): PSS MiB added per instance", "{:,.2f}",
                ratio=False),
            Row(f"mem{n}_worker_pss", f"5. memory, {n} source(s): PSS MiB per worker process", "{:,.2f}"),
            Row(f"mem{n}_worker_uss", f"5. memory, {n} source(s): USS MiB per worker process", "{:,.2f}"),
            Row(f"mem{n}_worker_rss", f"5. memory, {n} source(s): RSS MiB per worker process", "{:,.2f}"),
        ]
    # workers: per_symbol (a session of its own; the official SDK measured again alike)
    out += _startup_rows("ps_", "5s. per_symbol")
    for n in sz.memory_counts:
        largest = n == max(sz.memory_counts)
        out += [
            Row(f"ps_start{n}_ms", f"5s. per_symbol: start {n} idle source(s), ms until the last start "
                "is answered", "{:,.0f}"),
            Row(f"ps_mem{n}_pss", f"5s. per_symbol: memory, {n} source(s): total PSS MiB", "{:,.1f}",
                "ratio <= 2.0" if largest else "", _ratio_at_most(2.0) if largest else None),
            Row(f"ps_mem{n}_uss", f"5s. per_symbol: memory, {n} source(s): total USS MiB", "{:,.1f}"),
            Row(f"ps_mem{n}_per_pss", f"5s. per_symbol: memory, {n} source(s): PSS MiB added per instance",
                "{:,.3f}", ratio=False),
        ]
    return out


def _startup_rows(key: str, label: str) -> List[Row]:
    """A memory session's start-up rows (measure_memory), keys starting with ``key``."""
    return [Row(f"{key}start_handshake_ms", f"{label}: plugin start to control handshake, ms (memory session)",
                "{:,.1f}"),
            Row(f"{key}start_first_item_ms", f"{label}: plugin start to first source item, ms (memory session)",
                "{:,.0f}")]


RAW_ROWS = [
    ("sp_pp_100", "6. raw native SP Push->Pull msg/s, 100 B", "{:,.0f}"),
    ("sp_pp_4k", "6. raw native SP Push->Pull msg/s, 4 KiB", "{:,.0f}"),
    ("sp_pp_1m", "6. raw native SP Push->Pull msg/s, 1 MiB", "{:,.1f}"),
    ("sp_pp_8m", "6. raw native SP Push->Pull msg/s, 8 MiB", "{:,.1f}"),
    ("sp_rr_p50_us", "6. raw native SP Req->Rep round trip p50, us", "{:,.0f}"),
    ("sp_rr_p99_us", "6. raw native SP Req->Rep round trip p99, us", "{:,.0f}"),
    ("nng_pp_100", "6. raw nng Push->Pull msg/s, 100 B", "{:,.0f}"),
    ("nng_pp_4k", "6. raw nng Push->Pull msg/s, 4 KiB", "{:,.0f}"),
    ("nng_rr_p50_us", "6. raw nng Req->Rep round trip p50, us", "{:,.0f}"),
    ("nng_rr_p99_us", "6. raw nng Req->Rep round trip p99, us", "{:,.0f}"),
    ("cpu_one", "6. bare process, CPU-bound calls/s (same loop as 4)", "{:,.1f}"),
    ("cpu_two", "6. two bare processes at once, calls/s total", "{:,.1f}"),
    ("cpu_scaling", "6. two bare processes / one: CPU ceiling of 4", "{:,.2f}"),
]

NOT_APPLICABLE = {
    ("restart_ms", OFFICIAL): "n/a (a)",
    ("restart_max_ms", OFFICIAL): "n/a (a)",
}


def median_of(results: List[Dict[str, Dict[str, Any]]], runtime: str, key: str) -> Optional[float]:
    values = [r[runtime][key] for r in results if key in r.get(runtime, {})]
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else None


def build_table(results, raw_results, sz: Sizes, markdown: bool,
                only: Optional[str] = None) -> Tuple[str, List[Tuple[str, bool]]]:
    header = ["measure", "kuiper_pool", "official", "ratio pool/official", "goal", "met", "of raw ceiling"]
    raw = {key: statistics.median(vals) for key, _l, _f in RAW_ROWS
           for vals in [[r[key] for r in raw_results if key in r]] if vals}
    table: List[List[str]] = []
    goals: List[Tuple[str, bool]] = []
    for row in rows(sz):
        pool, off = median_of(results, POOL, row.key), median_of(results, OFFICIAL, row.key)
        if pool is None and off is None and (row.key != "restart_ms" or only):
            continue  # restart_ms is shown missed when the run measured it and failed
        ratio = pool / off if row.ratio and pool is not None and off else None
        cells = [row.label,
                 row.fmt.format(pool) if pool is not None else NOT_APPLICABLE.get((row.key, POOL), "-"),
                 row.fmt.format(off) if off is not None else NOT_APPLICABLE.get((row.key, OFFICIAL), "-"),
                 f"{ratio:.2f}" if ratio is not None else "-", row.goal, "", ""]
        limit = raw.get(row.ceiling)
        if pool is not None and limit:  # latency rows: the ceiling is the smaller number
            cells[6] = f"{(limit / pool if row.key.endswith('_us') else pool / limit):.0%}"
        if row.check is not None:
            met = row.check(pool, off, ratio)
            cells[5] = "yes" if met else "NO"
            goals.append((f"{row.label}: {row.goal}", met))
        table.append(cells)
    for key, label, fmt in RAW_ROWS:
        values = [r[key] for r in raw_results if key in r]
        v = statistics.median(values) if values else None
        what = "ceiling of 4" if key.startswith("cpu") else "ceiling of 1-3, 7"
        table.append([label, fmt.format(v) if v is not None else "-", "-", "", what, "", ""])
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * 3 + ["---", "---", "---:"]) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in table]
        return "\n".join(lines), goals
    widths = [max(len(r[i]) for r in table + [header]) for i in range(len(header))]
    fmt_line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(widths[i]) if i in (0, 4, 5) else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()
    lines = [fmt_line(header), "  ".join("-" * w for w in widths)] + [fmt_line(c) for c in table]
    return "\n".join(lines), goals


FOOTNOTES = """\
(b) CPU seconds (user + system, every thread) of the plugin's processes during the measured
    window, per item or call: kuiper_pool's supervisor + workers, or the official process.
(a) The official SDK runs every symbol as a thread of the one plugin process: a function
    cannot be killed alone, and SIGKILL of the process ends all sources, sinks and functions
    of the plugin until eKuiper starts it again on the next rule start (replaying only one
    of its function starts). There is no worker restart to time.

Memory: PSS (proportional set size: shared pages divided among the processes sharing
them) is the fair total for kuiper_pool's forked workers, which share the zygote's pages
copy-on-write; USS counts only private pages; RSS counts shared pages once per process and
overstates a tree's total. Totals are sums over the plugin's process tree (kuiper_pool:
supervisor + zygote + one worker per source; official: the one process). "Added per
instance" is (total(N) - total(0 sources)) / N for both runtimes."""


def environment() -> Dict[str, str]:
    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v
            return v(mod)
        except Exception:  # noqa: BLE001
            return "?"

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "kuiper_pool"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit or "?") + (" + uncommitted runtime changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    try:
        import orjson  # noqa: F401
        has_orjson = "yes"
    except ImportError:
        has_orjson = "no"
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}",
            "python": platform.python_version(), "pynng": version("pynng"), "ekuiper": version("ekuiper"),
            "orjson": has_orjson, "kuiper_pool commit": commit,
            "kuiper_pool bytecode": "byte-compiled (compileall) before the run, as pip does at install",
            "load average (1, 5, 15 min) at the end": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def write_markdown(path: str, argv: List[str], sz: Sizes, runs: int, results, raw_results,
                   errors: List[str], elapsed: float, only: Optional[str] = None) -> None:
    table, goals = build_table(results, raw_results, sz, markdown=True, only=only)
    env = environment()
    parts = ["# kuiper_pool vs the official eKuiper Python SDK: benchmark results", "",
             f"Generated by `python bench/run.py {' '.join(argv)}`".rstrip() + f" in {elapsed:.0f} s "
             f"({runs} run(s); every figure is the median over runs).", ""]
    parts += [f"- {k}: {v}" for k, v in env.items()]
    parts += ["", "## Results", "", table, "", FOOTNOTES, "", "## Goals", ""]
    parts += [f"- {'met' if ok else '**missed**'}: {text}" for text, ok in goals]
    if errors:
        parts += ["", "## Errors during the run", ""] + [f"- {e}" for e in errors]
    parts += ["", "## Method", "", __doc__.split("\n\n", 2)[2].strip(), "",
              "Per-run values (every run measures both runtimes, order alternating):", "", "```"]
    for i, r in enumerate(results):
        for rt in RUNTIMES:
            parts.append(f"run {i} {rt}: " + json.dumps({k: round(v, 2) for k, v in r.get(rt, {}).items()}))
        parts.append(f"run {i} raw: " + json.dumps({k: round(v, 1) for k, v in raw_results[i].items()}))
    parts += ["```"]
    if os.path.exists(NOTES):
        with open(NOTES) as f:
            parts += ["", f.read().strip()]
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


# --- main -----------------------------------------------------------------------------------------

def leftovers(tag: str) -> List[str]:
    found = glob.glob(f"/tmp/*{tag}*.ipc")
    base = os.path.join(tempfile.gettempdir(), f"kuiper_pool-{os.getuid()}")
    found += glob.glob(os.path.join(base, f"{tag}*"))
    return found


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=None, help="runs to take the median of (default 3, smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny counts and windows, for CI")
    ap.add_argument("--results", default=None,
                    help="markdown output (default bench/RESULTS.md; none in --smoke unless given)")
    ap.add_argument("--tag", default=None, help="name fragment of every plugin, rule and ipc path")
    ap.add_argument("--only", choices=sorted(ONLY), default=None,
                    help="measure only these rows (big: the 1 MiB and 8 MiB rows) and no raw "
                         "ceilings; no RESULTS.md unless --results is given")
    args = ap.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    sz = SMOKE if args.smoke else FULL
    runs = args.runs if args.runs is not None else (1 if args.smoke else 3)
    results_path = args.results if args.results is not None else (
        None if args.smoke or args.only else os.path.join(HERE, "RESULTS.md"))
    tag = args.tag or "kpb" + uuid.uuid4().hex[:8]
    if not tag.isalnum():
        ap.error("--tag must be letters and digits")

    # measured as installed: pip byte-compiles a package at install; without .pyc files
    # (PYTHONDONTWRITEBYTECODE here) every plugin start would compile kuiper_pool anew
    compileall.compile_dir(os.path.dirname(os.path.abspath(kuiper_pool.__file__)), quiet=1)
    errors: List[str] = []
    results: List[Dict[str, Dict[str, Any]]] = []
    raw_results: List[Dict[str, Any]] = []
    t_begin = time.monotonic()
    root = tempfile.mkdtemp(prefix=f"{tag}-")
    try:
        for run in range(runs):
            order = RUNTIMES if run % 2 == 0 else tuple(reversed(RUNTIMES))
            res: Dict[str, Dict[str, Any]] = {}
            for rt in order:
                t = time.monotonic()
                print(f"run {run + 1}/{runs}: {rt} ...", file=sys.stderr, flush=True)
                res[rt] = run_runtime(root, tag, rt, run, sz, errors, args.only)
                print(f"run {run + 1}/{runs}: {rt} done in {time.monotonic() - t:.1f}s",
                      file=sys.stderr, flush=True)
            results.append(res)
            raw_results.append({} if args.only else run_raw(tag, sz, errors))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - t_begin

    left = leftovers(tag)
    for path in left:
        try:
            os.unlink(path) if not os.path.isdir(path) else shutil.rmtree(path)
        except OSError:
            pass
    if left:
        errors.append("left behind (now removed): " + ", ".join(left))

    table, goals = build_table(results, raw_results, sz, markdown=False, only=args.only)
    print()
    print(table)
    print()
    print(FOOTNOTES)
    print()
    for text, ok in goals:
        print(f"{'met   ' if ok else 'MISSED'}  {text}")
    for e in errors:
        print(f"ERROR   {e}")
    print(f"\n{runs} run(s) in {elapsed:.0f} s")
    if results_path:
        write_markdown(results_path, raw_argv, sz, runs, results, raw_results, errors, elapsed, args.only)
        print(f"wrote {results_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    code = main()
    if HUNG:  # a thread is stuck in nng_close; pynng's atexit nng_fini would wait for it forever
        print("abandoned hung emulator sockets: " + ", ".join(HUNG), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)
    sys.exit(code)
