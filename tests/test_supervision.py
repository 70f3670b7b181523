"""Supervision under real faults: crashes, hangs, flapping, resource limits, no leaks.

Every test runs a generated plugin (tests/faulty_plugins.py) under the eKuiper stand-in
and breaks its workers for real: exceptions, MemoryError, ``os._exit``, a segfault
through ctypes, SIGKILL, SIGSTOP, busy loops and memory growth. The plugin records
configure/open/collect/exec/fault events with their pid and time, so a test sees which
worker did what; the supervisor's status socket and its log (the plugin's stdout, which
eKuiper would capture) show how the supervisor saw it.

Timings the tests measure are printed (``pytest -s``) as ``TIMING <what>: <seconds>``.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import psutil
import pytest

from conftest import ipc_files, wait_until
from faulty_plugins import FaultyPlugin, write_faulty_plugin
from kuiper_pool.runtime import status
from kuiper_pool.runtime.kinds.sink.route import RELAY_AFTER_LARGE
from kuiper_pool.tools.emulator import Host, HostError

# Short settings so faults resolve in fractions of a second.
# every test here runs under both transports (conftest.transport)
pytestmark = pytest.mark.usefixtures("transport")

FAST = {"heartbeat_interval": 0.1, "heartbeat_misses": 3, "call_deadline": 1.0, "stop_grace": 0.5,
        "restart_backoff_min": 0.05, "restart_backoff_max": 0.5, "sample_interval": 0.1,
        "flap_max_restarts": 10, "flap_window": 60.0}
# Heartbeats so slow that only event-driven crash detection can explain a fast restart.
SLOW_BEATS = {"heartbeat_interval": 0.5, "heartbeat_misses": 10}
RUN_BASE = f"/tmp/kuiper_pool-{os.getuid()}"
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) kuiper_pool plugin=(?P<plugin>\S+) "
                      r"symbol=(?P<symbol>\S+) rule=(?P<rule>\S+) pid=(?P<pid>\d+): (?P<text>.*)$")


def timing(what: str, seconds: float) -> None:
    print(f"TIMING {what}: {seconds * 1000:.1f} ms")


@dataclass
class Rig:
    """One plugin under the stand-in, with its event file, status socket and log."""
    plugin: FaultyPlugin
    host: Host
    log_path: str
    settings: Dict[str, Any] = field(default_factory=dict)

    def rows(self) -> List[Dict[str, Any]]:
        try:
            return status.query(self.plugin.name)["instances"]
        except status.StatusError:
            return []

    def row(self, **match: Any) -> Optional[Dict[str, Any]]:
        for r in self.rows():
            if all(r[k] == v for k, v in match.items()):
                return r
        return None

    def wait_row(self, message: str, timeout: float = 5.0, **cond: Any) -> Dict[str, Any]:
        """The status row matching ``cond`` (``restarts_min`` = at least that many restarts)."""
        least = cond.pop("restarts_min", None)

        def found():
            r = self.row(**cond)
            return r if r is not None and (least is None or r["restarts"] >= least) else None
        return wait_until(found, timeout, 0.02, message)

    def log(self) -> List[Dict[str, str]]:
        """Parsed kuiper_pool log lines (plugin stdout) so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return [m.groupdict() for m in map(LOG_LINE.match, f.read().splitlines()) if m]

    def log_texts(self, pattern: str) -> List[Dict[str, str]]:
        rx = re.compile(pattern)
        return [line for line in self.log() if rx.search(line["text"])]

    def supervisor(self) -> psutil.Process:
        return psutil.Process(self.host.process.pid)


