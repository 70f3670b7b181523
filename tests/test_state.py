"""``ctx.put_state``/``get_state``/``delete_state``: state kept by the supervisor across worker
crashes and recycles, and with ``state_dir`` across a restart of the plugin by eKuiper.

Every test runs a generated plugin through the emulator Host, as eKuiper would, and kills
workers and plugins for real.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

from conftest import kuiper_pool_cli, wait_until
from plugins import make_plugin

FAST = {"heartbeat_interval": 0.1, "restart_backoff_initial": 0.0, "restart_backoff_min": 0.1,
        "restart_jitter": 0.0, "stop_grace": 1.0}

STATE_FUNCTION = '''
class StateFunction(Function):
    """exec: ["incr"] -> the rule's counter after adding 1; ["put", k, v]; ["putbytes", k, text];
    ["get", k] -> [type name, value]; ["delete", k]; ["pid"]; ["exit"]."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        mode = args[0]
        if mode == "incr":
            n = ctx.get_state("n", 0) + 1
            ctx.put_state("n", n)
            return n
        if mode == "put":
            ctx.put_state(args[1], args[2])
            return True
        if mode == "putobj":
            ctx.put_state(args[1], object())
            return True
        if mode == "putbytes":
            ctx.put_state(args[1], args[2].encode())
            return True
        if mode == "get":
            v = ctx.get_state(args[1])
            return [type(v).__name__, v.decode() if isinstance(v, bytes) else v]
        if mode == "delete":
            ctx.delete_state(args[1])
            return True
        if mode == "pid":
            return os.getpid()
        return act(mode, args[1] if len(args) > 1 else None)

    def is_aggregate(self):
        return False
'''

STATE_SOURCE = '''
class StateSource(Source):
    """Emits {"n", "pid"} every 10 ms; n continues from the instance's state."""

    def __init__(self):
        self.stopped = threading.Event()

    def configure(self, datasource, conf):
        pass

    def open(self, ctx):
        n = ctx.get_state("n", 0)
        while not self.stopped.is_set():
            n += 1
            ctx.put_state("n", n)
            ctx.emit({"n": n, "pid": os.getpid()}, None)
            self.stopped.wait(0.01)

    def close(self, ctx):
        self.stopped.set()
'''


def test_function_state_is_per_rule_and_survives_a_worker_crash(tmp_path, unique, host_runs):
    fn = f"fn{unique}"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}", functions={fn: STATE_FUNCTION},
                                        settings=FAST))
    f = host.start_function(fn)
    assert [f.exec(["incr"], rule="a")["result"] for _ in range(3)] == [1, 2, 3]
    assert f.exec(["incr"], rule="b")["result"] == 1
    pid = f.exec(["pid"])["result"]
    assert f.exec(["exit"])["state"] is False  # the worker dies during the call
    wait_until(lambda: f.exec(["pid"])["result"] != pid, message="a new function worker")
    assert f.exec(["incr"], rule="a")["result"] == 4
    assert f.exec(["incr"], rule="b")["result"] == 2
    assert f.exec(["putbytes", "raw", "\u00e9t\u00e9"], rule="a")["result"] is True
    assert f.exec(["put", "doc", {"x": [1, None]}], rule="a")["result"] is True
    assert f.exec(["delete", "n"], rule="b")["result"] is True
    os.kill(f.exec(["pid"])["result"], signal.SIGKILL)
    wait_until(lambda: f.exec(["pid"])["state"] is True, message="the function to serve again")
    assert f.exec(["get", "raw"], rule="a")["result"] == ["bytes", "\u00e9t\u00e9"]
    assert f.exec(["get", "doc"], rule="a")["result"] == ["dict", {"x": [1, None]}]
    assert f.exec(["get", "n"], rule="b")["result"] == ["NoneType", None]


def test_source_state_survives_sigkill_of_its_worker(tmp_path, unique, host_runs):
    src = f"src{unique}"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}", sources={src: STATE_SOURCE},
                                        settings=FAST))
    s = host.start_source(src, f"r{unique}")
    first = [s.recv()["message"] for _ in range(5)]
    os.kill(first[0]["pid"], signal.SIGKILL)
    seen = []
    wait_until(lambda: seen.append(s.recv()["message"]) or seen[-1]["pid"] != first[0]["pid"],
               message="items of a new source worker")
    ns = [m["n"] for m in first + seen]
    assert ns == sorted(ns) and len(set(ns)) == len(ns), ns  # continued, never restarted at 1
    assert seen[-1]["n"] > first[-1]["n"]


def test_state_dir_keeps_state_across_a_plugin_restart(tmp_path, unique, host_runs):
    fn = f"fn{unique}"
    state_dir = tmp_path / "state"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}", functions={fn: STATE_FUNCTION},
                                        settings={**FAST, "state_dir": str(state_dir),
                                                  "state_flush_interval": 0.05}))
    f = host.start_function(fn)
    assert [f.exec(["incr"], rule="a")["result"] for _ in range(3)] == [1, 2, 3]
    # not a flush's temporary file: the supervisor may be killed before it replaces the file
    files = wait_until(lambda: [n for n in os.listdir(state_dir) if n.endswith(".state")],
                       message="the state file")
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir / files[0]).st_mode) == 0o600
    # eKuiper restarts a plugin by SIGKILL and a new process; what was flushed is back
    wait_until(lambda: (state_dir / files[0]).read_bytes().endswith(b"3"), message="the flush of 3")
    host.process.kill()
    host.process.wait()
    host.start()  # replays the function's start; the function channel stays eKuiper's
    assert f.exec(["incr"], rule="a")["result"] == 4


def test_state_over_the_limit_is_refused_in_one_line(tmp_path, unique, host_runs):
    fn = f"fn{unique}"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}", functions={fn: STATE_FUNCTION},
                                        settings={**FAST, "state_max_bytes": 100}))
    f = host.start_function(fn)
    assert f.exec(["put", "small", "x" * 50], rule=f"r{unique}")["result"] is True
    reply = f.exec(["put", "big", "x" * 60], rule=f"r{unique}")
    assert reply["state"] is False
    text = reply["result"]
    assert "\n" not in text and f"plugin kp{unique}" in text and fn in text and f"r{unique}" in text
    assert "state_max_bytes 100" in text
    reply = f.exec(["putobj", "o"], rule=f"r{unique}")
    assert reply["state"] is False and "TypeError: state values are JSON or bytes" in reply["result"]
    assert f.exec(["get", "small"], rule=f"r{unique}")["result"] == ["str", "x" * 50]


def test_state_survives_max_calls_recycles_and_a_reload(tmp_path, unique, host_runs):
    fn = f"fn{unique}"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}", functions={fn: STATE_FUNCTION},
                                        settings={**FAST, "max_calls": 2}))
    f = host.start_function(fn)
    pids = set()
    for i in range(1, 7):  # a fresh worker every 2 calls
        assert f.exec(["incr"], rule="a")["result"] == i
        pids.add(f.exec(["pid"])["result"])
    assert len(pids) >= 3
    proc = kuiper_pool_cli("reload", f"kp{unique}", timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f.exec(["incr"], rule="a")["result"] == 7


def test_a_state_dir_open_to_others_stops_the_start_naming_the_key(tmp_path, unique):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": STATE_FUNCTION},
                     settings={"state_dir": str(open_dir)})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-u", "main.py", "{}"], cwd=pd, env=env, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 2
    assert proc.stdout.strip() == (f"kuiper_pool: cannot start: kuiper_pool config: state_dir "
                                   f"{str(open_dir)!r} must be a directory owned by uid {os.getuid()} "
                                   f"with mode 0700 (no access for group or others)")
