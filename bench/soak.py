"""Soak: many start/stop cycles and worker crashes; the supervisor must end where it began.

    python bench/soak.py                      # 1,000 start/stop cycles, 200 crashes
    python bench/soak.py --cycles 50 --crashes 10
    python bench/soak.py --chaos --minutes 3  # random faults and garbage against one supervisor
    python bench/soak.py --chaos --smoke      # the same for ~10 s

Prints the supervisor's open fds, threads, resident memory and this plugin's ipc files
before and after, and exits 1 if any of them grew (memory: by more than --mem-slack MiB).

Chaos: for the given time, at random (the seed is printed; --seed repeats a run), start and
stop sources and sinks, crash workers (SIGKILL, os._exit, segfault), hang them (SIGSTOP, an
endless exec), and send garbage on every channel (bad commands, raw bytes on sink data
paths, bad function calls), while one healthy source, sink and function must keep flowing
(checked every second). At the end every chaos instance is stopped and the supervisor must
be alive with its fds, threads, RSS, workers and files back where they started.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from typing import Dict, List

import psutil

from kuiper_pool.paths import private_base
from kuiper_pool.runtime.status import query
from kuiper_pool.tools.emulator import Host, HostError

PLUGIN = textwrap.dedent('''
    import os, threading
    from kuiper_pool import plugin, PluginConfig, Source, Sink, Function

    class Tick(Source):
        def configure(self, datasource, conf):
            self.stopped = threading.Event()
        def open(self, ctx):
            i = 0
            while not self.stopped.is_set():
                ctx.emit({"i": i}, None)
                i += 1
                self.stopped.wait(0.01)
        def close(self, ctx):
            self.stopped.set()

    class Crash(Function):
        def validate(self, args): return ""
        def is_aggregate(self): return False
        def exec(self, args, ctx):
            if args and args[0] == "die":
                os._exit(9)
            if args and args[0] == "segv":
                import ctypes
                ctypes.string_at(0)
            if args and args[0] == "hang":
                while True:
                    pass
            return os.getpid()

    class Keep(Sink):
        def configure(self, conf): pass
        def open(self, ctx): pass
        def collect(self, ctx, data): ctx.ack_ok()
        def close(self, ctx): pass

    if __name__ == "__main__":
        plugin.start(PluginConfig(NAME, {"tick": Tick}, {"keep": Keep},
                                  {FUNC: Crash, FUNC + "ok": Crash},
                                  settings={"restart_backoff_min": 0.001, "restart_backoff_max": 0.01,
                                            "flap_max_restarts": 1000000, "call_deadline": 0.5,
                                            "heartbeat_interval": 0.1, "heartbeat_misses": 5,
                                            "stop_grace": 0.5}))
''')


def make_plugin(root: str, name: str, func: str) -> str:
    with open(os.path.join(root, f"{name}.json"), "w") as f:
        json.dump({"version": "v1", "language": "python", "executable": "main.py",
                   "sources": ["tick"], "sinks": ["keep"], "functions": [func, func + "ok"]}, f)
    with open(os.path.join(root, "main.py"), "w") as f:
        f.write(f"NAME = {name!r}\nFUNC = {func!r}\n" + PLUGIN)
    return root


def measure(pid: int, fragment: str) -> dict:
    p = psutil.Process(pid)
    live = [c for c in p.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    return {"fds": p.num_fds(), "threads": p.num_threads(),
            "rss_mib": round(p.memory_info().rss / 1048576, 1),
            "ipc_files": len(glob.glob(f"/tmp/*{fragment}*.ipc")),
            "private_files": len(glob.glob(os.path.join(private_base(), f"*{fragment}*"))),
            "workers": len(live) - 1}


def soak(cycles: int, crashes: int, out=sys.stdout) -> tuple:
    tag = "soak" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as root:
        host = Host(make_plugin(root, tag, f"{tag}f"), stdout=open(os.devnull, "w"))
        try:
            host.start()
            func = host.start_function(f"{tag}f")
            func.exec(["warm"])
            # one cycle first so lazily created objects exist in both measurements
            host.start_source("tick", f"{tag}r", op="warm").stop()
            before = measure(host.process.pid, tag)
            t0 = time.monotonic()
            for i in range(cycles):
                src = host.start_source("tick", f"{tag}r", op=f"o{i % 7}")
                src.recv()
                src.stop()
            t1 = time.monotonic()
            for _ in range(crashes):
                func.exec(["die"])           # answered with an error, worker restarted
                reply = func.exec(["alive"])
                while not reply["state"]:    # the replacement may still be starting
                    reply = func.exec(["alive"])
            t2 = time.monotonic()
            after = measure(host.process.pid, tag)
        finally:
            host.close()
    print(f"{cycles} start/stop cycles in {t1 - t0:.1f}s, {crashes} crashes in {t2 - t1:.1f}s",
          file=out)
    for key in before:
        print(f"  {key:10} before {before[key]:>8}  after {after[key]:>8}", file=out)
    return before, after


class Chaos:
    """One supervisor, a healthy source/sink/function that must keep flowing, and random
    faults and garbage around them."""

    def __init__(self, host: Host, tag: str, rng: random.Random) -> None:
        self.host, self.tag, self.rng = host, tag, rng
        self.counts: Dict[str, int] = {}
        self.sources: List = []
        self.sinks: List = []
        self.next = 0
        self.crash = host.start_function(f"{tag}f")
        self.failures: List[str] = []

    def start_healthy(self) -> None:
        self.src = self.host.start_source("tick", f"{self.tag}h", op="src")
        self.snk = self.host.start_sink("keep", f"{self.tag}h", op="snk", require_ack=True)
        self.fn = self.host.start_function(f"{self.tag}fok")

    def check_healthy(self) -> None:
        try:
            self.src.recv(timeout=5)
            if self.snk.collect(b'{"ok": 1}', timeout=5) != {}:
                raise RuntimeError("the healthy sink's ack was an error")
            if self.fn.exec(["alive"])["state"] is not True:
                raise RuntimeError("the healthy function failed")
        except Exception as e:  # noqa: BLE001 - every failure is reported at the end
            self.failures.append(f"{type(e).__name__}: {e}")

    def act(self) -> None:
        action = self.rng.choice(ACTIONS)
        self.counts[action] = self.counts.get(action, 0) + 1
        try:
            getattr(self, action)()
        except HostError:  # a refused start or a dropped garbage connection is fine
            pass

    def chaos_pids(self) -> List[int]:
        rows = query(self.tag)["instances"]
        return [r["pid"] for r in rows if r["pid"] and r["rule"].startswith(f"{self.tag}c")]

    def start_source(self) -> None:
        self.next += 1
        self.sources.append(self.host.start_source("tick", f"{self.tag}c{self.next}", op="s"))

    def start_sink(self) -> None:
        self.next += 1
        self.sinks.append(self.host.start_sink("keep", f"{self.tag}c{self.next}", op="k"))

    def stop_one(self) -> None:
        pool = self.sources + self.sinks
        if pool:
            handle = self.rng.choice(pool)
            (self.sources if handle in self.sources else self.sinks).remove(handle)
            handle.stop()

    def kill_worker(self) -> None:
        pids = self.chaos_pids()
        if pids:
            try:
                os.kill(self.rng.choice(pids), self.rng.choice([signal.SIGKILL, signal.SIGSTOP]))
            except ProcessLookupError:  # it ended between the status answer and now
                pass

    def crash_call(self) -> None:
        self.crash.exec([self.rng.choice(["die", "segv", "hang", "ok"])])

    def bad_call(self) -> None:
        self.crash.request(self.rng.choice([b"", b"\xff\xfe", b"[" * 3000, b'{"func": 3}',
                                            os.urandom(self.rng.randint(1, 300))]))

    def bad_command(self) -> None:
        self.host.send_raw(self.rng.choice([b"", b"not json", b'{"cmd": "start", "arg": 7}',
                                            os.urandom(self.rng.randint(1, 200))]))

    def garbage_on_sink(self) -> None:
        if not self.sinks:
            return
        ctrl = self.rng.choice(self.sinks).ctrl["meta"]
        path = f"/tmp/{ctrl['ruleId']}_{ctrl['opId']}_{ctrl['instanceId']}.ipc"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            try:
                s.connect(path)
                s.sendall(os.urandom(self.rng.randint(1, 4096)))
            except OSError:
                pass

    def stop_all(self) -> None:
        for handle in self.sources + self.sinks:
            handle.stop()
        self.sources, self.sinks = [], []


ACTIONS = ["start_source", "start_sink", "stop_one", "stop_one", "kill_worker", "crash_call",
           "bad_call", "bad_command", "garbage_on_sink"]


def chaos(seconds: float, seed: int, out=sys.stdout) -> tuple:
    tag = "chaos" + uuid.uuid4().hex[:8]
    rng = random.Random(seed)
    print(f"chaos: seed {seed}, {seconds:g}s", file=out)
    with tempfile.TemporaryDirectory() as root:
        host = Host(make_plugin(root, tag, f"{tag}f"), stdout=open(os.devnull, "w"))
        try:
            host.start()
            ch = Chaos(host, tag, rng)
            ch.start_healthy()
            ch.crash.exec(["ok"])
            host.start_source("tick", f"{tag}w", op="warm").stop()  # lazily made objects exist
            ch.check_healthy()
            time.sleep(0.5)  # noqa: the baseline is taken once the warm-up worker is gone
            before = measure(host.process.pid, tag)
            end = time.monotonic() + seconds
            next_check = 0.0
            while time.monotonic() < end:
                ch.act()
                if time.monotonic() >= next_check:
                    ch.check_healthy()
                    next_check = time.monotonic() + 1.0
            ch.stop_all()
            for pid in ch.chaos_pids():  # SIGSTOPped ones were killed; make sure none waits
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            ch.check_healthy()
            deadline = time.monotonic() + 15
            after = measure(host.process.pid, tag)
            while time.monotonic() < deadline and after != before and any(
                    after[k] > before[k] for k in ("fds", "threads", "workers", "ipc_files")):
                time.sleep(0.2)  # noqa: workers killed last are still being reaped
                after = measure(host.process.pid, tag)
            alive = host.alive()
        finally:
            host.close()
    print("  actions: " + ", ".join(f"{k} {v}" for k, v in sorted(ch.counts.items())), file=out)
    print(f"  healthy instance checks failed: {len(ch.failures)}"
          + (f" (first: {ch.failures[0]})" if ch.failures else ""), file=out)
    print(f"  supervisor alive at the end: {alive}", file=out)
    for key in before:
        print(f"  {key:14} before {before[key]:>8}  after {after[key]:>8}", file=out)
    return before, after, alive and not ch.failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--crashes", type=int, default=200)
    ap.add_argument("--mem-slack", type=float, default=5.0, help="MiB of growth tolerated")
    ap.add_argument("--chaos", action="store_true", help="random faults and garbage instead")
    ap.add_argument("--minutes", type=float, default=3.0, help="how long chaos runs")
    ap.add_argument("--seed", type=int, default=None, help="repeat a chaos run")
    ap.add_argument("--smoke", action="store_true", help="a short run (chaos: 10 s)")
    args = ap.parse_args()
    if args.chaos:
        seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        before, after, ok = chaos(10.0 if args.smoke else args.minutes * 60, seed)
        slack = max(args.mem_slack, 10.0)
    else:
        before, after = soak(args.cycles, args.crashes)
        ok, slack = True, args.mem_slack
    grew = [k for k in ("fds", "threads", "ipc_files", "private_files", "workers") if after[k] > before[k]]
    if after["rss_mib"] - before["rss_mib"] > slack:
        grew.append("rss_mib")
    print("LEAK: " + ", ".join(grew) if grew else "no growth")
    print("PASS" if ok and not grew else "FAIL")
    return 0 if ok and not grew else 1


if __name__ == "__main__":
    sys.exit(main())