@pytest.fixture
def make_rig(tmp_path, unique, ipc_leak_check):
    """Rig factory. Teardown: close the host (SIGKILL of the supervisor, as eKuiper does),
    then require that every worker and the zygote are gone, and that no ipc file or
    runtime entry of this plugin is left."""
    rigs: List[Rig] = []

    def make(host_options: Optional[Dict[str, Any]] = None, **settings: Any) -> Rig:
        merged = {**FAST, **settings}
        plugin = write_faulty_plugin(str(tmp_path / f"plugin{len(rigs)}"), f"{unique}{len(rigs)}", merged)
        log_path = str(tmp_path / f"plugin{len(rigs)}.log")
        host = Host(plugin.dir, stdout=open(log_path, "ab"), init_timeout=20.0,
                    **{"data_transport": "sp", **(host_options or {})})
        rig = Rig(plugin, host, log_path, merged)
        rigs.append(rig)
        host.start()
        return rig

    yield make
    problems = []
    for rig in rigs:
        tree = []
        if rig.host.alive():
            try:
                tree = rig.supervisor().children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        rig.host.close()
        rig.host.stdout.close()
        deadline = time.monotonic() + 5
        while True:  # orphaned zombies are reaped by init whenever it gets to it: they count as gone
            alive = [p for p in tree if _running(p)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        for proc in alive:
            problems.append(f"process {proc.pid} outlived its supervisor")
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        prefix = os.path.join(RUN_BASE, rig.plugin.name)
        deadline = time.monotonic() + 5
        while glob.glob(prefix + "*") and time.monotonic() < deadline:
            time.sleep(0.02)
        left = glob.glob(prefix + "*")
        if left:
            problems.append(f"runtime entries left: {left}")
    assert not problems, problems


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fault_events(rig: Rig, **match: Any) -> List[Dict[str, Any]]:
    return wait_until(lambda: rig.plugin.events("fault", **match), 5.0, 0.02, f"a fault event {match}")


# --- 1. crash detection and restart, for every cause ----------------------------------------------

@pytest.mark.parametrize("how,exit_text,cause", [
    ("raise", "exit code 70", "exit"),
    ("memory", "exit code 70", "exit"),
    ("exit", "exit code 13", "exit"),
    ("segv", "signal 11 (SIGSEGV)", "signal"),
])
def test_source_open_fault_restarts_the_instance_with_the_same_config(make_rig, unique, how,
                                                                       exit_text, cause):
    rig = make_rig(**SLOW_BEATS)
    rule = f"r_{unique}"
    conf = {"interval": 0.01, "open_fault": how, "once": "open_fault_done", "tag": "same-every-time"}
    src = rig.host.start_source("src", rule, config=conf)

    item = src.recv(timeout=5)["message"]                # from the replacement worker
    [fault] = fault_events(rig, rule=rule)
    assert item["pid"] != fault["pid"] and item["n"] == 1
    configures = rig.plugin.events("configure", symbol="src")
    opens = rig.plugin.events("open", rule=rule)
    assert [c["conf"] for c in configures] == [conf, conf]
    assert [c["pid"] for c in configures] == [o["pid"] for o in opens] == [fault["pid"], item["pid"]]
    restart = configures[1]["t"] - fault["t"]
    timing(f"source open {how}: fault -> configure in the new worker", restart)
    limit = rig.settings["heartbeat_interval"] * rig.settings["heartbeat_misses"]
    assert restart < min(1.5, limit / 2), "the crash must be noticed without waiting for heartbeats"

    row = rig.wait_row("one restart in the status", rule=rule, restarts_min=1)
    assert (row["state"], row["restarts"], row["pid"], row["restart_causes"]) == \
        ("running", 1, item["pid"], {cause: 1})
    if how in ("raise", "memory"):
        exc = "RuntimeError: injected fault" if how == "raise" else "MemoryError: injected MemoryError"
        assert exc in row["last_error"] and "open raised" in row["last_error"]
    [line] = rig.log_texts(rf"worker pid {fault['pid']} {re.escape(exit_text)}")
    assert line["rule"] == rule and line["symbol"] == "src" and "restart 1 in" in line["text"]
    more = [src.recv()["message"] for _ in range(3)]
    assert [m["n"] for m in more] == [2, 3, 4] and {m["pid"] for m in more} == {item["pid"]}


def test_sigkill_of_a_source_worker_is_noticed_and_restarted(make_rig, unique):
    rig = make_rig(**SLOW_BEATS)
    rule = f"r_{unique}"
    conf = {"interval": 0.01, "tag": "k"}
    src = rig.host.start_source("src", rule, config=conf)
    first = src.recv()["message"]
    killed_at = time.time()
    os.kill(first["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    row = rig.wait_row("the restart after SIGKILL", rule=rule, state="running", restarts_min=1)
    noticed = time.monotonic() - t0
    while True:  # drain what the killed worker emitted before it died
        item = src.recv(timeout=5)["message"]
        if item["pid"] != first["pid"]:
            break
    configures = rig.plugin.events("configure", symbol="src")
    assert [c["conf"] for c in configures] == [conf, conf]
    assert configures[1]["pid"] == item["pid"] == row["pid"] and item["n"] == 1
    timing("SIGKILL of a source worker -> restart seen in status", noticed)
    timing("SIGKILL of a source worker -> configure in the new worker", configures[1]["t"] - killed_at)
    assert configures[1]["t"] - killed_at < 1.5
    assert row["restart_causes"] == {"signal": 1}
    assert len(rig.log_texts(rf"worker pid {first['pid']} signal 9 \(SIGKILL\)")) == 1


def test_sink_collect_exception_restarts_and_the_item_is_delivered_again(make_rig, unique):
    rig = make_rig(**SLOW_BEATS)
    rule = f"r_{unique}"
    conf = {"tag_acks": False, "tag": "sink-conf"}
    sink = rig.host.start_sink("snk", rule, config=conf, require_ack=True)
    acks = [sink.collect(json.dumps(item).encode()) for item in
            ({"i": 1}, {"i": 2, "die": "raise", "mode": "once"}, {"i": 3})]
    assert acks == [{}, {}, {}]
    [fault] = rig.plugin.events("fault", rule=rule)
    configures = rig.plugin.events("configure", symbol="snk")
    assert [c["conf"] for c in configures] == [{**conf, "requireAck": True}] * 2
    assert configures[0]["pid"] == fault["pid"] != configures[1]["pid"]
    timing("sink collect raise: fault -> configure in the new worker", configures[1]["t"] - fault["t"])
    collected = rig.plugin.events("collect", rule=rule)
    assert [(c["i"], c["pid"]) for c in collected] == [(1, fault["pid"]), (2, configures[1]["pid"]),
                                                     (3, configures[1]["pid"])]
    row = rig.wait_row("sink restarted", rule=rule, restarts_min=1)
    assert "collect raised RuntimeError: injected fault in collect of item 2" in row["last_error"]


def test_the_error_of_a_worker_that_exits_at_once_is_never_lost(make_rig, unique):
    """A worker whose configure raises reports the error and exits within a millisecond;
    the zygote's exit report can reach the supervisor before the error frame does. The
    error must still be eKuiper's start answer, every time."""
    rig = make_rig()
    for i in range(40):
        with pytest.raises(HostError) as err:
            rig.host.start_source("src", f"r_{unique}_{i}", config={"configure_fault": True})
        assert "configure failed: ValueError: injected configure fault" in str(err.value), str(err.value)
    assert len(rig.plugin.events("configure", symbol="src")) == 40
    assert rig.rows() == []


# --- 2. other instances are untouched --------------------------------------------------------------

def test_a_crash_leaves_other_instances_streaming(make_rig, unique):
    rig = make_rig()
    steady, victim = f"ra_{unique}", f"rb_{unique}"
    a = rig.host.start_source("src", steady, config={"interval": 0.002})
    b = rig.host.start_source("src", victim, config={"interval": 0.01})
    got = [a.recv()["message"]]
    for crash in range(1, 4):
        pid = rig.wait_row("victim running", rule=victim, state="running", restarts=crash - 1)["pid"]
        wait_until(lambda: rig.plugin.events("open", rule=victim, pid=pid), 5, 0.01, "victim open")
        before = len(got)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not (rig.row(rule=victim, state="running", restarts=crash) and len(got) > before + 20):
            got.append(a.recv()["message"])
            assert time.monotonic() < deadline, "victim not restarted or steady source stalled"
    got += [a.recv()["message"] for _ in range(20)]
    assert [m["n"] for m in got] == list(range(1, len(got) + 1)), "the steady source lost or repeated items"
    assert {m["pid"] for m in got} == {got[0]["pid"]}
    assert rig.row(rule=steady)["restarts"] == 0 and rig.row(rule=steady)["pid"] == got[0]["pid"]
    wait_until(lambda: len({e["pid"] for e in rig.plugin.events("open", rule=victim)}) == 4, 5, 0.02,
               "the victim opened by 4 workers")
    while True:
        m = b.recv()["message"]
        if m["pid"] == rig.row(rule=victim)["pid"]:
            break


# --- 3. sinks lose nothing ------------------------------------------------------------------------

def test_sink_with_acks_loses_nothing_when_its_worker_dies(make_rig, unique):
    rig = make_rig()
    rule, n, killer = f"r_{unique}", 60, 23
    sink = rig.host.start_sink("snk", rule, config={"tag_acks": True}, require_ack=True)
    for i in range(1, n + 1):  # pipelined: many items are in flight when the worker dies
        item = {"i": i, "die": "exit", "mode": "once"} if i == killer else {"i": i}
        sink.send(json.dumps(item).encode())
    acks = [sink.recv_ack(timeout=5) for _ in range(n)]
    assert acks == [{"error": f"tag {i}"} if i % 3 == 0 else {} for i in range(1, n + 1)]
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.5)  # exactly one ack per item
    [fault] = rig.plugin.events("fault", rule=rule)
    assert fault["i"] == killer
    collected = rig.plugin.events("collect", rule=rule)
    assert {c["i"] for c in collected} == set(range(1, n + 1))
    per_worker = collections.defaultdict(list)
    for c in collected:
        per_worker[c["pid"]].append(c["i"])
    assert set(per_worker) <= {fault["pid"], *[e["pid"] for e in rig.plugin.events("configure")]}
    for pid, items in per_worker.items():
        assert items == sorted(set(items)), f"worker {pid} collected an item twice or out of order"
    assert all(i < killer for i in per_worker[fault["pid"]])
    # duplicates only for what the dead worker had in hand (collected, not yet reported done)
    twice = [i for i, k in collections.Counter(c["i"] for c in collected).items() if k > 1]
    assert set(twice) <= set(per_worker[fault["pid"]]) and len(twice) <= 32  # README: at most 32
    assert rig.row(rule=rule)["restarts"] == 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_sink_without_acks_loses_nothing_when_its_worker_is_killed_or_stopped(make_rig, unique, sig):
    # SIGSTOP under the default detection settings: the worker is found hung after 2 s of
    # silence and SIGKILLed at once; meanwhile the supervisor keeps reading (sink_window_mb),
    # so eKuiper's sends never wait
    rig = make_rig(heartbeat_interval=0.5, heartbeat_misses=4, stop_grace=2.0)
    rule, n = f"r_{unique}", 3000
    sink = rig.host.start_sink("snk", rule)
    done = threading.Event()
    errors: List[BaseException] = []
    hit = threading.Event()

    def send_all() -> None:
        try:
            for i in range(1, n + 1):
                if i == n // 2:  # the rest goes out after the signal
                    hit.wait(10)
                sink.send(json.dumps({"i": i}).encode())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            done.set()

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    wait_until(lambda: len(rig.plugin.events("collect", rule=rule)) >= n // 4, 20, 0.02,
               "a quarter of the items collected")
    pid = rig.row(rule=rule)["pid"]
    os.kill(pid, sig)
    hit.set()
    at_kill = len(rig.plugin.events("collect", rule=rule))
    assert at_kill < n, "the signal must land mid-stream"
    assert done.wait(30) and not errors, errors
    wait_until(lambda: {c["i"] for c in rig.plugin.events("collect", rule=rule)} == set(range(1, n + 1)),
               20, 0.1, "every item collected")
    cause = "signal" if sig == signal.SIGKILL else "hang"
    row = wait_until(lambda: (lambda r: r if r["restarts"] >= 1 else None)(rig.row(rule=rule)), 10, 0.05,
                     "the restart counted in status")
    assert row["restarts"] == 1 and row["pid"] != pid and row["restart_causes"] == {cause: 1}
    if sig == signal.SIGSTOP:
        [line] = rig.log_texts(rf"killing worker pid {pid}: hung")
        assert line["rule"] == rule
    print(f"TIMING sink {sig.name} mid-stream: {at_kill}/{n} items collected at the signal")


def holds_data_connection(pid: int, path: str) -> bool:
    """Whether worker ``pid`` holds a connection accepted on eKuiper's sink data path."""
    try:
        proc = psutil.Process(pid)
        conns = getattr(proc, "net_connections", proc.connections)(kind="unix")
        return any(c.laddr == path for c in conns)
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("where", ["before_read", "collect", "before_ack", "after_ack"])
def test_an_acked_sink_worker_killed_anywhere_costs_eKuiper_no_ack_and_no_item(  # noqa: N802
        make_rig, unique, transport, where):
    rig = make_rig()
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, require_ack=True)
    assert sink.collect(b'{"i": 1}') == {}
    pid = rig.row(rule=rule)["pid"]
    if transport == "sp":  # the worker reads eKuiper's data connection itself
        assert wait_until(lambda: holds_data_connection(pid, f"/tmp/{rule}_op_0.ipc"), 5, 0.02,
                          "the data connection lent to the worker")
    item = json.dumps({"i": 2, "block": where} if where != "before_read" else {"i": 2}).encode()
    if where == "before_read":
        os.kill(pid, signal.SIGSTOP)  # the item waits in the socket, unread
        sink.send(item)
    else:
        sink.send(item)
        wait_until(lambda: rig.plugin.events("blocked", rule=rule, i=2), 5, 0.02, f"blocked at {where}")
    os.kill(pid, signal.SIGKILL)
    assert sink.recv_ack(timeout=10) == {}  # from whichever worker: exactly one
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.3)
    assert sink.collect(b'{"i": 3}') == {}  # acks stay matched to items
    collected = [c["i"] for c in rig.plugin.events("collect", rule=rule)]
    assert set(collected) == {1, 2, 3}
    twice = 2 if where in ("before_ack", "after_ack") else 1  # the dead worker had collected it
    assert collected.count(2) == (1 if where == "after_ack" else twice)
    assert rig.row(rule=rule)["restarts"] == 1


