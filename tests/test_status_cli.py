"""``kuiper-pool status`` and the Prometheus metrics of a running supervisor.

Each test starts a generated plugin (names unique to the test) through the emulator Host, as
eKuiper would, and asks about it with the real command or a real HTTP GET; ``host_runs``
proves at teardown that no process, ipc file or runtime entry is left.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple

import psutil
import pytest

from conftest import kuiper_pool_cli, kuiper_pool_command, wait_until
import kuiper_pool
from kuiper_pool import paths
from kuiper_pool.runtime import status
from metrics_text import Sample, free_port, scrape, value
from plugins import COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, REPO, make_plugin, read_jsonl, runtime_base

FAST = {"heartbeat_interval": 0.1, "sample_interval": 0.1, "restart_backoff_initial": 0.0,
        "restart_backoff_min": 0.1, "restart_jitter": 0.0, "stop_grace": 1.0}


class Rig:
    """A running plugin with one source, one sink and one function instance."""

    def __init__(self, tmp_path, unique: str, host_runs, **settings) -> None:
        self.plugin, self.rule = f"kp{unique}", f"r{unique}"
        self.src, self.snk, self.fn = f"src{unique}", f"snk{unique}", f"fn{unique}"
        self.items = str(tmp_path / "items.jsonl")
        pd = make_plugin(str(tmp_path), self.plugin, sources={self.src: COUNTING_SOURCE},
                         sinks={self.snk: RECORDING_SINK}, functions={self.fn: MODE_FUNCTION},
                         settings={**FAST, **settings})
        self.host = host_runs.launch(pd)
        self.source = self.host.start_source(self.src, self.rule, op="in", config={"interval": 0.02})
        self.source_pid = self.source.recv()["message"]["pid"]
        self.sink = self.host.start_sink(self.snk, self.rule, op="out", config={"file": self.items},
                                         require_ack=True)
        assert self.sink.collect(b'{"x":1}') == {}
        self.sink_pid = read_jsonl(self.items)[0]["pid"]
        self.function = self.host.start_function(self.fn)
        self.function_pid = self.function.exec(["pid"])["result"]

    def snapshot(self) -> dict:
        proc = kuiper_pool_cli("status", self.plugin, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def instance(self, snap: dict, symbol: str) -> dict:
        (inst,) = [i for i in snap["instances"] if i["symbol"] == symbol]
        return inst


@pytest.fixture
def rig(tmp_path, unique, host_runs) -> Rig:
    return Rig(tmp_path, unique, host_runs)


def test_status_prints_a_table_with_a_row_per_instance(rig):
    # the sink's counter moves when its worker reports the item done, just after the ack
    wait_until(lambda: rig.instance(rig.snapshot(), rig.snk)["items_out"] == 1, timeout=5,
               message="the sink item counted")
    proc = kuiper_pool_cli("status", rig.plugin)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    zygote = psutil.Process(rig.host.process.pid).children()[0].pid
    assert re.match(rf"plugin {rig.plugin}  supervisor pid {rig.host.process.pid}  zygote pid {zygote}  "
                    rf"up \d+s  instances 3  kuiper_pool {re.escape(kuiper_pool.__version__)}$",
                    lines[0]), lines[0]
    cells = [re.split(r" {2,}", ln.strip()) for ln in lines[2:]]  # columns: 2+ spaces apart
    assert cells[0] == ["SYMBOL", "TYPE", "RULE/OP/INST", "PID", "STATE", "UPTIME", "RESTARTS",
                        "RSS", "CPU%", "IN", "OUT", "ERRORS", "LAST ERROR"]
    rows = {row[0]: row for row in cells[1:]}
    assert set(rows) == {rig.src, rig.snk, rig.fn}, proc.stdout
    assert rows[rig.src][:7] == [rig.src, "source", f"{rig.rule}/in/0", str(rig.source_pid), "running",
                                 rows[rig.src][5], "0"]
    assert rows[rig.snk][:7] == [rig.snk, "sink", f"{rig.rule}/out/0", str(rig.sink_pid), "running",
                                 rows[rig.snk][5], "0"]
    assert rows[rig.fn][:7] == [rig.fn, "func", "(all rules)", str(rig.function_pid), "running",
                                rows[rig.fn][5], "0"]
    # IN, OUT, ERRORS: one item collected, one call answered, nothing failed
    assert rows[rig.snk][9:12] == ["1", "1", "0"] and rows[rig.fn][9:12] == ["1", "1", "0"], proc.stdout
    assert int(rows[rig.src][9]) >= 1 and rows[rig.src][12] == "-"


def _documented_schema() -> Tuple[Dict[str, str], List[str], List[str]]:
    """The snapshot schema as kuiper_pool/runtime/status.py documents it: top-level key -> type, the
    instance keys and the keys of a shared worker."""
    head, _, rest = status.__doc__.partition('"instances": [{')
    rest, _, shared = rest.partition('"shared_workers": [{')
    top = dict(re.findall(r'"(\w+)": (str|int|float)', head))
    shared = re.sub(r": \[\{.*?\}\]", "", shared.partition("}]}")[0], flags=re.S)  # not its instances' keys
    return top, re.findall(r'"(\w+)"', rest), re.findall(r'"(\w+)"', shared)


def documented_shared_worker_keys() -> List[str]:
    return _documented_schema()[2]


def test_status_json_follows_the_documented_schema(rig):
    top, instance_keys, shared_keys = _documented_schema()
    assert top and len(instance_keys) >= 10 and len(shared_keys) >= 5, "could not read the schema from status.__doc__"
    snap = rig.snapshot()
    assert set(snap) == set(top) | {"instances", "shared_workers"}
    assert snap["shared_workers"] == []  # every worker here is an instance's own
    types = {"str": str, "int": int, "float": (int, float)}
    for key, kind in top.items():
        assert isinstance(snap[key], types[kind]), (key, snap[key])
    assert snap["plugin"] == rig.plugin and snap["pid"] == rig.host.process.pid
    assert snap["zygote_pid"] == psutil.Process(rig.host.process.pid).children()[0].pid
    assert len(snap["instances"]) == 3
    for inst in snap["instances"]:
        assert list(inst) == instance_keys, inst
        assert inst["state"] == "running" and inst["restarts"] == 0 and inst["restart_causes"] == {}
    by_symbol = {i["symbol"]: i for i in snap["instances"]}
    assert (by_symbol[rig.src]["type"], by_symbol[rig.src]["rule"], by_symbol[rig.src]["op"],
            by_symbol[rig.src]["instance"], by_symbol[rig.src]["pid"]) == (
        "source", rig.rule, "in", 0, rig.source_pid)
    assert (by_symbol[rig.fn]["type"], by_symbol[rig.fn]["pid"]) == ("func", rig.function_pid)
    assert by_symbol[rig.snk]["pid"] == rig.sink_pid


@pytest.mark.parametrize("command", ["status", "restart", "reload"])
def test_a_plugin_that_is_not_running_fails_in_one_line_saying_where_we_looked(tmp_path, unique, command):
    proc = kuiper_pool_cli(command, f"kp{unique}")
    assert proc.returncode == 1 and proc.stdout == ""
    base = runtime_base()
    path = os.path.join(base, f"kp{unique}.sock")
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"kuiper-pool {command}: no kuiper_pool supervisor is running for plugin "
                           f"kp{unique} (no {path}); looked in {base} and {base}-* (uid {os.getuid()}, ")
    assert "<runtime_dir or TMPDIR or /tmp>/kuiper_pool-<uid of the user eKuiper runs as>" in line
    # the runtime dir as chosen: by --runtime-dir, else by TMPDIR
    proc = kuiper_pool_cli(command, f"kp{unique}", "--runtime-dir", tmp_path)
    assert f"looked in {tmp_path}/kuiper_pool-{os.getuid()} and " in proc.stderr
    assert f"(uid {os.getuid()}, --runtime-dir {tmp_path})" in proc.stderr
    proc = kuiper_pool_cli(command, f"kp{unique}", env={"TMPDIR": str(tmp_path)})
    assert f"(uid {os.getuid()}, TMPDIR={tmp_path})" in proc.stderr and "Traceback" not in proc.stderr


def test_status_with_the_stale_socket_of_a_killed_supervisor_fails_in_one_line(unique):
    paths.private_base()  # 0700, ours
    path = os.path.join(runtime_base(), f"kp{unique}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)  # bound, never listening: what a SIGKILLed supervisor leaves
        sock.close()
        proc = kuiper_pool_cli("status", f"kp{unique}", "--json")
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.splitlines() == [
            f"kuiper-pool status: the supervisor of plugin kp{unique} is not running (stale {path})"]
    finally:
        sock.close()
        os.unlink(path)


def test_metrics_count_items_and_restarts_by_cause(tmp_path, unique, host_runs):
    port = free_port()
    rig = Rig(tmp_path, unique, host_runs, metrics_address=f"127.0.0.1:{port}")
    p = rig.plugin
    wait_until(lambda: value(scrape(f"http://127.0.0.1:{port}/metrics"), "kuiper_pool_items_in_total", symbol=rig.snk) == 1
               and value(scrape(f"http://127.0.0.1:{port}/metrics"), "kuiper_pool_items_out_total", symbol=rig.fn) == 1
               and value(scrape(f"http://127.0.0.1:{port}/metrics"), "kuiper_pool_items_in_total", symbol=rig.src) >= 1,
               timeout=10, message="the items of all three instances in the metrics")
    first = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(first, "kuiper_pool_up", plugin=p) == 1
    import kuiper_pool

    assert value(first, "kuiper_pool_build_info", plugin=p, version=kuiper_pool.__version__) == 1
    assert 0 < time.time() - value(first, "kuiper_pool_start_time_seconds", plugin=p) < 600
    for sym, kind, rule, op in ((rig.src, "source", rig.rule, "in"), (rig.snk, "sink", rig.rule, "out"),
                                (rig.fn, "func", "", "")):
        where = dict(plugin=p, symbol=sym, type=kind, rule=rule, op=op, instance="0")
        states = {dict(ls)["state"]: v for (n, ls), v in first.items()
                  if n == "kuiper_pool_instance_state" and set(where.items()) <= ls}
        assert states == {"starting": 0, "running": 1, "killing": 0, "backoff": 0, "recycling": 0,
                          "stopping": 0, "failed": 0, "ended": 0}
        # every cause from the start, at 0: increase() sees the first restart
        assert {c: value(first, "kuiper_pool_restarts_total", cause=c, **where)
                for c in ("exit", "signal", "hang", "deadline")} == dict.fromkeys(
                    ("exit", "signal", "hang", "deadline"), 0)
        assert value(first, "kuiper_pool_resident_memory_bytes", symbol=sym) > 0
    wait_until(lambda: value(scrape(f"http://127.0.0.1:{port}/metrics"), "kuiper_pool_cpu_seconds_total", symbol=rig.src) > 0,
               timeout=10, message="the source's CPU time sampled")
    # the source's worker is killed by a signal, the function's worker exits in a call
    os.kill(rig.source_pid, signal.SIGKILL)
    assert rig.function.exec(["exit", 3])["state"] is False

    def restarted() -> Optional[Sample]:  # the text is sampled every sample_interval: poll it
        now = scrape(f"http://127.0.0.1:{port}/metrics")
        return now if (value(now, "kuiper_pool_restarts_total", symbol=rig.src, cause="signal") == 1
                       and value(now, "kuiper_pool_restarts_total", symbol=rig.fn, cause="exit") == 1
                       and value(now, "kuiper_pool_errors_total", symbol=rig.fn) == 1) else None
    # the function's error: the call its worker died in
    after = wait_until(restarted, timeout=10, message="both restarts, by cause, and the error in the metrics")
    assert value(after, "kuiper_pool_restarts_total", symbol=rig.snk, cause="signal") == 0
    snap = rig.snapshot()
    assert rig.instance(snap, rig.src)["restart_causes"] == {"signal": 1}
    assert rig.instance(snap, rig.fn)["restart_causes"] == {"exit": 1}
    head = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as r:  # as GET, without the body
        assert r.status == 200 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert e.value.code == 404
    e.value.close()
    rig.host.close()  # as eKuiper stops a plugin: SIGKILL; the port goes with the supervisor

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return False
        except ConnectionRefusedError:
            return True
    wait_until(refused, timeout=5, message=f"port {port} closed")


def test_status_watch_refreshes_until_the_plugin_goes_away(rig, reaper):
    proc = subprocess.Popen(kuiper_pool_command() + ["status", rig.plugin, "--watch", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reaper(proc.pid)
    seen: List[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    header = f"plugin {rig.plugin}  supervisor pid {rig.host.process.pid}"
    wait_until(lambda: sum(header in ln for ln in list(seen)) >= 2, timeout=15,
               message="two refreshes of the table")
    assert proc.poll() is None
    rig.host.close()
    assert proc.wait(timeout=15) == 1
    reader.join(timeout=5)
    errors = proc.stderr.read().splitlines()
    assert len(errors) == 1 and errors[0].startswith("kuiper-pool status: ") and rig.plugin in errors[0], errors
    proc.stderr.close()
    proc.stdout.close()


# --- the status socket under hostile conditions, and kuiper-pool restart ---------------------------

def test_a_plugin_name_too_long_for_a_unix_socket_path_still_has_status(tmp_path, unique, host_runs):
    name = ("kp" + unique + "x" * 90)[:91]  # eKuiper allows it; AF_UNIX paths do not
    pd = make_plugin(str(tmp_path), name, functions={f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(pd)
    assert host.start_function(f"fn{unique}").exec(["echo", 1])["result"] == 1
    proc = kuiper_pool_cli("status", name, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugin"] == name


@pytest.fixture
def short_dir():
    """A runtime_dir short enough for Unix socket paths (pytest's tmp_path is not)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = tempfile.mkdtemp(prefix="kpt", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_a_squatted_private_directory_falls_back_to_a_fresh_one(tmp_path, short_dir, unique, host_runs):
    base = short_dir
    squatted = base / f"kuiper_pool-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chmod(squatted, 0o777)                     # open to everyone: not ours to trust
    os.chown(squatted, 65534, 65534)              # and another user's
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     settings={"runtime_dir": str(base)})
    host = host_runs.launch(pd, stdout=open(tmp_path / "log", "ab"))
    assert host.start_function(f"fn{unique}").exec(["echo", 1])["result"] == 1
    proc = kuiper_pool_cli("status", f"kp{unique}", "--json", "--runtime-dir", str(base))
    assert proc.returncode == 0, proc.stderr
    assert list(squatted.iterdir()) == []
    (fallback,) = [p for p in base.iterdir() if p.name.startswith(f"kuiper_pool-{os.getuid()}-")]
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700
    log = (tmp_path / "log").read_text()
    assert f"{squatted} is not a private directory" in log and str(fallback) in log


