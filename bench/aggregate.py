"""Batching the eKuiper way: one call per row against one aggregate call per window.

eKuiper calls a scalar function once per row and serialises the calls of one symbol; an
aggregate function (``is_aggregate`` true) over a window is called once per window with each
argument as the list of the window's values (``SELECT score_batch(features) FROM s GROUP BY
CountWindow(8)``). This drives examples/mlinfer's ``score`` (per row) and ``score_batch``
(vectorised numpy, per window) through the eKuiper stand-in, under kuiper_pool and under the
official SDK, and prints rows/s for both and the speed-up::

    pip install -e '.[bench,ml-test]' && python bench/aggregate.py [--rows 4000] [--window 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLE = os.path.join(REPO, "examples", "mlinfer")
sys.path.insert(0, REPO)

from kuiper_pool.tools.emulator import Host  # noqa: E402

MAIN = '''import os
if os.environ["AGG_RUNTIME"] == "official":
    from ekuiper import PluginConfig, plugin
else:
    from kuiper_pool import PluginConfig, plugin
import mlinfer

if __name__ == "__main__":
    plugin.start(PluginConfig(os.environ["AGG_PLUGIN"], {}, {},
                              {os.environ["AGG_PREFIX"] + k: c for k, c in mlinfer.FUNCTIONS.items()}))
'''


def measure(root: str, runtime: str, rows: List[List[float]], window: int) -> Dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    name, prefix = f"agg{runtime[:2]}{tag}", f"agg{tag}_"
    d = os.path.join(root, name)
    shutil.copytree(EXAMPLE, d)
    os.remove(os.path.join(d, "mlinfer.json"))
    with open(os.path.join(d, "main.py"), "w") as f:
        f.write(MAIN)
    with open(os.path.join(d, name + ".json"), "w") as f:
        f.write('{"version": "v1.0.0", "language": "python", "executable": "main.py", "sources": [], '
                f'"sinks": [], "functions": ["{prefix}score", "{prefix}score_batch"]}}')
    env = {"AGG_RUNTIME": runtime, "AGG_PLUGIN": name, "AGG_PREFIX": prefix,
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    host = Host(d, env=env, stdout=open(os.path.join(d, "stdout.log"), "ab"), init_timeout=60.0,
                recv_timeout=60.0)
    try:
        one, batch = host.start_function(prefix + "score"), host.start_function(prefix + "score_batch")
        per_row: List[float] = []
        for fh, args in ((one, [rows[0]]), (batch, [rows[:window]])):  # warm up both workers
            fh.exec(args)
        t0 = time.perf_counter()
        for row in rows:
            per_row.append(one.exec([row])["result"])
        t1 = time.perf_counter()
        windowed: List[float] = []
        for i in range(0, len(rows), window):
            windowed += batch.exec([rows[i:i + window]])["result"]
        t2 = time.perf_counter()
        if windowed != per_row:
            raise RuntimeError(f"{runtime}: the aggregate's results differ from the per-row ones")
        return {"row": len(rows) / (t1 - t0), "window": len(rows) / (t2 - t1)}
    finally:
        host.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--window", type=int, default=8)
    args = ap.parse_args()
    rows = [[((i * 7 + j * 3) % 256) / 255.0 for j in range(16)] for i in range(args.rows)]
    root = tempfile.mkdtemp(prefix="kpagg-")
    try:
        print(f"{args.rows} rows of 16 features; CountWindow({args.window})")
        print(f"{'runtime':<12} {'rows/s, one call per row':>26} {'rows/s, one call per window':>29} {'speed-up':>9}")
        for runtime in ("kuiper_pool", "official"):
            r = measure(root, runtime, rows, args.window)
            print(f"{runtime:<12} {r['row']:>26,.0f} {r['window']:>29,.0f} {r['window'] / r['row']:>8.1f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