def test_an_acked_sink_relays_items_too_large_for_the_page_and_lends_again(make_rig, unique, transport):
    rig = make_rig()
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, require_ack=True)
    # the page takes frames up to 64 KiB; after a bigger one, a run of small ones is relayed
    sizes = [10, 300_000, 10, 70_000] + [10] * RELAY_AFTER_LARGE
    for i, size in enumerate(sizes, 1):
        assert sink.collect(json.dumps({"i": i, "pad": "x" * size}).encode()) == {}
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.3)
    assert [c["i"] for c in rig.plugin.events("collect", rule=rule)] == list(range(1, len(sizes) + 1))
    if transport == "sp":
        pid = rig.row(rule=rule)["pid"]
        assert wait_until(lambda: holds_data_connection(pid, f"/tmp/{rule}_op_0.ipc"), 5, 0.02,
                          "the data connection lent again")


def test_an_acked_sink_follows_ekuipers_reconnect_while_its_worker_holds_the_connection(
        make_rig, unique, transport):
    if transport != "sp":
        pytest.skip("the connection is lent under transport sp only")
    rig = make_rig()
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, require_ack=True)
    assert sink.collect(b'{"i": 1}') == {}
    pid = rig.row(rule=rule)["pid"]
    path = f"/tmp/{rule}_op_0.ipc"
    assert wait_until(lambda: holds_data_connection(pid, path), 5, 0.02, "the connection lent")
    push = sink._data  # eKuiper's PUSH loses its pipe and dials again
    if hasattr(push, "pipes"):
        for pipe in list(push.pipes):
            pipe.close()
    else:
        push._lost()
    for i in (2, 3, 4):
        assert sink.collect(json.dumps({"i": i}).encode()) == {}
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.3)
    assert [c["i"] for c in rig.plugin.events("collect", rule=rule)] == [1, 2, 3, 4]
    assert rig.row(rule=rule)["pid"] == pid and rig.row(rule=rule)["restarts"] == 0
    assert wait_until(lambda: holds_data_connection(pid, path), 5, 0.02, "the new connection lent")


