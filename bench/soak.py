"""Soak: many start/stop cycles and worker crashes; the supervisor must end where it began.

    python bench/soak.py                 # 1,000 start/stop cycles, 200 crashes
    python bench/soak.py --cycles 50 --crashes 10

Prints the supervisor's open fds, threads, resident memory and this plugin's ipc files
before and after, and exits 1 if any of them grew (memory: by more than --mem-slack MiB).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import textwrap
import time
import uuid

import psutil

from kuiper_pool.tools.emulator import Host

PLUGIN = textwrap.dedent('''
    import os, threading
    from kuiper_pool import plugin, PluginConfig, Source, Function

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
            return os.getpid()

    if __name__ == "__main__":
        plugin.start(PluginConfig(NAME, {"tick": Tick}, {}, {FUNC: Crash},
                                  settings={"restart_backoff_min": 0.001, "restart_backoff_max": 0.01,
                                            "flap_max_restarts": 1000000}))
''')


def make_plugin(root: str, name: str, func: str) -> str:
    with open(os.path.join(root, f"{name}.json"), "w") as f:
        json.dump({"version": "v1", "language": "python", "executable": "main.py",
                   "sources": ["tick"], "sinks": [], "functions": [func]}, f)
    with open(os.path.join(root, "main.py"), "w") as f:
        f.write(f"NAME = {name!r}\nFUNC = {func!r}\n" + PLUGIN)
    return root


def measure(pid: int, fragment: str) -> dict:
    p = psutil.Process(pid)
    return {"fds": p.num_fds(), "threads": p.num_threads(),
            "rss_mib": round(p.memory_info().rss / 1048576, 1),
            "ipc_files": len(glob.glob(f"/tmp/*{fragment}*.ipc")),
            "workers": len(p.children(recursive=True)) - 1}


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--crashes", type=int, default=200)
    ap.add_argument("--mem-slack", type=float, default=5.0, help="MiB of growth tolerated")
    args = ap.parse_args()
    before, after = soak(args.cycles, args.crashes)
    grew = [k for k in ("fds", "threads", "ipc_files", "workers") if after[k] > before[k]]
    if after["rss_mib"] - before["rss_mib"] > args.mem_slack:
        grew.append("rss_mib")
    print("LEAK: " + ", ".join(grew) if grew else "no growth")
    return 1 if grew else 0


if __name__ == "__main__":
    sys.exit(main())
