"""``workers: per_symbol``: every instance of a source or sink symbol in one shared worker
process (runtime/host.py, runtime/shared.py), under real faults through the eKuiper
stand-in: a crash or hang of the shared worker restarts only it and every instance in it,
each serving again; other symbols are untouched; recycling, reload and acks across a
restart behave as they do for a worker of one instance."""
from __future__ import annotations

import json
import os
import re
import signal
import threading

import psutil
import pytest

from conftest import kuiper_pool_cli, wait_until
from kuiper_pool.runtime import status
from kuiper_pool.tools.emulator import HostError
from metrics_text import free_port, scrape
from plugins import RECORDING_SINK, make_plugin, read_jsonl
from test_hostile_plugins import FORKING_SINK, _forked_lines
from test_reload import VERSION_SOURCE
from test_state import FAST as STATE_FAST
from test_state import STATE_SOURCE
from test_status_cli import documented_shared_worker_keys
from test_supervision import SLOW_BEATS, make_rig  # noqa: F401 - the fixture

# slow beats where a test is not about hangs: a loaded machine must not make one of them
SHARED = {"workers": "per_symbol", **SLOW_BEATS}


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
    table = kuiper_pool_cli("status", rig.plugin.name).stdout
    assert sum(f"{pid}*" in line for line in table.splitlines()) == len(rules), table
    assert "(PID*: one worker process shared by its symbol's instances" in table


def test_a_shared_workers_memory_and_cpu_are_counted_once_in_the_metrics_and_status(make_rig, unique):
    """Three sources in one shared worker: its memory and CPU are one series of its own, so a
    sum over the plugin's series is the process's (not three times it); status lists the
    process once and its table shows no per-instance RSS for the shared instances."""
    port = free_port()
    rig = make_rig(**SHARED, metrics_address=f"127.0.0.1:{port}")
    rules = [f"r{i}_{unique}" for i in range(3)]
    srcs = [rig.host.start_source("src", rule, config={"interval": 0.01}) for rule in rules]
    for src in srcs:
        src.recv()
    pid = _shared_pid(rig, rules)

    def of(samples, name):
        return {ls: v for (n, ls), v in samples.items() if n == f"kuiper_pool_{name}"}

    def sampled():
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        return samples if all(v > 0 for v in of(samples, "resident_memory_bytes").values()) \
            and sum(of(samples, "cpu_seconds_total").values()) > 0 else None
    samples = wait_until(sampled, 10, 0.05, "the shared worker's memory and CPU in the metrics")
    cpu_after = sum(psutil.Process(pid).cpu_times()[:2])
    where = frozenset({("plugin", rig.plugin.name), ("symbol", "src"), ("type", "source"),
                       ("worker", "shared"), ("pid", str(pid))})
    memory, cpu = of(samples, "resident_memory_bytes"), of(samples, "cpu_seconds_total")
    assert list(memory) == [where] and list(cpu) == [where], (memory, cpu)
    assert of(samples, "shared_worker_instances") == {where: 3}
    rss = psutil.Process(pid).memory_info().rss
    assert 0.75 * rss < sum(memory.values()) < 1.33 * rss, (sum(memory.values()), rss)
    assert 0 < sum(cpu.values()) <= cpu_after + 0.02, (sum(cpu.values()), cpu_after)
    assert len(of(samples, "items_in_total")) == 3  # the instances keep every other series

    snap = status.query(rig.plugin.name)
    [proc] = snap["shared_workers"]
    assert list(proc) == documented_shared_worker_keys()
    assert (proc["pid"], proc["symbol"], proc["type"]) == (pid, "src", "source")
    assert sorted(i["rule"] for i in proc["instances"]) == rules and proc["rss"] > 0
    table = kuiper_pool_cli("status", rig.plugin.name).stdout.splitlines()
    rows = [line.split() for line in table if f"{pid}*" in line]
    assert len(rows) == 3 and all(r[7:9] == ["*", "*"] for r in rows), table
    shared = table.index(next(line for line in table if line.startswith("SHARED PID")))
    assert table[shared + 1].split()[:4] == [str(pid), "src", "source", "3"], table
    assert "its RSS and CPU% are shown once, under SHARED PID" in table[-1], table