def test_a_late_ack_from_a_timer_thread_reaches_ekuiper_once(make_rig, unique):
    rig = make_rig()
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, config={"late_ack": 0.1}, require_ack=True)
    for i in range(1, 4):  # one at a time, as eKuiper's Collect does with requireAck
        assert sink.collect(json.dumps({"i": i}).encode(), timeout=5) == {}
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.5)  # exactly one ack per item
    assert [c["i"] for c in rig.plugin.events("collect", rule=rule)] == [1, 2, 3]


@pytest.mark.parametrize("require_ack", [False, True])
def test_a_sink_gets_8_mib_items_intact_and_in_order_across_a_sigkill_mid_item(
        make_rig, unique, require_ack):
    """Items above frames.SPILL reach the worker in a memfd: the item whose collect was
    running when its worker was SIGKILLed, and those after it, are delivered again, whole."""
    rig = make_rig()
    rule, n, killer = f"r_{unique}", 5, 3
    sink = rig.host.start_sink("snk", rule, config={"digest": True}, require_ack=require_ack)
    sent = {}
    for i in range(1, n + 1):
        item = {"i": i, "pad": os.urandom(4 << 20).hex()}   # 8 MiB
        if i == killer:
            item.update(die="sigkill", mode="once")
        data = json.dumps(item).encode()
        sent[i] = hashlib.sha256(data).hexdigest()
        sink.send(data)
    if require_ack:
        assert [sink.recv_ack(timeout=10) for _ in range(n)] == [{}] * n
        with pytest.raises(HostError, match="no ack"):
            sink.recv_ack(timeout=0.5)  # exactly one ack per item
    wait_until(lambda: {c["i"] for c in rig.plugin.events("collect", rule=rule)} == set(sent), 20, 0.02,
               "every item collected")
    [fault] = rig.plugin.events("fault", rule=rule)
    assert fault["i"] == killer
    collected = rig.plugin.events("collect", rule=rule)
    assert all(c["sha"] == sent[c["i"]] for c in collected), "an item arrived changed"
    per_worker = collections.defaultdict(list)
    for c in collected:
        per_worker[c["pid"]].append(c["i"])
    assert per_worker[fault["pid"]] == list(range(1, killer))
    [after] = [items for pid, items in per_worker.items() if pid != fault["pid"]]
    # the dead worker's last DONE may not have been read: those items may come again, in order
    assert after == sorted(set(after)) and after[-(n - killer + 1):] == list(range(killer, n + 1))
    assert rig.row(rule=rule)["restarts"] == 1


@pytest.mark.parametrize("require_ack", [False, True])
def test_big_items_of_mixed_sizes_arrive_exact_through_reused_memfds(make_rig, unique, require_ack):
    """Big items are received into memfds the supervisor reuses: each item arrives with
    exactly its own bytes, none with the tail of a bigger one before it, whether it fits a
    reused memfd or (over 16 MiB) gets one of its own. Beats are slow: decoding a 17 MiB
    item under a busy machine may take longer than FAST's 0.3 s, which is not what is tested."""
    rig = make_rig(**SLOW_BEATS)
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, config={"digest": True}, require_ack=require_ack)
    kib = [6144, 300, 2048, 1024, 256, 1536, 17000, 700, 3000, 260, 1024, 512, 4096, 300]
    sent = {}
    for i, k in enumerate(kib, 1):
        data = json.dumps({"i": i, "pad": os.urandom(k * 512).hex()}).encode()   # k KiB of hex
        sent[i] = hashlib.sha256(data).hexdigest()
        if require_ack:
            assert sink.collect(data, timeout=10) == {}
        else:
            sink.send(data)
    wait_until(lambda: len(rig.plugin.events("collect", rule=rule)) >= len(sent), 20, 0.02, "every item collected")
    collected = rig.plugin.events("collect", rule=rule)
    assert [c["i"] for c in collected] == list(sent)
    assert all(c["sha"] == sent[c["i"]] for c in collected), "an item arrived changed"
    assert rig.row(rule=rule)["restarts"] == 0


