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
from typing import Optional, Set

import psutil
import pytest

from conftest import kuiper_pool_cli, wait_until
from kuiper_pool.runtime.state import JSON, States, encode_entry
from plugins import descendants, make_plugin

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


# --- state_dir as a hostile local user would attack it ---------------------------------------

NOBODY = 65534
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files needs root")


def refused_start(pd: str) -> subprocess.CompletedProcess:
    """Run the plugin's main script as eKuiper would; it must refuse to start."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-u", "main.py", "{}"], cwd=pd, env=env, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("layout", [pytest.param("parent", marks=AS_ROOT),
                                    pytest.param("grandparent", marks=AS_ROOT), "open parent"])
def test_a_state_dir_another_user_can_swap_is_refused_naming_the_key(tmp_path, unique, layout):
    """Every directory on the way to state_dir is checked (as for the settings file): a
    directory another user owns, or one anybody may write, lets them swap what is below."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if layout == "open parent":
        os.chmod(theirs, 0o777)  # ours, but without the sticky bit
    else:
        os.chown(theirs, NOBODY, NOBODY)
        os.chmod(theirs, 0o755)
    below = theirs / "mine" if layout == "grandparent" else theirs
    below.mkdir(mode=0o700, exist_ok=True)
    state_dir = below / "state"
    state_dir.mkdir(mode=0o700)  # ours and closed: only the last component was ever checked
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": STATE_FUNCTION},
                     settings={"state_dir": str(state_dir)})
    proc = refused_start(pd)
    assert proc.returncode == 2, proc.stdout
    why = (f"{theirs} is writable by others (mode 0777)" if layout == "open parent" else
           f"{theirs} belongs to uid {NOBODY}, not to uid {os.getuid()} or root")
    assert proc.stdout.strip() == (f"kuiper_pool: cannot start: kuiper_pool config: refusing "
                                   f"state_dir {state_dir}: {why}")


def state_file(state_dir, plugin: str, key: str) -> str:
    return States(str(state_dir), 1.0).file_for(plugin, key)


def warnings_about(pd: str, path: str) -> list:
    with open(os.path.join(pd, "stdout.log"), encoding="utf-8", errors="replace") as f:
        return [line for line in f if "WARNING" in line and path in line]


@AS_ROOT
def test_a_fifo_and_foreign_files_where_state_files_go_neither_block_nor_take_the_state(
        tmp_path, unique, host_runs):
    """A FIFO where the state file is read would block the supervisor in open(); a file
    of another user where the next temporary file goes would make the state file theirs."""
    fn, plugin = f"fn{unique}", f"kp{unique}"
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    path = state_file(state_dir, plugin, f"func:{fn}")
    os.mkfifo(path, 0o666)
    pd = make_plugin(str(tmp_path), plugin, functions={fn: STATE_FUNCTION},
                     settings={**FAST, "state_dir": str(state_dir), "state_flush_interval": 0.05})
    host = host_runs.launch(pd, command_timeout=15.0)  # a blocked supervisor never answers
    tmp = f"{path}.{host.process.pid}.tmp"  # where the supervisor's first flush writes
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666))
    os.chown(tmp, NOBODY, NOBODY)
    os.chmod(tmp, 0o666)
    f = host.start_function(fn)
    assert f.exec(["incr"], rule="a")["result"] == 1  # started with empty state
    aside = [n for n in os.listdir(state_dir) if ".corrupt-" in n]
    assert len(aside) == 1 and stat.S_ISFIFO(os.lstat(state_dir / aside[0]).st_mode), aside
    [warning] = warnings_about(pd, path)
    assert f"plugin {plugin} function {fn}" in warning and "not a regular file" in warning
    wait_until(lambda: os.path.exists(path) and stat.S_ISREG(os.lstat(path).st_mode),
               message="the state file written")
    st = os.lstat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o600)
    assert f.exec(["incr"], rule="a")["result"] == 2


def test_a_state_file_swapped_for_a_link_is_not_followed(tmp_path, unique, host_runs):
    fn, plugin = f"fn{unique}", f"kp{unique}"
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.state"
    elsewhere.write_bytes(encode_entry("a", "n", JSON, b"41"))  # state someone else chose
    path = state_file(state_dir, plugin, f"func:{fn}")
    os.symlink(elsewhere, path)
    pd = make_plugin(str(tmp_path), plugin, functions={fn: STATE_FUNCTION},
                     settings={**FAST, "state_dir": str(state_dir)})
    host = host_runs.launch(pd)
    f = host.start_function(fn)
    assert f.exec(["incr"], rule="a")["result"] == 1
    [aside] = [n for n in os.listdir(state_dir) if ".corrupt-" in n]
    assert os.readlink(state_dir / aside) == str(elsewhere)
    assert elsewhere.read_bytes() == encode_entry("a", "n", JSON, b"41")
    assert len(warnings_about(pd, path)) == 1