def _shared_pid(rig, rules):
    rows = [rig.wait_row("running", rule=rule, state="running") for rule in rules]
    assert len({r["pid"] for r in rows}) == 1 and all(r["shared"] for r in rows), rows
    return rows[0]["pid"]


def _serving(rig, srcs, rules, pid, restarts):
    """Every source serves again from one new shared worker (not ``pid``), each restarted
    ``restarts`` times; its first item is counted from 1 (the same config, a new instance)."""
    def moved():
        rows = [rig.row(rule=rule) for rule in rules]
        return rows if all(r is not None and r["state"] == "running" and r["restarts"] == restarts
                           and r["pid"] not in (None, pid) for r in rows) else None
    rows = wait_until(moved, 10, 0.02, f"every instance running in a new worker, restarted {restarts} times")
    new = rows[0]["pid"]
    assert {r["pid"] for r in rows} == {new} and all(r["shared"] for r in rows), rows
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
    [collected] = wait_until(lambda: rig.plugin.events("collect", rule=f"s_{unique}"), 5, 0.02,
                             "the sink to collect")
    assert collected["pid"] == sink_pid


def test_a_stopped_shared_worker_is_found_hung_killed_and_restarted(make_rig, unique):
    rig = make_rig(**{**SHARED, "heartbeat_interval": 0.1, "heartbeat_misses": 3, "stop_grace": 30.0})
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


@pytest.mark.parametrize("where", ["collect", "before_ack", "after_ack"])
def test_acked_sinks_in_a_killed_shared_worker_cost_eKuiper_no_ack_and_no_item(  # noqa: N802
        make_rig, unique, where):
    """Two acked sinks share a worker; one holds item 2 (collecting, or collected and not yet
    acked, or acked) when the worker is SIGKILLed: each item is acked exactly once, by
    whichever worker, as across the restart of a worker of its own."""
    rig = make_rig(**SHARED)
    rules = [f"r{i}_{unique}" for i in range(2)]
    sinks = [rig.host.start_sink("snk", rule, require_ack=True) for rule in rules]
    for sink in sinks:
        assert sink.collect(b'{"i": 1}') == {}
    pid = _shared_pid(rig, rules)
    sinks[0].send(json.dumps({"i": 2, "block": where}).encode())
    wait_until(lambda: rig.plugin.events("blocked", rule=rules[0], i=2), 5, 0.02, f"blocked at {where}")
    sinks[1].send(b'{"i": 2}')
    assert sinks[1].recv_ack(timeout=5) == {}
    os.kill(pid, signal.SIGKILL)
    assert sinks[0].recv_ack(timeout=10) == {}  # from whichever worker: exactly one
    for sink in sinks:
        with pytest.raises(HostError, match="no ack"):
            sink.recv_ack(timeout=0.3)
        assert sink.collect(b'{"i": 3}') == {}  # acks stay matched to items
    collected = [c["i"] for c in rig.plugin.events("collect", rule=rules[0])]
    twice = 2 if where in ("before_ack", "after_ack") else 1  # the dead worker had collected it
    assert collected.count(2) == (1 if where == "after_ack" else twice) and collected.count(3) == 1
    assert [c["i"] for c in rig.plugin.events("collect", rule=rules[1])] == [1, 2, 3]
    rows = [rig.row(rule=rule) for rule in rules]
    assert [r["restarts"] for r in rows] == [1, 1] and rows[0]["pid"] == rows[1]["pid"] != pid