def test_a_sink_worker_cannot_change_the_memfds_that_hold_big_items(make_rig, unique, transport):
    """Plugin code can reopen the supervisor's item memfds through /proc/<pid>/fd: every way
    to change one (write, ftruncate, writable mmap, punched hole, new seal) is refused, the
    supervisor keeps serving and later items arrive exact."""
    if transport != "sp":
        pytest.skip("big items are held in memfds under transport sp only")
    rig = make_rig()
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, config={"digest": True})
    sup = rig.supervisor().pid
    sent = {}
    for i in range(1, 7):
        item = {"i": i, "pad": os.urandom(1 << 19).hex()}   # 1 MiB
        if i in (2, 5):
            item["tamper"] = sup
        data = json.dumps(item).encode()
        sent[i] = hashlib.sha256(data).hexdigest()
        sink.send(data)
    wait_until(lambda: len(rig.plugin.events("collect", rule=rule)) >= len(sent), 20, 0.02, "every item collected")
    tampers = rig.plugin.events("tamper", rule=rule)
    assert [t["i"] for t in tampers] == [2, 5]
    assert all(t["tried"] >= 1 and t["done"] == [] for t in tampers), [(t["tried"], t["done"]) for t in tampers]
    collected = rig.plugin.events("collect", rule=rule)
    assert [c["i"] for c in collected] == list(sent)
    assert all(c["sha"] == sent[c["i"]] for c in collected), "an item arrived changed"
    assert rig.host.alive() and rig.row(rule=rule)["restarts"] == 0
    data = json.dumps({"i": 7, "pad": os.urandom(1 << 19).hex()}).encode()
    sink.send(data)
    wait_until(lambda: [c["sha"] for c in rig.plugin.events("collect", rule=rule, i=7)]
               == [hashlib.sha256(data).hexdigest()], 10, 0.02, "the item after")


def test_a_poison_item_is_dropped_with_an_error_ack_and_later_items_flow(make_rig, unique):
    rig = make_rig(sink_max_deliveries=3)
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, require_ack=True)
    acks = []
    t0 = time.monotonic()
    for i in range(1, 6):  # one at a time, as eKuiper does with requireAck
        item = {"i": i, "die": "exit", "mode": "always"} if i == 3 else {"i": i}
        acks.append(sink.collect(json.dumps(item).encode(), timeout=10))
    timing("poison item: 5 items, one killing 3 workers", time.monotonic() - t0)
    assert acks[:2] == [{}, {}] and acks[3:] == [{}, {}]
    assert "item dropped: 3 workers died during its collect" in acks[2]["error"]
    assert [c["i"] for c in rig.plugin.events("collect", rule=rule)] == [1, 2, 4, 5]
    assert len(rig.plugin.events("fault", rule=rule, i=3)) == 3
    row = rig.row(rule=rule)
    assert (row["state"], row["restarts"], row["errors"]) == ("running", 3, 1)
    assert len(rig.log_texts(r"dropped 1 item\(s\) whose collect was running when a worker died 3 times")) == 1


def test_only_the_item_that_killed_its_workers_is_dropped_of_items_sent_back_to_back(make_rig, unique):
    rig = make_rig(sink_max_deliveries=3)
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule)
    for i in range(8):                       # no requireAck: eKuiper sends back to back
        item = {"i": i, "die": "raise", "mode": "always"} if i == 1 else {"i": i}
        sink.send(json.dumps(item).encode())
    wait_until(lambda: len(rig.log_texts(r"dropped \d+ item\(s\)")) == 1, 10, 0.02, "the poison item dropped")
    assert len(rig.log_texts(r"dropped 1 item\(s\) whose collect was running when a worker died 3 times")) == 1
    wait_until(lambda: {c["i"] for c in rig.plugin.events("collect", rule=rule)} == {0, 2, 3, 4, 5, 6, 7},
               5, 0.02, "every good item collected")
    assert len(rig.plugin.events("fault", rule=rule, i=1)) == 3
    assert rig.wait_row("the sink running", rule=rule, state="running")["errors"] == 1


def test_an_operator_restart_of_a_slow_sink_drops_nothing(make_rig, unique):
    rig = make_rig(sink_max_deliveries=1, stop_grace=0.2)
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, config={"slow": 30}, require_ack=True)
    ack = []
    sender = threading.Thread(target=lambda: ack.append(sink.collect(b'{"i": 1}', timeout=20)), daemon=True)
    sender.start()
    for n in range(1, 4):                    # restarted while its collect runs, three times
        wait_until(lambda: len(rig.plugin.events("slow", rule=rule)) == n, 5, 0.02, "collect running")
        if n == 3:                           # the fourth worker's collect is quick
            open(os.path.join(rig.plugin.dir, "fast"), "w").close()
        lines = status.request(rig.plugin.name, {"cmd": "restart", "symbol": "snk"})["lines"]
        assert len(lines) == 1 and lines[0].endswith("running: restarting")
    sender.join(20)
    assert ack == [{}] and rig.row(rule=rule)["errors"] == 0
    assert rig.log_texts(r"dropped \d+ item") == []


# --- 4. functions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how,cause", [("exit", "exit code 13"), ("segv", "signal 11 (SIGSEGV)"),
                                       ("sigkill", "signal 9 (SIGKILL)")])
def test_a_function_worker_dying_in_exec_is_answered_at_once_and_not_retried(make_rig, how, cause):
    rig = make_rig()
    f = rig.host.start_function(rig.plugin.fn)
    before = f.exec(["pid"])
    t0 = time.monotonic()
    reply = f.exec(["die", how])
    took = time.monotonic() - t0
    timing(f"function exec {how}: call -> error reply", took)
    assert reply["state"] is False
    assert rig.plugin.fn in reply["result"] and cause in reply["result"]
    assert took < 1.0, "eKuiper must get the error well before its 5 s timeout"
    after = f.exec(["pid"])
    assert after["state"] is True and after["result"] != before["result"]
    assert len(rig.plugin.events("exec", what="die")) == 1, "a call that killed its worker was retried"
    row = rig.row(symbol=rig.plugin.fn)
    assert (row["state"], row["restarts"], row["pid"]) == ("running", 1, after["result"])