def test_status_clients_that_never_read_do_not_stall_the_plugin(rig):
    path = paths.status_socket(rig.plugin)
    stalled = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(path)
        s.sendall(b'{"cmd": "status"}\n')  # asks, then never reads the answer
        stalled.append(s)
    try:
        for i in range(200):  # every call is answered, as fast as eKuiper asks
            assert rig.function.exec(["echo", i], ) == {"state": True, "result": i}
        assert rig.snapshot()["plugin"] == rig.plugin  # and a polite client still gets status
    finally:
        for s in stalled:
            s.close()


def test_the_status_socket_is_0600_even_under_umask_0(tmp_path, unique, host_runs):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     main_code="import os\nos.umask(0)\n")
    host = host_runs.launch(pd)
    host.start_function(f"fn{unique}").exec(["echo", 1])
    path = paths.status_socket(f"kp{unique}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_restart_brings_a_failed_function_back_and_replaces_running_workers(tmp_path, unique, host_runs):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     sources={f"src{unique}": COUNTING_SOURCE},
                     settings={**FAST, "flap_max_restarts": 1, "flap_window": 60.0})
    host = host_runs.launch(pd)
    fn = host.start_function(f"fn{unique}")
    src = host.start_source(f"src{unique}", f"r{unique}", config={"interval": 0.02})
    first_src = src.recv()["message"]["pid"]
    for _ in range(2):
        assert fn.exec(["exit"])["state"] is False
    wait_until(lambda: fn.exec(["echo", 1])["state"] is False
               and "has failed" in fn.exec(["echo", 1])["result"], message="the function to fail")
    proc = kuiper_pool_cli("restart", f"kp{unique}", f"fn{unique}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"plugin kp{unique} function fn{unique}: failed: restarting"
    wait_until(lambda: fn.exec(["echo", 2]) == {"state": True, "result": 2},
               message="the function to serve again")
    proc = kuiper_pool_cli("restart", f"kp{unique}")  # everything: the source's worker is replaced
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2, proc.stdout
    wait_until(lambda: src.recv()["message"]["pid"] != first_src, message="a new source worker")
    proc = kuiper_pool_cli("restart", f"kp{unique}", "nosuch")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.splitlines() == [
        f"kuiper-pool restart: plugin kp{unique} has no symbol nosuch; its symbols: sources src{unique}; "
        f"functions fn{unique}"]


def test_status_says_when_errors_and_restarts_happened_and_when_the_next_try_is(tmp_path, unique,
                                                                               host_runs):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     settings={**FAST, "flap_max_restarts": 1, "flap_window": 60.0,
                               "failed_retry_min": 300.0})
    host = host_runs.launch(pd)
    fn = host.start_function(f"fn{unique}")
    for _ in range(2):
        assert fn.exec(["exit", 3])["state"] is False
    wait_until(lambda: status.query(f"kp{unique}")["instances"][0]["state"] == "failed",
               message="the function to fail")
    proc = kuiper_pool_cli("status", f"kp{unique}", "--json")
    (inst,) = json.loads(proc.stdout)["instances"]
    now = json.loads(proc.stdout)["time"]
    assert [r["cause"] for r in inst["recent_restarts"]] == ["exit", "exit"]
    assert all(now - 60 < r["at"] <= now and "exit code 3" in r["error"] for r in inst["recent_restarts"])
    assert now - 60 < inst["last_error_at"] <= now and 200 < inst["next_retry_at"] - now <= 300
    full = inst["last_error"]
    assert full.startswith("failed: worker ended 2 times within 60s (flap_max_restarts 1); last worker "
                           "pid ") and len(full) > 60
    table = kuiper_pool_cli("status", f"kp{unique}").stdout
    row = re.split(r" {2,}", table.splitlines()[3])
    at = time.strftime("%H:%M:%S", time.localtime(inst["recent_restarts"][-1]["at"]))
    error_at = time.strftime("%H:%M:%S", time.localtime(inst["last_error_at"]))
    assert re.fullmatch(r"failed, retry in (4m\d\ds|5m00s)", row[4]), table
    assert row[6] == f"2 (2 exit) last {at}", table  # the crash that failed it counts too
    # LAST ERROR: when, then the text cut at a word boundary; --json has it whole
    assert row[12].startswith(f"{error_at} failed: worker ended 2 times") and row[12].endswith("..."), table
    cut = row[12][len(error_at) + 1:-3]
    assert full.startswith(cut) and full[len(cut)] in " ,;:" and len(cut) <= 60, (cut, full)
    assert table.splitlines()[-1] == f"(LAST ERROR is cut; kuiper-pool status kp{unique} --json has it whole)"
    proc = kuiper_pool_cli("restart", f"kp{unique}", f"nofn{unique}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"kuiper-pool restart: plugin kp{unique} has no symbol nofn{unique}; its symbols: functions fn{unique}")


def test_workers_are_named_by_plugin_kind_and_symbol_in_ps_also_after_a_reload(rig):
    def titles() -> Dict[str, str]:
        """Each instance's worker's title ({} while one is being replaced)."""
        try:
            return {i["symbol"]: psutil.Process(i["pid"]).cmdline()[0]
                    for i in rig.snapshot()["instances"] if i["pid"] and i["state"] == "running"}
        except psutil.NoSuchProcess:
            return {}

    expected = {rig.src: f"kuiper-pool {rig.plugin} source {rig.src} {rig.rule}/in/0",
                rig.snk: f"kuiper-pool {rig.plugin} sink {rig.snk} {rig.rule}/out/0",
                rig.fn: f"kuiper-pool {rig.plugin} function {rig.fn}"}
    assert titles() == expected
    assert psutil.Process(rig.function_pid).name() == rig.fn[:15]  # top's name: the symbol
    proc = kuiper_pool_cli("reload", rig.plugin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_until(lambda: rig.function.exec(["pid"])["result"] != rig.function_pid,
               message="a worker of the reloaded code")
    # forked from the fresh zygote (`-m kuiper_pool.runtime.zygote`)
    wait_until(lambda: titles() == expected, message=f"every worker named as before: {titles()}")


def test_version_names_the_package_version():
    import kuiper_pool

    proc = kuiper_pool_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"kuiper-pool {kuiper_pool.__version__}"


def test_restart_with_an_empty_or_non_string_symbol_restarts_nothing(tmp_path, unique, host_runs):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(pd)
    fn = host.start_function(f"fn{unique}")
    pid = fn.exec(["pid"])["result"]
    proc = kuiper_pool_cli("restart", f"kp{unique}", "")
    assert proc.returncode == 2 and "restart needs a symbol name or none (got '')" in proc.stderr
    answer = status.request(f"kp{unique}", {"cmd": "restart", "symbol": 5})
    assert answer == {"error": "restart needs a symbol name or none (got 5)", "usage": True}
    assert fn.exec(["pid"])["result"] == pid
    assert status.query(f"kp{unique}")["instances"][0]["restarts"] == 0


def test_a_symbols_entry_for_a_symbol_the_plugin_lacks_stops_the_start(tmp_path, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"heavy{unique}": MODE_FUNCTION},
                     yaml_settings={"symbols": {f"heavvy{unique}": {"call_deadline": 10}}})
    proc = subprocess.run([sys.executable, "main.py"], cwd=pd, stdout=subprocess.PIPE, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        f"kuiper_pool: cannot start: kuiper_pool config: symbols.heavvy{unique} names no symbol of the "
        f"plugin (from {pd}/kuiper_pool.yaml; it has heavy{unique}); did you mean heavy{unique}?"]


def test_after_six_kills_status_and_the_metrics_both_count_six_restarts(tmp_path, unique, host_runs):
    port = free_port()
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     settings={**FAST, "heartbeat_interval": 1.0,  # no hang on a busy machine
                               "flap_max_restarts": 5, "flap_window": 120.0,
                               "metrics_address": f"127.0.0.1:{port}"})
    host = host_runs.launch(pd)
    fn = host.start_function(f"fn{unique}")
    url = f"http://127.0.0.1:{port}/metrics"
    for kill in range(1, 7):  # the 6th fails the instance (more than flap_max_restarts)
        pid = wait_until(lambda: status.query(f"kp{unique}")["instances"][0]["pid"], timeout=15,
                         message=f"a worker to kill ({kill})")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: status.query(f"kp{unique}")["instances"][0]["restarts"] == kill, timeout=15,
                   message=f"restart {kill} counted")
    (row,) = status.query(f"kp{unique}")["instances"]
    assert row["state"] == "failed" and row["restarts"] == 6 and row["restart_causes"] == {"signal": 6}
    wait_until(lambda: value(scrape(url), "kuiper_pool_restarts_total", cause="signal") == 6
               and value(scrape(url), "kuiper_pool_instance_state", state="failed") == 1,
               timeout=10, message="six restarts and the failed state in the metrics")
    assert sum(v for (n, _ls), v in scrape(url).items() if n == "kuiper_pool_restarts_total") == 6
    assert fn.exec(["echo", 1])["state"] is False  # failed: answered at once with an error