def test_a_shared_worker_over_memory_limit_moves_every_instance_to_a_fresh_one(make_rig, unique):
    rig = make_rig(**{**SHARED, "memory_limit_mb": 100, "sample_interval": 0.1,
                      "heartbeat_misses": 30})  # touching 150 MiB holds the GIL: not a hang
    rules = [f"r{i}_{unique}" for i in range(2)]
    srcs = [rig.host.start_source("src", rules[0], config={"interval": 0.01})]
    srcs[0].recv()
    pid = _shared_pid(rig, rules[:1])
    srcs.append(rig.host.start_source("src", rules[1], config={"interval": 0.01, "alloc_mb": 150}))
    rows = _serving(rig, srcs, rules, pid, 0)  # recycled, not restarted
    assert len(rig.log_texts(rf"recycling worker pid {pid}: resident memory \d+ MiB over memory_limit_mb 100")) == 2
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               5, 0.02, "the old shared worker to exit once empty")
    assert all(r["errors"] == 0 for r in rows)


def test_stopping_instances_ends_only_their_threads_and_leaves_nothing_behind(make_rig, unique):
    """Sources and acked sinks (lent eKuiper's connections, with their item pages) started
    and stopped beside one that stays: the others keep serving in the same processes, whose
    threads and descriptors come back to what they were. (The staying source emits slowly:
    unread, a fast one fills its socket and its sender thread is busy, not left behind.)"""
    rig = make_rig(**SHARED)
    keep_src = rig.host.start_source("src", f"k_{unique}", config={"interval": 0.2})
    keep_snk = rig.host.start_sink("snk", f"ks_{unique}", require_ack=True)
    keep_src.recv()
    assert keep_snk.collect(b'{"i": 0}') == {}
    procs = [psutil.Process(rig.wait_row("running", rule=rule, state="running")["pid"])
             for rule in (f"k_{unique}", f"ks_{unique}")]

    def footprint():
        return [(p.num_threads(), p.num_fds()) for p in procs]
    before = footprint()
    for cycle in range(4):
        src = rig.host.start_source("src", f"c{cycle}_{unique}", config={"interval": 0.01})
        snk = rig.host.start_sink("snk", f"cs{cycle}_{unique}", require_ack=True)
        assert src.recv()["message"]["pid"] == procs[0].pid
        assert snk.collect(b'{"i": 1}') == {}
        src.stop()
        snk.stop()
        assert rig.row(rule=f"c{cycle}_{unique}") is None and rig.row(rule=f"cs{cycle}_{unique}") is None
    wait_until(lambda: footprint() == before, 5, 0.05, f"threads and descriptors back to {before}")
    seen = keep_src.recv()["message"]["n"]
    assert keep_src.recv()["message"]["n"] > seen and keep_snk.collect(b'{"i": 2}') == {}
    assert [r["restarts"] for r in rig.rows()] == [0, 0]
    assert [r["pid"] for r in sorted(rig.rows(), key=lambda r: r["rule"])] == [procs[0].pid, procs[1].pid]


def test_an_instance_whose_open_ignores_its_stop_retires_the_shared_worker(make_rig, unique):
    """close returns but open never does: the instance is stopped after stop_grace, its
    thread is left behind, and the other instances move to a fresh worker (recycled, no
    restart), after which the old one is ended."""
    rig = make_rig(**SHARED, stop_grace=0.3)
    rules = [f"r{i}_{unique}" for i in range(3)]
    confs = [{"interval": 0.01, "ignore_close": i == 1} for i in range(3)]
    srcs = [rig.host.start_source("src", rule, config=conf) for rule, conf in zip(rules, confs)]
    for src in srcs:
        src.recv()
    pid = _shared_pid(rig, rules)
    srcs[1].stop()
    kept = [rules[0], rules[2]]
    rows = _serving(rig, [srcs[0], srcs[2]], kept, pid, 0)
    assert [r["state"] for r in rows] == ["running"] * 2
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               5, 0.02, "the retired shared worker to end")
    assert rig.log_texts(r"shared worker pid \d+: an instance's open did not return within stop_grace")