def test_a_function_worker_killed_from_outside_during_exec(make_rig):
    rig = make_rig(call_deadline=5.0)
    f = rig.host.start_function(rig.plugin.fn)
    replies: List[dict] = []
    caller = threading.Thread(target=lambda: replies.append(f.exec(["hang"])), daemon=True)
    caller.start()
    [ev] = wait_until(lambda: rig.plugin.events("exec", what="hang"), 5, 0.01, "the call to start")
    t0 = time.monotonic()
    os.kill(ev["pid"], signal.SIGKILL)
    caller.join(5)
    timing("function worker SIGKILLed mid-call -> error reply", time.monotonic() - t0)
    assert replies and replies[0]["state"] is False and "signal 9 (SIGKILL)" in replies[0]["result"]
    assert time.monotonic() - t0 < 1.0
    assert f.exec(["pid"])["result"] != ev["pid"]
    assert len(rig.plugin.events("exec", what="hang")) == 1


def test_an_endless_exec_is_answered_after_call_deadline_and_the_worker_replaced(make_rig):
    rig = make_rig(call_deadline=1.0)
    f = rig.host.start_function(rig.plugin.fn)
    before = f.exec(["pid"])["result"]
    t0 = time.monotonic()
    reply = f.exec(["hang"])
    took = time.monotonic() - t0
    timing("endless exec: call -> error reply (call_deadline 1.0)", took)
    assert reply["state"] is False and "call_deadline 1" in reply["result"] and rig.plugin.fn in reply["result"]
    assert 1.0 <= took < 2.0
    after = f.exec(["pid"])
    assert after["state"] is True and after["result"] != before
    wait_until(lambda: not psutil.pid_exists(before) or psutil.Process(before).status() == "zombie",
               5, 0.02, "the hung worker to be gone")
    row = rig.wait_row("restart counted", symbol=rig.plugin.fn, restarts_min=1)
    assert row["restart_causes"] == {"deadline": 1}
    assert len(rig.plugin.events("exec", what="hang")) == 1


# --- 5. flapping ----------------------------------------------------------------------------------

def test_a_source_that_always_fails_is_marked_failed_after_flap_max_restarts(make_rig, unique):
    rig = make_rig(flap_max_restarts=3, flap_window=30.0)
    rule = f"r_{unique}"
    rig.host.start_source("src", rule, config={"open_fault": "raise"})
    row = rig.wait_row("the source to be marked failed", rule=rule, state="failed")
    assert row["restarts"] == 4 and row["pid"] is None  # the 4th crash failed it
    assert "failed: worker ended 4 times within 30s (flap_max_restarts 3)" in row["last_error"]
    assert "open raised RuntimeError: injected fault in open of rule " + rule in row["last_error"]
    assert len(rig.plugin.events("open", rule=rule)) == 4  # the first start and 3 restarts
    assert len(rig.log_texts("next try in 60s")) == 1
    deadline = time.monotonic() + 0.5  # several backoff periods: nothing starts it again
    while time.monotonic() < deadline:
        assert rig.row(rule=rule)["state"] == "failed"
        assert len(rig.plugin.events("open", rule=rule)) == 4


def test_a_source_exiting_with_code_5_is_restarted_with_backoff_not_recycled(make_rig, unique):
    rig = make_rig(flap_max_restarts=3, flap_window=30.0, max_calls=10)
    rule = f"r_{unique}"
    rig.host.start_source("src", rule, config={"open_fault": "exit5"})
    row = rig.wait_row("the source to be marked failed", rule=rule, state="failed")
    # the 4th failed it, and counts as the metrics count it (retried after failed_retry_min)
    assert row["restarts"] == 4 and row["restart_causes"] == {"exit": 4}
    assert "exit code 5" in row["last_error"]
    assert len(rig.plugin.events("open", rule=rule)) == 4  # the first start and 3 restarts
    assert rig.log_texts("recycling worker") == []


def test_an_identical_call_after_eKuiper_gave_up_on_a_killed_one_is_run(make_rig):  # noqa: N802
    """call_deadline above eKuiper's receive timeout: eKuiper has reported its timeout and
    given the call up before the worker is killed, so the same call sent next is a new one."""
    rig = make_rig(host_options={"recv_timeout": 1.0}, ekuiper_recv_timeout=1.0, call_deadline=1.5)
    f = rig.host.start_function(rig.plugin.fn)
    pid = f.exec(["pid"])["result"]
    with pytest.raises(HostError, match="time out"):
        f.exec(["hang_once", "m"])
    rig.wait_row("the hung worker to be replaced", symbol=rig.plugin.fn, state="running", restarts_min=1)
    reply = f.exec(["hang_once", "m"])                      # the same bytes, a new call
    assert reply["state"] is True and reply["result"] != pid
    assert len(rig.plugin.events("exec", what="hang_once")) == 2


def test_a_function_that_cannot_start_again_fails_and_answers_at_once(make_rig):
    rig = make_rig(flap_max_restarts=3, flap_window=30.0, call_deadline=2.0)
    f = rig.host.start_function(rig.plugin.flaky)
    assert f.exec(["pid"])["state"] is True
    reply = f.exec(["die", "exit"])
    assert reply["state"] is False
    row = rig.wait_row("the function to be marked failed", symbol=rig.plugin.flaky, state="failed")
    # the crash and 3 failed restarts; the last one failed it
    assert row["restarts"] == 4 and "flaky factory refuses to start again" in row["last_error"]
    for _ in range(3):
        t0 = time.monotonic()
        reply = f.exec(["pid"])
        took = time.monotonic() - t0
        assert reply["state"] is False and "has failed" in reply["result"]
        assert rig.plugin.flaky in reply["result"] and "flaky factory refuses" in reply["result"]
        assert took < 0.5, f"a failed function must answer at once, took {took:.2f}s"
    timing("failed function: call -> error reply", took)


def test_a_failed_sink_answers_every_item_with_one_error_ack(make_rig, unique):
    rig = make_rig(flap_max_restarts=2, flap_window=30.0, restart_backoff_min=0.2)
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, config={"restart_open_fault": "raise"}, require_ack=True)
    doomed = {"i": 1, "die": "raise", "mode": "always"}  # its worker dies; restarts fail in open
    early = [sink.collect(json.dumps(doomed).encode(), timeout=5)]
    row = rig.wait_row("the sink to be marked failed", rule=rule, state="failed")
    assert row["restarts"] == 3 and "open failed: RuntimeError" in row["last_error"]  # the 3rd failed it
    later = [sink.collect(json.dumps({"i": i}).encode(), timeout=5) for i in (2, 3)]
    for ack in early + later:  # the item in flight when it failed too, not only later ones
        assert set(ack) == {"error"} and "has failed" in ack["error"], ack
        assert "open failed: RuntimeError" in ack["error"] and rule in ack["error"]
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.3)
    assert rig.plugin.events("collect", rule=rule) == []
    assert rig.row(rule=rule)["errors"] == 3
    assert len(rig.log_texts(r"dropped 1 unfinished item\(s\)")) == 1


