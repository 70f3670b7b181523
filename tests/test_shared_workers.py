"""``workers: per_symbol``: every instance of a source or sink symbol in one shared worker
process (runtime/host.py, runtime/shared.py), under real faults through the eKuiper
stand-in: a crash or hang of the shared worker restarts only it and every instance in it,
each serving again; other symbols are untouched; recycling, reload and acks across a
restart behave as they do for a worker of one instance."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil

from conftest import wait_until
from test_supervision import make_rig  # noqa: F401 - the fixture

SHARED = {"workers": "per_symbol"}


def test_instances_of_a_symbol_share_one_worker_and_status_says_so(make_rig, unique):
    rig = make_rig(**SHARED)
    rules = [f"r{i}_{unique}" for i in range(3)]
    srcs = [rig.host.start_source("src", rule, config={"interval": 0.01}) for rule in rules]
    pids = {src.recv()["message"]["pid"] for src in srcs}
    assert len(pids) == 1
    [pid] = pids
    rows = [rig.wait_row("running", rule=rule, state="running") for rule in rules]
    assert {r["pid"] for r in rows} == {pid} and all(r["shared"] for r in rows)
    assert psutil.Process(pid).num_threads() >= 1 + 2 * len(rules)


def _shared_pid(rig, rules):
    rows = [rig.wait_row("running", rule=rule, state="running") for rule in rules]
    assert len({r["pid"] for r in rows}) == 1 and all(r["shared"] for r in rows), rows
    return rows[0]["pid"]


def _serving(rig, srcs, rules, pid, restarts):
    """Every source serves again from one new shared worker (not ``pid``), each restarted
    ``restarts`` times; its first item is counted from 1 (the same config, a new instance)."""
    rows = [rig.wait_row("restarted", rule=rule, state="running", restarts=restarts) for rule in rules]
    new = rows[0]["pid"]
    assert new != pid and {r["pid"] for r in rows} == {new} and all(r["shared"] for r in rows)
    for src in srcs:
        while True:
            item = src.recv(timeout=5)["message"]
            if item["pid"] == new:
                break
    return rows


def test_a_sigkill_of_the_shared_worker_restarts_all_its_instances_and_nothing_else(make_rig, unique):
    rig = make_rig(**SHARED)
    rules = [f"r{i}_{unique}" for i in range(3)]
    srcs = [rig.host.start_source("src", rule, config={"interval": 0.01}) for rule in rules]
    other = rig.host.start_sink("snk", f"s_{unique}")
    for src in srcs:
        src.recv()
    pid = _shared_pid(rig, rules)
    sink_pid = rig.wait_row("sink running", rule=f"s_{unique}", state="running")["pid"]
    os.kill(pid, signal.SIGKILL)
    rows = _serving(rig, srcs, rules, pid, 1)
    assert all(r["restart_causes"] == {"signal": 1} for r in rows)
    assert all(f"worker pid {pid} signal 9 (SIGKILL)" in r["last_error"] for r in rows), rows
    sink = rig.row(rule=f"s_{unique}")
    assert (sink["pid"], sink["restarts"]) == (sink_pid, 0)
    other.collect(json.dumps({"i": 1}).encode())
    assert rig.plugin.events("collect", rule=f"s_{unique}")[0]["pid"] == sink_pid


def test_a_stopped_shared_worker_is_found_hung_killed_and_restarted(make_rig, unique):
    rig = make_rig(**SHARED, heartbeat_interval=0.1, heartbeat_misses=3, stop_grace=30.0)
    rules = [f"r{i}_{unique}" for i in range(2)]
    srcs = [rig.host.start_source("src", rule, config={"interval": 0.01}) for rule in rules]
    for src in srcs:
        src.recv()
    pid = _shared_pid(rig, rules)
    os.kill(pid, signal.SIGSTOP)
    try:
        rows = _serving(rig, srcs, rules, pid, 1)
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    assert all(r["restart_causes"] == {"hang": 1} for r in rows), rows
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