def test_an_instance_stuck_in_open_is_named_with_where_its_thread_is_stuck(make_rig, unique):
    """open blocks in a function of the plugin's (``stay``) and close does not stop it: the
    line that retires the shared worker names that instance and the innermost plugin frame
    of its own thread (the other instance's is in ``open``)."""
    rig = make_rig(**SHARED, stop_grace=0.3)
    rules = [f"r{i}_{unique}" for i in range(2)]
    kept = rig.host.start_source("src", rules[0], config={"interval": 0.01})
    kept.recv()
    stuck = rig.host.start_source("src", rules[1], config={"stay_in_open": True})
    wait_until(lambda: rig.plugin.events("blocked", rule=rules[1]), 5, 0.02, "open to block in stay")
    pid = _shared_pid(rig, rules)
    stuck.stop()
    _serving(rig, [kept], rules[:1], pid, 0)
    [line] = wait_until(lambda: rig.log_texts(rf"^plugin \S+ source src: shared worker pid {pid}: an instance's open"),
                        5, 0.02, "the line retiring the shared worker")
    assert re.search(rf"\(rule {rules[1]} op op instance 0, at \S+\.py:\d+ stay\); its 1 other instances "
                     rf"move to a fresh worker$", line["text"]), line


def test_a_shared_sink_killed_for_its_collect_deadline_says_where_its_own_thread_was(make_rig, unique):
    """One sink's collect blocks in ``stay`` past collect_deadline: its error says where its
    own thread was, as a worker of its own's stack dump does (the other sink's thread is
    elsewhere); that thread never ends, so the process is retired, naming it and the place."""
    rig = make_rig(**SHARED, collect_deadline=0.5, stop_grace=0.5)
    rules = [f"r{i}_{unique}" for i in range(2)]
    sinks = [rig.host.start_sink("snk", rule, require_ack=True) for rule in rules]
    for sink in sinks:
        assert sink.collect(b'{"i": 1}') == {}
    pid = _shared_pid(rig, rules)
    sinks[0].send(b'{"i": 2, "block": "collect"}')
    row = rig.wait_row("the blocked sink killed and restarted", timeout=10, rule=rules[0], restarts_min=1)
    assert re.search(r"collect_deadline 0\.5s \(at \S+\.py:\d+ stay\)$", row["last_error"]), row
    assert sinks[1].collect(b'{"i": 2}') == {}
    wait_until(lambda: rig.log_texts(rf"^plugin \S+ sink snk: shared worker pid {pid}: an instance's thread did "
                                     rf"not end .*\(rule {rules[0]} op op instance 0, at \S+\.py:\d+ stay\)"),
               10, 0.02, "the line retiring the shared worker")
    assert sinks[0].recv_ack(timeout=10) == {}  # item 2, collected again by the fresh worker


