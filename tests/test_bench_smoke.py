"""``python bench/run.py --smoke`` keeps working: both runtimes measured, a table with both
columns and their ratios, nothing left behind. No timing assertions: the numbers of a smoke
run mean nothing; the point is that the benchmark cannot rot unnoticed."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import psutil
import pytest

from conftest import kill_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "bench", "run.py")
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")

# rows that must carry a number for both runtimes and a ratio
COMPARED = [
    "1. source items/s, small items",
    "1. source items/s, 4 KiB items",
    "2. sink items/s, no requireAck",
    "2. sink items/s, requireAck",
    "3. function Exec calls/s (trivial)",
    "3. function Exec p50 latency, us",
    "4. two CPU-bound symbols, calls/s total",
    "4. source items/s beside a CPU-bound function",
    "5. plugin start to control handshake, ms",
    "5. plugin start to first source item, ms",
    "1. source items/s, small items (pynng host)",
    "2. sink items/s, no requireAck (pynng host)",
    "5. memory, 1 source(s): total PSS MiB",
    "7. source items/s, 1 MiB items",
    "7. sink items/s, 8 MiB items, no requireAck",
    "7. sink items/s, 8 MiB items, requireAck",
    "7. function calls/s, 8 MiB argument",
]


def table_rows(stdout: str) -> dict:
    """The printed table as {label: [kuiper_pool, official, ratio, goal, met]}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("measure"))
    header = re.split(r"\s{2,}", lines[start].strip())
    assert header[:4] == ["measure", "kuiper_pool", "official", "ratio pool/official"], header
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_smoke_run_prints_both_runtimes_with_ratios_and_cleans_up(tmp_path, unique, ipc_leak_check):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.Popen([sys.executable, RUN, "--smoke", "--tag", unique, "--results", str(results)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # the benchmark and every plugin tree under it
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench/run.py --smoke took over 100 s\nstdout:\n{stdout[-4000:]}\n"
                    f"stderr:\n{stderr[-4000:]}")
    tail = f"\nstdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
    assert proc.returncode == 0, tail

    rows = table_rows(stdout)
    for label in COMPARED:
        assert label in rows, f"row {label!r} missing" + tail
        pool, official, ratio = rows[label][:3]
        for value in (pool, official, ratio):
            assert NUMBER.match(value), f"{label}: {rows[label]}" + tail
        assert float(pool.replace(",", "")) > 0 and float(official.replace(",", "")) > 0, label
    restart = rows["5. worker restart, SIGKILL to serving, ms (median)"]
    assert NUMBER.match(restart[0]) and restart[1].startswith("n/a"), restart
    for label in ("6. raw native SP Push->Pull msg/s, 100 B", "6. raw native SP Req->Rep round trip p50, us",
                  "6. raw nng Push->Pull msg/s, 100 B", "6. raw nng Req->Rep round trip p50, us",
                  "6. two bare processes / one: CPU ceiling of 4"):
        assert NUMBER.match(rows[label][0]), f"{label}: {rows[label]}" + tail
    assert "met" in stdout and "ratio >= 1.0" in stdout  # the goal verdicts

    text = results.read_text()
    assert "| measure | kuiper_pool | official | ratio pool/official | goal | met |" in text
    assert "## Goals" in text and "3. function Exec p50 latency" in text

    # every process the run started is gone (plugin trees run from a folder named with the tag)
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        info = p.info
        if unique in " ".join(info.get("cmdline") or []) or unique in (info.get("cwd") or ""):
            left.append((info["pid"], info.get("cmdline")))
    assert not left, f"processes left behind: {left}"


def test_the_chaos_soak_passes_a_short_run():
    """``bench/soak.py --chaos --smoke``: ten seconds of random starts, stops, crashes, hangs,
    garbage on every channel, reloads, SIGHUPs to the supervisor and to every process of the
    plugin, and sources started from damaged state files against one supervisor; it must end
    alive, with its healthy instances flowing, every reload and state file as it must be, the
    last reload's code served and nothing grown (the script's own PASS/FAIL verdict)."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "soak.py"), "--chaos", "--smoke"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0 and out.rstrip().endswith("PASS"), out[-3000:]
    assert "healthy instance checks failed: 0" in out and "supervisor alive at the end: True" in out
    assert "reload and state checks failed: 0" in out and re.search(r"reloads: reloaded [1-9]", out), out[-3000:]


def test_the_serve_bench_smoke_run_prints_every_figure_and_cleans_up(unique):
    """``bench/serve.py --smoke``: serve, the portable path (both runtimes) and, with the bench
    extra, the hand-written service, each measured; nothing left behind."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "serve.py"), "--smoke", "--tag", unique],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, out[-4000:]
    rows = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", out, re.M))
    for label in ("calls/s, burna (~20 ms) x 4 callers: serve, 2 workers",
                  "ratio serve / portable kuiper_pool", "ratio serve / portable official SDK",
                  "per-call overhead of serve over a bare call, p50",
                  "p50 of a keep-alive round trip to a trivial HTTP server (the floor)"):
        assert re.match(r"^-?[\d.]+( us|x)?$", rows[label]), (label, rows.get(label), out[-3000:])
    assert re.match(r"^\d+ of 4$", rows["calls failed when the busiest worker is SIGKILLed with 4 calls in flight: serve"])
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline", "cwd"])
            if unique in " ".join(p.info.get("cmdline") or []) or unique in (p.info.get("cwd") or "")]
    assert not left, f"processes left behind: {left}"