# --- corrupt state files ----------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["cut short", "key not UTF-8"])
def test_a_corrupt_state_file_is_moved_aside_and_the_instance_starts_empty(tmp_path, unique,
                                                                          host_runs, damage):
    src, plugin, rule = f"src{unique}", f"kp{unique}", f"r{unique}"
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    path = state_file(state_dir, plugin, f"source:{src}:{rule}:op:0")
    good = encode_entry("", "n", JSON, b"1000000")
    data = good[:-3] if damage == "cut short" else good.replace(b"n", b"\xff", 1)
    with open(path, "wb") as f:
        f.write(data)
    pd = make_plugin(str(tmp_path), plugin, sources={src: STATE_SOURCE},
                     settings={**FAST, "state_dir": str(state_dir)})
    host = host_runs.launch(pd)
    for _ in range(3):  # eKuiper replays starts: none is refused, none leaves a worker
        s = host.start_source(src, rule)
        assert s.recv()["message"]["n"] < 1000  # empty state: counting from 1
        s.stop()
        wait_until(lambda: len(descendants(host.process.pid) - syncers(host.process.pid)) == 1,
                   message="only the zygote (and the state syncer) left after the stop")
    [aside] = [n for n in os.listdir(state_dir) if ".corrupt-" in n]
    assert (state_dir / aside).read_bytes() == data
    [warning] = warnings_about(pd, path)
    assert f"plugin {plugin} source {src} rule {rule}" in warning
    assert "starting with empty state" in warning and aside in warning


def syncers(supervisor: int) -> Set[int]:
    """The live state syncer processes among ``supervisor``'s children."""
    out = set()
    for p in psutil.Process(supervisor).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(a.endswith("syncer.py") for a in p.cmdline()):
                out.add(p.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return out


def test_a_state_disk_that_does_not_answer_holds_up_no_call_or_start(tmp_path, unique, host_runs, transport):
    """The loop only writes state files; fsync and rename are the syncer process's. A syncer
    that stops (as on a disk that does not answer) delays the files, never the supervisor:
    calls and starts are served, the temporary files it leaves are bounded, and what was
    put reaches the file once it goes on; a killed syncer is replaced."""
    fn, other = f"fn{unique}", f"g{unique}"
    state_dir = tmp_path / "state"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}",
                                        functions={fn: STATE_FUNCTION, other: STATE_FUNCTION},
                                        settings={**FAST, "state_dir": str(state_dir),
                                                  "state_flush_interval": 0.05}))
    f = host.start_function(fn)
    assert f.exec(["incr"])["result"] == 1

    def syncer() -> Optional[psutil.Process]:
        pids = syncers(host.process.pid)
        return psutil.Process(pids.pop()) if pids else None

    def state_file_ends_with(text: bytes) -> bool:  # fn's file (g has its own)
        files = [n for n in os.listdir(state_dir) if n.endswith(".state") and fn in n]
        return bool(files) and (state_dir / files[0]).read_bytes().endswith(text)

    stalled = wait_until(syncer, message="the state syncer")
    wait_until(lambda: state_file_ends_with(b"1"), message="the flush of 1")
    stalled.suspend()
    try:
        assert [f.exec(["incr"])["result"] for _ in range(200)] == list(range(2, 202))
        g = host.start_function(other)
        assert g.exec(["incr"])["result"] == 1
        assert not state_file_ends_with(b"201")
        assert len([n for n in os.listdir(state_dir) if n.endswith(".tmp")]) <= 64
    finally:
        stalled.resume()
    wait_until(lambda: state_file_ends_with(b"201"), message="the flush of 201 after the stall")
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):  # an operator's, to the whole tree
        stalled.send_signal(sig)
    assert f.exec(["incr"])["result"] == 202
    wait_until(lambda: state_file_ends_with(b"202"), message="a flush after the operator's signals")
    assert stalled.is_running() and stalled.status() != psutil.STATUS_ZOMBIE  # the same syncer did it
    stalled.kill()  # reaped by the supervisor when it next writes state
    wait_until(lambda: not syncers(host.process.pid), message="the syncer's death")
    assert f.exec(["incr"])["result"] == 203
    wait_until(lambda: state_file_ends_with(b"203"), message="a flush by a new syncer")
    assert syncers(host.process.pid) - {stalled.pid}
