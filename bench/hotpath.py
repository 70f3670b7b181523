#!/usr/bin/env python3
"""The hot paths under eKuiper's runtime stand-in: kuiper_pool against the official SDK.

    python bench/hotpath.py --host /path/to/ekhostc                 # 3 alternating runs
    python bench/hotpath.py --host /path/to/ekhostc --runs 5 --baseline /other/checkout/kuiper_pool

``--host`` (or ``$EKHOSTC``) is the C stand-in for eKuiper's portable-plugin runtime
(``ekhostc``, docs/startup-bench.md). Its ``bench`` mode starts the plugin as eKuiper does and
measures, as eKuiper's runtime drives them: source items/s (3 s after the first item), sink
items/s without and with ``requireAck`` (20,000 and 5,000 Collects, one at a time), and the
p50/p99 latency of 3,000 function ``Exec`` calls, each from the request's encoding to the
reply's decoding in the host. After each phase it prints its own CPU and the plugin tree's.

Variants, in an order that rotates between runs, each in fresh processes:

* ``official``: the official SDK under plain ``python``;
* ``zero-edit``: the same script (bench/plugin/main.py with the official imports) under
  ``kuiper-pool-python``, kuiper_pool installed as pip leaves it (``startup.install_copy``);
* ``baseline`` (with ``--baseline DIR``): the same, with the ``kuiper_pool`` package folder
  DIR (another checkout's) installed instead: a change measured against its parent in the
  same run, which a shared machine's drifting load does not allow across runs;
* ``floor-py`` and ``floor-c`` (with ``--floor``): no runtime at all, the floor of each path
  on this host: bench/floor/plugin.py answers eKuiper with bare SP framing in Python, or hands
  its connections to bench/floor/peer.c (built here with ``cc``), a peer that costs next to
  nothing. No plugin, however fast, gets past ``floor-c``.

The table gives each variant's median (min-max) and the ratio of the medians to the
official SDK's, with the range of the per-run ratios (both runtimes of one run saw the same
load). bench/NOTES.md says what bounds the round trips on this host.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Tuple

from startup import HERE, PLUGIN_MAIN, BenchError, Launch, install_copy, publish

FIGURE = re.compile(r"^(\w+) (\d+(?:\.\d+)?)$", re.M)
# (ekhostc's name, label, higher is better)
MEASURES: Tuple[Tuple[str, str, bool], ...] = (
    ("source_items_per_s", "source items/s", True),
    ("sink_items_per_s", "sink items/s, no ack", True),
    ("sink_acked_items_per_s", "sink items/s, requireAck", True),
    ("func_p50_us", "function p50 us", False),
    ("func_p99_us", "function p99 us", False),
    ("host_cpu_sink_acked_pct", "host CPU %, requireAck phase", False),
    ("plugin_cpu_sink_acked_pct", "plugin CPU %, requireAck phase", False),
    ("host_cpu_func_pct", "host CPU %, function phase", False),
    ("plugin_cpu_func_pct", "plugin CPU %, function phase", False),
)
RUN_TIMEOUT = 600.0
FLOOR = os.path.join(HERE, "floor")


def build_floor_peer(root: str) -> str:
    """bench/floor/peer.c compiled into ``root``."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("--floor needs a C compiler (cc) for bench/floor/peer.c")
    out = os.path.join(root, "floor-peer")
    subprocess.run([cc, "-O2", "-o", out, os.path.join(FLOOR, "peer.c")], check=True)
    return out


