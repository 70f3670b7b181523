"""``kuiper-pool reload`` and SIGHUP: the plugin's code as it is on disk now, served without
stopping a rule, losing a sink item or failing a function call.

Each test runs a generated plugin through the emulator Host, as eKuiper would; the new code
is a changed ``version.py`` next to the main script, as an operator would install it.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from typing import Dict, List

import psutil
import pytest

from conftest import kuiper_pool_cli, wait_until
from kuiper_pool.runtime.status import request
from plugins import RECORDING_SINK, make_plugin, read_jsonl

FAST = {"heartbeat_interval": 0.1, "restart_backoff_initial": 0.0, "restart_backoff_min": 0.1,
        "restart_jitter": 0.0, "stop_grace": 2.0}

VERSION_FUNCTION = '''
class VersionFunction(Function):
    """exec: [anything] -> [version.VERSION, pid, args]."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        import version
        return [version.VERSION, os.getpid(), args]

    def is_aggregate(self):
        return False
'''

VERSION_SOURCE = '''
class VersionSource(Source):
    """Emits {"version", "pid"} every 20 ms."""

    def __init__(self):
        self.stopped = threading.Event()

    def configure(self, datasource, conf):
        pass

    def open(self, ctx):
        import version
        while not self.stopped.is_set():
            ctx.emit({"version": version.VERSION, "pid": os.getpid()}, None)
            self.stopped.wait(0.02)

    def close(self, ctx):
        self.stopped.set()
