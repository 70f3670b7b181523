"""What an operator's signals to the whole plugin do, what a working directory another user
controls can do, and how a kill is reported when the stack dump before it misbehaves.

Every test runs a generated plugin through the emulator Host, as eKuiper would, and signals
real processes: the supervisor's process group, or every pid of the plugin's tree.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import List

import psutil
import pytest

from conftest import kuiper_pool_cli, wait_until
from kuiper_pool.runtime import status
from plugins import make_plugin
from test_reload import FAST, VERSION_FUNCTION, VERSION_SOURCE


def tree(pid: int) -> List[psutil.Process]:
    """The supervisor ``pid`` and every process under it."""
    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def living(procs: List[psutil.Process]) -> List[int]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


GROUP_LEADER = "os.setpgid(0, 0)  # a process group of its own, as a shell's job has"


def reloads(p: "Plugin") -> List[str]:
    return [line for line in log_lines(p.dir) if f"plugin {p.name}: reloaded: " in line]


def log_lines(plugin_dir: str) -> List[str]:
    with open(os.path.join(plugin_dir, "stdout.log"), encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


class Plugin:
    """A versioned source and function (test_reload's), started through the emulator."""

    def __init__(self, tmp_path, unique: str, host_runs, main_code: str = "", python: str = sys.executable,
                 **settings) -> None:
        self.name, self.rule = f"kp{unique}", f"r{unique}"
        self.src, self.fn = f"src{unique}", f"fn{unique}"
        self.dir = make_plugin(str(tmp_path), self.name, sources={self.src: VERSION_SOURCE},
                               functions={self.fn: VERSION_FUNCTION},
                               extra_modules={"version": 'VERSION = "v1"\n'},
                               main_code="import version  # noqa: F401\n" + main_code,
                               yaml_settings={**FAST, "heartbeat_interval": 0.5, **settings})
        self.host = host_runs.launch(self.dir, python=python)
        self.source = self.host.start_source(self.src, self.rule, op="in")
        self.function = self.host.start_function(self.fn)

    def call(self) -> list:
        reply = self.function.exec(["x"])
        assert reply["state"] is True, reply
        return reply["result"]

    def install(self, version: str) -> None:
        with open(os.path.join(self.dir, "version.py"), "w") as f:
            f.write(f'VERSION = "{version}"\n')


# --- 1. SIGHUP, SIGINT and SIGTERM to the whole plugin ---------------------------------------

@pytest.mark.parametrize("how", ["group", "every pid"])
def test_sighup_to_the_whole_plugin_reloads_once_and_every_process_lives(tmp_path, unique, host_runs, how):
    """``kill -HUP -<pgid>`` (a closed terminal) reaches the zygote too, ``pkill -HUP -f
    <script>`` every process: only the supervisor acts on it, with one reload; no process
    dies of it (the old zygote and workers leave through the reload, not by the signal)."""
    p = Plugin(tmp_path, unique, host_runs, main_code=GROUP_LEADER)
    supervisor = p.host.process.pid
    assert p.call()[0] == "v1"
    procs = tree(supervisor)
    assert len(procs) == 4  # supervisor, zygote, two workers
    p.install("v2")
    if how == "group":
        os.killpg(supervisor, signal.SIGHUP)
    else:
        for proc in procs:
            os.kill(proc.pid, signal.SIGHUP)
    wait_until(lambda: p.call()[0] == "v2", timeout=30, message="the function on the new code")
    wait_until(lambda: reloads(p), timeout=30, message="the reload's outcome")
    assert p.host.alive()
    rows = status.query(p.name)["instances"]
    assert len(rows) == 2 and all(r["restarts"] == 0 and r["state"] == "running" for r in rows), rows
    assert len(reloads(p)) == 1
    text = "\n".join(log_lines(p.dir))
    assert "zygote process died" not in text and "SIGHUP" not in text


def test_sigint_to_the_process_group_stops_the_plugin_cleanly(tmp_path, unique, host_runs):
    """Ctrl-C in a terminal: SIGINT to the foreground process group."""
    p = Plugin(tmp_path, unique, host_runs, main_code=GROUP_LEADER)
    supervisor = p.host.process.pid
    p.call()
    procs = tree(supervisor)
    os.killpg(supervisor, signal.SIGINT)
    assert p.host.process.wait(20) == 0
    wait_until(lambda: not living(procs), message="every process of the plugin gone")
    text = "\n".join(log_lines(p.dir))
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert re.search(r"stopping everything: received SIGINT", text)


def test_sigterm_to_every_process_stops_the_plugin_cleanly(tmp_path, unique, host_runs):
    """``pkill -f <script>`` or a service manager stopping the whole control group: the plugin
    ends as with SIGTERM to the supervisor alone, exit status 0, no traceback; the zygote
    does not tear the workers down under the supervisor's stop."""
    p = Plugin(tmp_path, unique, host_runs)
    supervisor = p.host.process.pid
    p.call()
    procs = tree(supervisor)
    for proc in procs:
        os.kill(proc.pid, signal.SIGTERM)
    assert p.host.process.wait(20) == 0
    wait_until(lambda: not living(procs), message="every process of the plugin gone")
    text = "\n".join(log_lines(p.dir))
    assert "Traceback" not in text and "zygote process died" not in text
    assert re.search(r"stopping everything: received SIGTERM", text)


# --- 2. nothing is imported from the working directory ----------------------------------------

PLANTED = '''
import os
with open({marker!r}, "a") as f:
    f.write("%d %s\\n" % (os.getpid(), __file__))
'''


@pytest.mark.parametrize("python", ["python", "kuiper-pool-python"])
def test_no_process_imports_from_a_working_directory_it_did_not_choose(tmp_path, unique, host_runs, python):
    """A plugin whose working directory another user can write (it changed to it, or was
    started there): spawned workers, after a restart too, and a reload's zygote import
    kuiper_pool from where the plugin's own process did, never from that directory."""
    hostile = tmp_path / "hostile"
    marker = str(tmp_path / "planted-code-ran")
    for module in ("kuiper_pool/__init__.py", "runpy.py"):
        (hostile / module).parent.mkdir(parents=True, exist_ok=True)
        (hostile / module).write_text(PLANTED.format(marker=marker))
    interpreter = sys.executable  # the venv's: kuiper-pool-python is next to it
    if python != "python":
        interpreter = os.path.join(os.path.dirname(sys.executable), python)
    p = Plugin(tmp_path, unique, host_runs, main_code=f"os.chdir({str(hostile)!r})",
               python=interpreter, start_method="spawn")
    _version, first, _ = p.call()
    assert psutil.Process(first).cwd() == str(hostile)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: (lambda r: r["state"] and r["result"][1] != first)(p.function.exec(["x"])),
               message="a restarted worker")  # the call the kill interrupted is answered with an error
    p.install("v2")
    proc = kuiper_pool_cli("reload", p.name, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version, pid, _ = p.call()
    assert version == "v2" and pid != first
    assert psutil.Process(pid).cwd() == str(hostile)
    wait_until(lambda: p.source.recv()["message"]["version"] == "v2", message="the source on v2")
    assert not os.path.exists(marker), open(marker).read()


# --- 3. a kill is reported as the kill it was -------------------------------------------------

@pytest.fixture
def cpu_load():
    """Three busy loops on the box for the test's length (each ends itself after 5 minutes)."""
    loop = "import signal\nsignal.alarm(300)\nwhile True:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(3)]
    yield
    for proc in procs:
        proc.kill()
        proc.wait(10)


CRASHING_DUMP_SOURCE = '''
class CrashingDumpSource(CountingSource):
    """A CountingSource whose stack dump crashes: its SIGUSR1 handler is an address where no
    code is, so the dump the supervisor asks for before a kill segfaults the worker first."""

    def open(self, ctx):
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signal.SIGUSR1, 16)
        return super().open(ctx)
'''
DUMP_CRASHED = "; its stack dump, asked for before the SIGKILL, crashed it first with signal 11 (SIGSEGV)"


@pytest.mark.parametrize("dump, run", [(d, r) for d in ("as it comes", "crashing") for r in range(5)])
def test_a_stopped_worker_killed_under_cpu_load_is_reported_as_killed_for_its_hang(
        tmp_path, unique, host_runs, cpu_load, dump, run):
    """The stopped worker is continued to dump its stack and SIGKILLed: whatever the dump
    does meanwhile, its exit is reported as that SIGKILL and the hang (and counted as a hang);
    a dump that crashed the worker first is reported as such, never as a segfault of its own."""
    name, src, rule = f"kp{unique}", f"src{unique}", f"r{unique}"
    plugin_dir = make_plugin(str(tmp_path), name, sources={
        src: CRASHING_DUMP_SOURCE if dump == "crashing" else "CountingSource"},
        yaml_settings={"heartbeat_interval": 0.1, "heartbeat_misses": 3, "stop_grace": 30.0})
    host = host_runs.launch(plugin_dir)
    source = host.start_source(src, rule, config={"interval": 0.01})
    pid = source.recv()["message"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        row = wait_until(lambda: [r for r in status.query(name)["instances"] if r["restarts"] >= 1
                                  and r["state"] == "running"], 20, 0.02, "the stopped worker replaced")[0]
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    # under this load its replacement, with a 0.3 s heartbeat limit, may be killed as hung too
    assert set(row["restart_causes"]) == {"hang"}, row
    [line] = [line for line in log_lines(plugin_dir) if f"worker pid {pid} signal" in line]
    error = line[line.index(f"worker pid {pid} signal"):]
    assert re.match(rf"worker pid {pid} signal 9 \(SIGKILL\): hung: no heartbeat for ", error), error
    assert DUMP_CRASHED in error or "stack dump" not in error, error  # SIGKILL may come first