def bench_once(host: str, root: str, name: str, variant: str, python: str, script: str,
               floor_peer: str = "") -> Dict[str, float]:
    """One ``ekhostc bench`` of one variant; its figures by ekhostc's names."""
    floor = variant.startswith("floor")
    launch = Launch(host, root, name, "official" if variant == "official" or floor else "zero-edit", python,
                    script, ["bench"], ("--source", "flood", "--sink", "count", "--func", name + "noop"),
                    main=os.path.join(FLOOR, "plugin.py") if floor else PLUGIN_MAIN,
                    extra_env={"FLOOR_PEER": floor_peer} if variant == "floor-c" else None)
    try:
        out, _ = launch.proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name}: ekhostc bench did not end within {RUN_TIMEOUT:g}s; log {launch.log}") from None
    finally:
        launch.close()
    got = {k: float(v) for k, v in FIGURE.findall(out)}
    missing = [k for k, _label, _up in MEASURES if k not in got]
    if missing:
        raise BenchError(f"{name} ({variant}): no {', '.join(missing)} in ekhostc's output "
                         f"{out.strip().splitlines()[-5:]}; log {launch.log}")
    return got


def summary(values: List[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def table(results: Dict[str, List[Dict[str, float]]], variants: List[str]) -> str:
    head = ["measure", "official SDK"]
    for v in variants[1:]:
        head += [v, "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, label, _up in MEASURES:
        off = [r[key] for r in results["official"]]
        cells = [label, summary(off)]
        for v in variants[1:]:
            mine = [r[key] for r in results[v]]
            paired = [m / o for m, o in zip(mine, off) if o]
            ratio = statistics.median(mine) / statistics.median(off) if statistics.median(off) else float("nan")
            cells += [summary(mine), f"{ratio:.2f} (runs {min(paired):.2f}-{max(paired):.2f})" if paired else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=os.environ.get("EKHOSTC"), help="the ekhostc binary (default $EKHOSTC)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs (default 3)")
    ap.add_argument("--baseline", default=None, help="another checkout's kuiper_pool package folder, measured too")
    ap.add_argument("--floor", action="store_true", help="also measure the floors (floor-py, floor-c)")
    ap.add_argument("--results", default=None, help="also write the table and the per-run values here")
    args = ap.parse_args(argv)
    if not args.host or not os.access(args.host, os.X_OK):
        ap.error("--host: the ekhostc binary of eKuiper's runtime stand-in is needed")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "__init__.py")):
        ap.error("--baseline: a kuiper_pool package folder (with __init__.py) is needed")
    host = os.path.abspath(args.host)
    tag = "kph" + uuid.uuid4().hex[:6]
    root = tempfile.mkdtemp(prefix=tag + "-")
    variants = (["official", "zero-edit"] + (["baseline"] if args.baseline else [])
                + (["floor-py", "floor-c"] if args.floor else []))
    results: Dict[str, List[Dict[str, float]]] = {v: [] for v in variants}
    load_before = os.getloadavg()
    t_begin = time.monotonic()
    try:
        python, script = install_copy(root)
        interpreters = {v: (python, script) for v in variants}
        if args.baseline:
            interpreters["baseline"] = install_copy(root, os.path.abspath(args.baseline), "baseline-venv")
        floor_peer = build_floor_peer(root) if args.floor else ""
        for run in range(args.runs):
            order = variants[run % len(variants):] + variants[:run % len(variants)]
            for variant in order:
                name = f"{tag}{variants.index(variant)}r{run}"
                results[variant].append(bench_once(host, root, name, variant, *interpreters[variant], floor_peer))
            print(f"run {run + 1}/{args.runs}: " + "; ".join(
                f"{v} acked {results[v][-1]['sink_acked_items_per_s']:.0f}/s p50 {results[v][-1]['func_p50_us']:.0f} us"
                for v in variants), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = [f"The hot paths under eKuiper's runtime stand-in (`ekhostc bench`), {args.runs} alternating "
           f"runs in {time.monotonic() - t_begin:.0f} s; median (min-max), ratio of the medians to the "
           f"official SDK's (and the range of the per-run ratios). Load average before: "
           + " ".join(f"{x:.2f}" for x in load_before) + "; after: "
           + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ".", "", table(results, variants), "",
           "Per-run values:", "", "```"]
    out += [f"{v} {k}: " + " ".join(f"{r[k]:.0f}" for r in results[v]) for v in variants for k, _l, _u in MEASURES]
    out += ["```"]
    publish(out, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