'''


class Rig:
    """A plugin with a versioned source and function and a recording sink."""

    def __init__(self, tmp_path, unique: str, host_runs, **settings) -> None:
        self.name, self.rule = f"kp{unique}", f"r{unique}"
        self.src, self.snk, self.fn = f"src{unique}", f"snk{unique}", f"fn{unique}"
        self.items = str(tmp_path / "items.jsonl")
        self.dir = make_plugin(str(tmp_path), self.name, sources={self.src: VERSION_SOURCE},
                               sinks={self.snk: RECORDING_SINK}, functions={self.fn: VERSION_FUNCTION},
                               extra_modules={"version": 'VERSION = "v1"\n'},
                               main_code="import version  # noqa: F401",
                               settings={**FAST, **settings})
        self.host = host_runs.launch(self.dir)
        self.source = self.host.start_source(self.src, self.rule, op="in")
        self.sink = self.host.start_sink(self.snk, self.rule, op="out", config={"file": self.items},
                                         require_ack=True)
        self.function = self.host.start_function(self.fn)

    def install(self, text: str) -> None:
        with open(os.path.join(self.dir, "version.py"), "w") as f:
            f.write(text)

    def call(self) -> list:
        reply = self.function.exec(["x"])
        assert reply["state"] is True, reply
        return reply["result"]

    def reload(self, *flags: str):
        return kuiper_pool_cli("reload", self.name, *flags, timeout=90)


def test_reload_under_load_loses_no_item_and_fails_no_call(tmp_path, unique, host_runs, transport):
    rig = Rig(tmp_path, unique, host_runs)
    old_fn_pid = rig.call()[1]
    old_src_pid = rig.source.recv()["message"]["pid"]
    counts: Dict[str, int] = {"sent": 0, "acked": 0, "ack_errors": 0, "calls": 0, "answered": 0,
                              "failed": 0}
    failures: List[dict] = []
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            rig.sink.send(b'{"n":%d}' % counts["sent"])
            counts["sent"] += 1

    def read_acks() -> None:
        while not stop.is_set() or counts["acked"] + counts["ack_errors"] < counts["sent"]:
            ack = rig.sink.recv_ack(timeout=10)
            counts["acked" if ack == {} else "ack_errors"] += 1

    def call() -> None:
        while not stop.is_set():
            counts["calls"] += 1
            reply = rig.function.exec(["n", counts["calls"]])
            if reply["state"] is True and reply["result"][2] == ["n", counts["calls"]]:
                counts["answered"] += 1
            else:
                counts["failed"] += 1
                failures.append(reply)

    threads = [threading.Thread(target=t, daemon=True) for t in (feed, read_acks, call)]
    for t in threads:
        t.start()
    wait_until(lambda: counts["acked"] > 200 and counts["answered"] > 50, timeout=30,
               message="the rule to run at full rate")
    rig.install('VERSION = "v2"\n')
    proc = rig.reload()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"plugin {rig.name}: reloaded: 3 instance(s) replaced"), proc.stdout
    before = dict(counts)
    wait_until(lambda: counts["acked"] > before["acked"] + 200 and counts["answered"] > before["answered"] + 50,
               timeout=30, message="the rule to go on at full rate after the reload")
    stop.set()
    for t in threads:
        t.join(30)
    print(f"reload under load: {counts}")
    recorded = [r["data"] for r in read_jsonl(rig.items, "item")]
    assert counts["ack_errors"] == 0 and counts["failed"] == 0, failures[:3]
    assert counts["acked"] == counts["sent"] and counts["answered"] == counts["calls"]
    assert sorted(set(recorded)) == sorted(b'{"n":%d}'.decode() % i for i in range(counts["sent"]))
    version, pid, _args = rig.call()
    assert version == "v2" and pid != old_fn_pid
    wait_until(lambda: rig.source.recv()["message"]["version"] == "v2", message="the source on v2")
    assert {r["pid"] for r in read_jsonl(rig.items, "item")[-1:]} != {old_src_pid}


def test_code_that_does_not_import_or_validate_changes_nothing(tmp_path, unique, host_runs):
    rig = Rig(tmp_path, unique, host_runs)
    version, pid, _ = rig.call()
    rig.install("VERSION = (\n")  # a syntax error
    proc = rig.reload()
    assert proc.returncode == 1 and len(proc.stdout.splitlines()) == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"plugin {rig.name}: reload refused, nothing changed: ")
    assert "SyntaxError" in proc.stdout
    with open(os.path.join(rig.dir, "main.py")) as f:
        main = f.read()
    rig.install('VERSION = "v2"\n')
    with open(os.path.join(rig.dir, "main.py"), "w") as f:  # the function is gone in the new code
        f.write(main.replace(f"'{rig.fn}': lambda: VersionFunction()", ""))
    proc = rig.reload("--check")
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f"plugin {rig.name}: reload check failed: the new code has no "
                                   f"function named {rig.fn}")
    with open(os.path.join(rig.dir, "main.py"), "w") as f:  # its factory raises in the new code
        f.write(main.replace("lambda: VersionFunction()", "lambda: 1 / 0"))
    proc = rig.reload()
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f"plugin {rig.name}: reload refused, nothing changed: the new "
                                   f"code's function {rig.fn}: the factory raised ZeroDivisionError: "
                                   f"division by zero")
    with open(os.path.join(rig.dir, "kuiper_pool.yaml"), "w") as f:
        f.write("call_deadline: -1\n")
    with open(os.path.join(rig.dir, "main.py"), "w") as f:
        f.write(main)
    proc = rig.reload()
    assert proc.returncode == 1 and "call_deadline must be a number >= 0.01" in proc.stdout, proc.stdout
    assert rig.call()[:2] == [version, pid]  # still the old code, the same worker
    os.unlink(os.path.join(rig.dir, "kuiper_pool.yaml"))
    proc = rig.reload("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"plugin {rig.name}: reload check passed: the new code serves all 3 instance(s)"
    assert rig.call()[:2] == [version, pid]  # --check only validates


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_sighup_reloads(tmp_path, unique, host_runs, start_method):
    rig = Rig(tmp_path, unique, host_runs, start_method=start_method)
    assert rig.call()[0] == "v1"
    rig.install('VERSION = "v3"\n')
    os.kill(rig.host.process.pid, signal.SIGHUP)
    wait_until(lambda: rig.call()[0] == "v3", timeout=30, message="the function on the new code")
    wait_until(lambda: rig.source.recv()["message"]["version"] == "v3", message="the source on v3")


def test_a_reload_s_outcome_is_answered_after_a_sighup_s_reload_began(tmp_path, unique, host_runs):
    """``kuiper-pool reload`` polls its own reload by id; a SIGHUP's reload that begins between
    two polls (an operator's ``pkill -HUP`` meanwhile) must not turn it into "no reload 1"."""
    rig = Rig(tmp_path, unique, host_runs)

    def outcome(rid: int) -> dict:
        return request(rig.name, {"cmd": "reload_status", "id": rid})

    first = request(rig.name, {"cmd": "reload"})["id"]
    wait_until(lambda: outcome(first)["done"], timeout=60, message="the first reload to finish")
    os.kill(rig.host.process.pid, signal.SIGHUP)
    wait_until(lambda: "error" not in outcome(first + 1), message="the SIGHUP's reload to begin")
    answer = outcome(first)
    assert answer["ok"] is True, answer
    assert answer["lines"][0].startswith(f"plugin {rig.name}: reloaded: 3 instance(s) replaced"), answer
    assert outcome(first + 1)["id"] == first + 1
    assert "error" in outcome(first + 2) and "error" in outcome(0)
    wait_until(lambda: outcome(first + 1)["done"], timeout=60, message="the SIGHUP's reload to finish")


def test_a_plugin_of_the_official_sdk_under_kuiper_pool_python_reloads_under_it(
        tmp_path, unique, host_runs):
    """The fresh zygote runs the main script as eKuiper did (``import ekuiper`` resolving to
    kuiper_pool), and so do the workers it execs."""
    name, fn = f"kp{unique}", f"fn{unique}"
    plugin_dir = make_plugin(str(tmp_path), name, functions={fn: VERSION_FUNCTION},
                             extra_modules={"version": 'VERSION = "v1"\n'},
                             main_code="import version  # noqa: F401", base="ekuiper",
                             config_class="ekuiper", runner="ekuiper",
                             yaml_settings={**FAST, "start_method": "spawn"})
    host = host_runs.launch(plugin_dir, python=shutil.which("kuiper-pool-python"))
    function = host.start_function(fn)
    assert function.exec(["x"])["result"][0] == "v1"
    with open(os.path.join(plugin_dir, "version.py"), "w") as f:
        f.write('VERSION = "v2"\n')
    proc = kuiper_pool_cli("reload", name, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version, pid, _ = function.exec(["x"])["result"]
    assert version == "v2"
    supervisor = psutil.Process(host.process.pid)
    wait_until(lambda: len(supervisor.children()) == 1, message="only the fresh zygote left")
    (zygote,) = supervisor.children()
    for process in (zygote, psutil.Process(pid)):
        assert "kuiper_pool.interpreter" in process.cmdline()
    assert "kuiper_pool.runtime.zygote" in zygote.cmdline()


def test_new_code_stuck_in_its_imports_is_refused_at_start_timeout_and_killed(tmp_path, unique, host_runs):
    rig = Rig(tmp_path, unique, host_runs, start_timeout=1.0)
    version, pid, _ = rig.call()
    rig.install("import time\ntime.sleep(600)\n")
    proc = rig.reload()
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f"plugin {rig.name}: reload refused, nothing changed: the new code "
                                   f"did not reach plugin.start within start_timeout 1s")
    assert rig.call()[:2] == [version, pid]
    supervisor = psutil.Process(rig.host.process.pid)
    wait_until(lambda: len(supervisor.children()) == 1, message="only the first zygote left")