def test_a_reload_moves_shared_instances_to_a_shared_worker_of_the_new_code(tmp_path, unique, host_runs):
    """Two sources and two acked sinks, each symbol in a shared worker; sinks fed while the
    reload runs: every instance serves the new code from one new worker per symbol, and
    every item is recorded and acked."""
    name, src, snk = f"kp{unique}", f"src{unique}", f"snk{unique}"
    items = str(tmp_path / "items.jsonl")
    plugin_dir = make_plugin(str(tmp_path), name, sources={src: VERSION_SOURCE},
                             sinks={snk: RECORDING_SINK}, extra_modules={"version": 'VERSION = "v1"\n'},
                             main_code="import version  # noqa: F401",
                             settings={"heartbeat_interval": 0.1, "stop_grace": 2.0, **SHARED})
    host = host_runs.launch(plugin_dir)
    rules = [f"r{i}{unique}" for i in range(2)]
    sources = [host.start_source(src, rule, op="in") for rule in rules]
    sinks = [host.start_sink(snk, rule, op="out", config={"file": items}, require_ack=True) for rule in rules]
    old = {s.recv()["message"]["pid"] for s in sources}
    assert len(old) == 1
    sent = 0
    for sink in sinks:
        assert sink.collect(b'{"n":%d}' % sent) == {}
        sent += 1
    with open(os.path.join(plugin_dir, "version.py"), "w") as f:
        f.write('VERSION = "v2"\n')
    done = []
    reloading = threading.Thread(target=lambda: done.append(kuiper_pool_cli("reload", name, timeout=90)),
                                 daemon=True)
    reloading.start()
    while reloading.is_alive():  # items flow through the whole reload, one at a time per sink
        for sink in sinks:
            assert sink.collect(b'{"n":%d}' % sent, timeout=10) == {}
            sent += 1
    reloading.join()
    assert done[0].stdout.startswith(f"plugin {name}: reloaded: 4 instance(s) replaced"), done[0].stdout
    rows = status.query(name)["instances"]
    assert all(r["state"] == "running" and r["restarts"] == 0 and r["shared"] for r in rows), rows
    for kind in ("source", "sink"):
        pids = {r["pid"] for r in rows if r["type"] == kind}
        assert len(pids) == 1 and not pids & old, rows
    for s in sources:
        wait_until(lambda: s.recv()["message"]["version"] == "v2", message="the source on v2")
    recorded = sorted(json.loads(r["data"])["n"] for r in read_jsonl(items, "item"))
    assert recorded == list(range(sent))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_each_instance_keeps_its_own_state_across_a_kill_of_the_shared_worker(
        tmp_path, unique, host_runs, start_method):
    """Two sources of one symbol count on from their own state after SIGKILL of the shared
    worker, forked from the zygote or exec'd (``start_method: spawn``: the title says so)."""
    src = f"src{unique}"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}", sources={src: STATE_SOURCE},
                                        settings={**STATE_FAST, **SHARED, "start_method": start_method}))
    sources = [host.start_source(src, f"r{i}{unique}") for i in range(2)]
    firsts = [[s.recv()["message"] for _ in range(5 + 20 * i)] for i, s in enumerate(sources)]
    [pid] = {m["pid"] for first in firsts for m in first}
    assert psutil.Process(pid).cmdline()[0].startswith(
        f"kuiper-pool {'(exec) ' if start_method == 'spawn' else ''}kp{unique} source {src} (shared)")
    os.kill(pid, signal.SIGKILL)
    for s, first in zip(sources, firsts):
        seen = []
        wait_until(lambda: seen.append(s.recv()["message"]) or seen[-1]["pid"] != pid,
                   message="items of the new shared worker")
        ns = [m["n"] for m in first + seen]
        assert ns == sorted(ns) and len(set(ns)) == len(ns), ns  # its own count, continued


def test_a_forked_child_of_one_shared_sink_takes_no_item_of_any(tmp_path, host_runs, unique):
    """Plugin code of one sink forks in collect and the child returns: in a shared worker the
    child's copies of every instance's link and collect mark are dead (ForkGuard), so it
    takes no item of either sink, and exits with one line."""
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": FORKING_SINK}, settings=SHARED)
    host = host_runs.launch(plugin)
    items = str(tmp_path / "items.jsonl")
    sinks = [host.start_sink(f"snk{unique}", f"r{i}{unique}", config={"file": items}) for i in range(2)]
    sinks[0].collect(b'{"i": 0, "fork": true}')
    for i in range(1, 30):
        sinks[i % 2].collect(b'{"i": %d}' % i)
    rows = wait_until(lambda: (lambda r: r if len(r) >= 30 else None)(read_jsonl(items, "collect")),
                      message="30 items collected")
    assert sorted(r["i"] for r in rows) == list(range(30))
    assert len({r["pid"] for r in rows}) == 1, "every item is collected by the shared worker itself"
    wait_until(lambda: _forked_lines(plugin) == 1, message="one line about the forked child")
