#!/usr/bin/env python3
"""A reload under load: nothing lost, nothing failed, and how long the rule waited.

    python bench/reload.py                 # 5 s of load, a reload, 5 s more (~15 s)
    python bench/reload.py --seconds 20 --reloads 3

One plugin (written to a temporary folder) runs under the eKuiper stand-in (native SP data
sockets, as eKuiper's mangos) with a rule at full rate: one thread pushes items to a sink with
``requireAck`` as fast as the socket takes them, one reads the acks, one calls a function back
to back. Midway the plugin's code is changed on disk and ``kuiper-pool reload`` is run. At the
end every item must have been collected and acked and every call answered; the script prints
the counts, the reload's wall time and the longest wait for an ack and for a call reply
during the reload, and exits 1 if anything was lost or failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from typing import Dict, List

from kuiper_pool.tools.emulator import Host

MAIN = textwrap.dedent('''
    import os
    from kuiper_pool import Function, PluginConfig, Sink, plugin
    import version

    class Record(Sink):
        """Appends each item and the worker's pid to items.log, then acks it."""

        def configure(self, conf):
            self.fd = os.open(conf["file"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        def open(self, ctx):
            pass

        def collect(self, ctx, data):
            os.write(self.fd, data + b" %d\\n" % os.getpid())
            ctx.ack_ok()

        def close(self, ctx):
            os.close(self.fd)

    class Echo(Function):
        def validate(self, args):
            return ""

        def exec(self, args, ctx):
            return [version.VERSION, args[0]]

        def is_aggregate(self):
            return False

    if __name__ == "__main__":
        plugin.start(PluginConfig(os.environ["BENCH_PLUGIN"], {}, {"record": lambda: Record()},
                                  {os.environ["BENCH_FN"]: lambda: Echo()}))
''')


def run(seconds: float, reloads: int) -> int:
    tag = uuid.uuid4().hex[:8]
    name, fn = f"reload{tag}", f"echo{tag}"
    folder = tempfile.mkdtemp(prefix="kp-reload-")
    pdir = os.path.join(folder, name)
    os.makedirs(pdir)
    with open(os.path.join(pdir, "main.py"), "w") as f:
        f.write(MAIN)
    with open(os.path.join(pdir, "version.py"), "w") as f:
        f.write('VERSION = "v0"\n')
    with open(os.path.join(pdir, name + ".json"), "w") as f:
        json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                   "sources": [], "sinks": ["record"], "functions": [fn]}, f)
    items = os.path.join(pdir, "items.log")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"BENCH_PLUGIN": name, "BENCH_FN": fn,
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    log = open(os.path.join(pdir, "stdout.log"), "wb")
    host = Host(pdir, env=env, stdout=log, data_transport="sp")
    counts: Dict[str, int] = dict(sent=0, acked=0, ack_errors=0, calls=0, answered=0, failed=0)
    ack_times: List[float] = []
    call_times: List[float] = []
    stop = threading.Event()
    try:
        host.start()
        sink = host.start_sink("record", f"rule{tag}", config={"file": items}, require_ack=True)
        func = host.start_function(fn)

        def feed() -> None:
            while not stop.is_set():
                sink.send(b"%d" % counts["sent"])
                counts["sent"] += 1

        def acks() -> None:
            while not stop.is_set() or counts["acked"] + counts["ack_errors"] < counts["sent"]:
                ack = sink.recv_ack(timeout=30)
                counts["acked" if ack == {} else "ack_errors"] += 1
                ack_times.append(time.monotonic())

        def calls() -> None:
            while not stop.is_set():
                counts["calls"] += 1
                reply = func.exec([counts["calls"]])
                ok = reply.get("state") is True and reply["result"][1] == counts["calls"]
                counts["answered" if ok else "failed"] += 1
                call_times.append(time.monotonic())

        threads = [threading.Thread(target=t, daemon=True) for t in (feed, acks, calls)]
        for t in threads:
            t.start()
        windows = []
        for i in range(1, reloads + 1):
            time.sleep(seconds / 2)
            with open(os.path.join(pdir, "version.py"), "w") as f:
                f.write(f'VERSION = "v{i}"\n')
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "kuiper_pool.tools.cli", "reload", name],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **env}, timeout=120)
            windows.append((t0, time.monotonic()))
            print(proc.stdout.strip())
            if proc.returncode:
                return 1
            time.sleep(seconds / 2)
        stop.set()
        for t in threads:
            t.join(60)
        version = func.exec([0])["result"][0]
    finally:
        stop.set()
        host.close()
        log.close()
    with open(items, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    collected = [int(line.split()[0]) for line in lines]
    pids = {line.split()[1] for line in lines}

    def longest_wait(times: List[float], t0: float, t1: float) -> float:
        inside = [t for t in times if t0 <= t <= t1]
        before = [t for t in times if t < t0][-1:]
        marks = before + inside + [t for t in times if t > t1][:1]
        return max((b - a for a, b in zip(marks, marks[1:])), default=0.0)

    print(f"items sent {counts['sent']}, collected {len(set(collected))} "
          f"(collected twice: {len(collected) - len(set(collected))}), acked {counts['acked']}, "
          f"error acks {counts['ack_errors']}; sink workers {len(pids)}")
    print(f"calls made {counts['calls']}, answered {counts['answered']}, failed {counts['failed']}; "
          f"the function serves {version} after {reloads} reload(s)")
    for t0, t1 in windows:
        print(f"reload: {t1 - t0:.2f} s (command to outcome); during it the longest wait for an "
              f"ack was {longest_wait(ack_times, t0, t1) * 1000:.0f} ms, for a call reply "
              f"{longest_wait(call_times, t0, t1) * 1000:.0f} ms")
    lost = (set(range(counts["sent"])) - set(collected) or counts["acked"] != counts["sent"]
            or counts["answered"] != counts["calls"] or version != f"v{reloads}")
    if not lost:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"LOST OR FAILED: see {pdir}")
    return 1 if lost else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="load around each reload")
    p.add_argument("--reloads", type=int, default=1)
    args = p.parse_args()
    return run(args.seconds, args.reloads)


if __name__ == "__main__":
    sys.exit(main())