# --- 6. liveness ----------------------------------------------------------------------------------

def test_a_stopped_worker_is_detected_by_missed_heartbeats_killed_and_restarted(make_rig, unique):
    # stop_grace 30: a stopped worker cannot use a grace, so it is SIGKILLed without one
    # (the replacement must run within wait_row's 5 s)
    rig = make_rig(heartbeat_interval=0.1, heartbeat_misses=3, stop_grace=30.0)
    rule = f"r_{unique}"
    src = rig.host.start_source("src", rule, config={"interval": 0.01})
    first = src.recv()["message"]
    os.kill(first["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        row = rig.wait_row("the stopped worker to be replaced", rule=rule, state="running", restarts_min=1)
    finally:
        if psutil.pid_exists(first["pid"]):
            os.kill(first["pid"], signal.SIGCONT)
    took = time.monotonic() - t0
    timing("SIGSTOP -> replacement running (limit 0.3 s + kill)", took)
    assert row["pid"] != first["pid"] and row["restart_causes"] == {"hang": 1}
    [kill] = rig.log_texts(rf"killing worker pid {first['pid']}: hung: no heartbeat")
    assert kill["rule"] == rule
    # the exit report (test_every_restart_and_kill_is_logged_once checks its log line)
    assert re.match(rf"worker pid {first['pid']} signal 9 \(SIGKILL\): hung: no heartbeat",
                    row["last_error"]), row["last_error"]
    while src.recv()["message"]["pid"] != row["pid"]:
        pass


def test_a_source_whose_open_is_quiet_for_long_is_not_killed(make_rig, unique):
    rig = make_rig(heartbeat_interval=0.1, heartbeat_misses=3)
    rule = f"r_{unique}"
    t0 = time.monotonic()
    src = rig.host.start_source("src", rule, config={"quiet": 1.2, "interval": 0.01})
    first = src.recv(timeout=5)["message"]
    assert time.monotonic() - t0 >= 1.2 and first["n"] == 1
    [opened] = rig.plugin.events("open", rule=rule)
    assert opened["pid"] == first["pid"]
    row = rig.row(rule=rule)
    assert (row["restarts"], row["pid"]) == (0, first["pid"])
    assert rig.log_texts("killing worker") == []


# --- 7. resource limits ---------------------------------------------------------------------------

def test_a_function_over_memory_limit_is_recycled_without_failing_a_call(make_rig):
    rig = make_rig(memory_limit_mb=100, sample_interval=0.1,
                   heartbeat_misses=30)  # touching 150 MiB holds the GIL: not a hang
    f = rig.host.start_function(rig.plugin.fn)
    first = f.exec(["alloc", 150])
    assert first["state"] is True, first
    t0 = time.monotonic()
    replies = []
    while time.monotonic() - t0 < 5:
        replies.append(f.exec(["pid"]))
        if replies[-1]["result"] != first["result"]:
            break
    timing("memory over limit -> calls served by a new worker", time.monotonic() - t0)
    assert all(r["state"] is True for r in replies), replies
    assert replies[-1]["result"] != first["result"], "the worker was not recycled"
    assert len(rig.log_texts(rf"recycling worker pid {first['result']}: resident memory \d+ MiB over "
                             r"memory_limit_mb 100")) == 1
    row = rig.row(symbol=rig.plugin.fn)
    assert (row["restarts"], row["errors"], row["state"]) == (0, 0, "running")
    assert f.exec(["pid"])["result"] == replies[-1]["result"]  # the new worker stays


def test_max_calls_recycles_a_function_worker_after_n_calls(make_rig):
    rig = make_rig(max_calls=5)
    f = rig.host.start_function(rig.plugin.fn)
    replies = [f.exec(["pid"]) for _ in range(12)]
    assert all(r["state"] is True for r in replies), replies
    pids = [r["result"] for r in replies]
    assert pids == [pids[0]] * 5 + [pids[5]] * 5 + [pids[10]] * 2
    assert len({pids[0], pids[5], pids[10]}) == 3
    assert len(rig.log_texts("recycling worker pid .*: served max_calls 5")) == 2
    assert rig.row(symbol=rig.plugin.fn)["errors"] == 0


# --- 8. the eKuiper-facing channel survives worker replacement ------------------------------------

def test_a_restarted_sink_worker_serves_the_same_host_connection(make_rig, unique):
    rig = make_rig(host_options={"data_transport": "nng"})  # the host's pipes are pynng's to inspect
    rule = f"r_{unique}"
    sink = rig.host.start_sink("snk", rule, require_ack=True)
    data_sock, ack_sock = sink._data, sink._ack
    assert sink.collect(b'{"i": 1}') == {}
    pipes = ([p.id for p in data_sock.pipes], [p.id for p in ack_sock.pipes])
    assert sink.collect(b'{"i": 2, "die": "exit", "mode": "once"}') == {}
    assert sink.collect(b'{"i": 3}') == {}
    assert rig.row(rule=rule)["restarts"] == 1
    assert sink._data is data_sock and sink._ack is ack_sock
    assert ([p.id for p in data_sock.pipes], [p.id for p in ack_sock.pipes]) == pipes, \
        "the host's connections must not be re-established"


@pytest.mark.parametrize("transport", ["sp", "nng"])
def test_a_restarted_function_worker_serves_the_same_host_socket(make_rig, transport):
    """eKuiper's REP socket is untouched by a worker restart. Relayed (nng) calls keep the
    supervisor's pipe; a native connection lent to the worker dies with it and is dialed
    again at once (eKuiper's socket takes the new pipe as a reconnect)."""
    rig = make_rig(host_options={"data_transport": "nng"}, transport=transport)
    f = rig.host.start_function(rig.plugin.fn)
    sock = f._sock
    first = f.exec(["pid"])["result"]
    pipes = [p.id for p in sock.pipes]
    assert f.exec(["die", "segv"])["state"] is False
    assert f.exec(["pid"])["result"] != first
    assert f._sock is sock
    wait_until(lambda: len(sock.pipes) == 1, 5, 0.01, "the dead worker's pipe gone (nng removes it asynchronously)")
    if transport == "nng":
        assert [p.id for p in sock.pipes] == pipes


# --- 9. no leaks ----------------------------------------------------------------------------------

def test_start_stop_cycles_and_crashes_leave_the_supervisor_as_it_was(make_rig, unique):
    rig = make_rig(restart_backoff_min=0.001, restart_backoff_max=0.01, flap_max_restarts=1000)
    sup = rig.supervisor()
    f = rig.host.start_function(rig.plugin.fn)

    def cycle(op: str) -> None:
        src = rig.host.start_source("src", f"r_{unique}", op=op, config={"interval": 0.005})
        src.recv()
        src.stop()

    def crash() -> None:
        assert f.exec(["die", "exit"])["state"] is False
        reply = f.exec(["pid"])
        while not reply["state"]:  # the replacement may still be starting
            reply = f.exec(["pid"])

    def measure() -> Dict[str, Any]:
        wait_until(lambda: len(sup.children(recursive=True)) == 2, 5, 0.02,
                   "only the zygote and the function worker")
        zygote = psutil.Process(status.query(rig.plugin.name)["zygote_pid"])
        return {"fds": sup.num_fds(), "threads": sup.num_threads(), "zygote_fds": zygote.num_fds(),
                "ipc": ipc_files(unique), "runtime": sorted(os.listdir(RUN_BASE)),
                "rss": sup.memory_info().rss}

    cycle("warm")
    crash()
    before = measure()
    t0 = time.monotonic()
    for i in range(100):
        cycle(f"o{i % 7}")
    t1 = time.monotonic()
    for _ in range(30):
        crash()
    timing("100 source start/stop cycles", t1 - t0)
    timing("30 function crashes and restarts", time.monotonic() - t1)
    after = measure()
    grown = after["rss"] - before["rss"]
    before.pop("rss"), after.pop("rss")
    before["runtime"] = [e for e in before["runtime"] if rig.plugin.name in e]
    after["runtime"] = [e for e in after["runtime"] if rig.plugin.name in e]
    print(f"LEAKCHECK before {before} after {after} rss growth {grown / 1048576:.2f} MiB")
    assert after == before
    assert grown < 4 * 1048576, f"supervisor memory grew by {grown / 1048576:.1f} MiB"
    assert rig.row(symbol=rig.plugin.fn)["restarts"] == 31


# --- 10. every restart and kill is logged once ----------------------------------------------------

def test_every_restart_and_kill_is_logged_once_with_its_details(make_rig, unique):
    rig = make_rig()
    rule = f"r_{unique}"
    src = rig.host.start_source("src", rule, config={"open_fault": "raise", "once": "m"})
    first = src.recv()["message"]
    [fault] = rig.plugin.events("fault", rule=rule)
    os.kill(first["pid"], signal.SIGKILL)
    second = rig.wait_row("second restart", rule=rule, state="running", restarts=2)
    os.kill(second["pid"], signal.SIGSTOP)
    third = rig.wait_row("hang restart", rule=rule, state="running", restarts=3)
    f = rig.host.start_function(rig.plugin.fn)
    fpid = f.exec(["pid"])["result"]
    assert f.exec(["die", "segv"])["state"] is False
    fpid2 = f.exec(["pid"])["result"]
    assert f.exec(["hang"])["state"] is False  # killed at call_deadline
    f.exec(["pid"])
    sup = str(rig.host.process.pid)

    expected = [  # (rule, symbol, dead pid, status pattern, cause pattern, restart number)
        (rule, "src", fault["pid"], r"exit code 70", r"open raised RuntimeError: injected fault", 1),
        (rule, "src", first["pid"], r"signal 9 \(SIGKILL\)", r"exited unexpectedly", 2),
        (rule, "src", second["pid"], r"signal (15 \(SIGTERM\)|9 \(SIGKILL\))", r"hung: no heartbeat", 3),
        ("-", rig.plugin.fn, fpid, r"signal 11 \(SIGSEGV\)", r"exited unexpectedly", 1),
        ("-", rig.plugin.fn, fpid2, r"signal 9 \(SIGKILL\)", r"call exceeded call_deadline 1s", 2),
    ]
    log = rig.log()
    for want_rule, symbol, pid, how, cause, nth in expected:
        lines = [ln for ln in log if re.search(rf"worker pid {pid} (exit code|signal)", ln["text"])
                 and "restart" in ln["text"]]
        assert len(lines) == 1, (pid, lines)
        line = lines[0]
        assert (line["plugin"], line["symbol"], line["rule"], line["pid"], line["level"]) == \
            (rig.plugin.name, symbol, want_rule, sup, "WARNING")
        assert re.search(rf"worker pid {pid} {how}: .*{cause}.*; restart {nth} in \d+\.\d{{3}}s$",
                         line["text"]), line["text"]
    kills = [(ln["symbol"], ln["rule"], ln["text"].split(": ", 1)[1]) for ln in log
             if "killing worker" in ln["text"]]
    assert len(kills) == 2
    assert kills[0][:2] == ("src", rule) and kills[0][2].startswith(f"killing worker pid {second['pid']}: hung")
    assert kills[1] == (rig.plugin.fn, "-", f"killing worker pid {fpid2}: call exceeded call_deadline 1s")
    restarted = [ln for ln in log if "restarted in worker pid" in ln["text"]]
    restart_pids = [(ln["symbol"], re.search(r"restarted in worker pid (\d+)", ln["text"])[1]) for ln in restarted]
    assert sorted(restart_pids) == sorted(
        [("src", str(p)) for p in (first["pid"], second["pid"], third["pid"])]
        + [(rig.plugin.fn, str(fpid2)), (rig.plugin.fn, str(rig.row(symbol=rig.plugin.fn)["pid"]))])
