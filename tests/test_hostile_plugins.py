"""What plugin code or the machine can do to a worker never reaches the supervisor or the
other instances: a truncated call page, a fork at the process limit, a full run directory,
a forked child that returns into the worker, stack files of removed instances.

Real processes throughout: a real pids cgroup, a real full tmpfs, real forks.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import psutil
import pytest

from kuiper_pool.runtime import status
from kuiper_pool.tools.emulator import HostError
from conftest import wait_until
from plugins import COUNTING_SOURCE, MODE_FUNCTION, REPO, make_plugin, read_jsonl, runtime_base

PAGE_FUNCTION = '''
class PageFunction(Function):
    """exec(["truncate"]) shrinks the worker's call page to 0 bytes; exec(["scribble"]) fills
    it with 0xff bytes; anything else echoes args[1]."""

    def validate(self, args):
        return ""

    def is_aggregate(self):
        return False

    def exec(self, args, ctx):
        import mmap
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + fd).startswith("/memfd:kuiper_pool-calls"):
                    fds.append(int(fd))
            except OSError:  # the fd listdir itself used
                pass
        if args[0] == "truncate":
            os.ftruncate(fds[0], 0)
        if args[0] == "scribble":
            page = mmap.mmap(fds[0], mmap.PAGESIZE)
            page[:] = b"\\xff" * mmap.PAGESIZE
        return args[1]
'''


def test_plugin_code_cannot_truncate_its_call_page(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", functions={
        f"page{unique}": PAGE_FUNCTION, f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(plugin)
    page, other = host.start_function(f"page{unique}"), host.start_function(f"fn{unique}")
    assert page.exec(["echo", "before"]) == {"state": True, "result": "before"}
    reply = page.exec(["truncate", "x"])
    assert reply["state"] is False and "PermissionError" in reply["result"]
    status.query(f"kp{unique}")          # reads every call page
    assert host.alive()
    assert page.exec(["echo", "after"]) == {"state": True, "result": "after"}
    assert other.exec(["echo", 1]) == {"state": True, "result": 1}


def test_garbage_in_the_call_page_is_read_as_numbers(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", functions={
        f"page{unique}": PAGE_FUNCTION, f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(plugin)
    page, other = host.start_function(f"page{unique}"), host.start_function(f"fn{unique}")
    page.exec(["scribble", "x"])
    assert status.query(f"kp{unique}")["instances"]
    assert host.alive()
    assert other.exec(["echo", 1]) == {"state": True, "result": 1}
    assert page.exec(["scribble", "again"])["result"] == "again"


# --- the process limit ---------------------------------------------------------------------

@pytest.fixture
def pids_cgroup(unique):
    """A fresh pids cgroup (v1 or v2), removed at teardown once its processes are gone."""
    for root in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        path = os.path.join(root, f"kp{unique}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        if os.path.exists(os.path.join(path, "pids.max")):
            break
        os.rmdir(path)
    else:
        pytest.skip("no writable pids cgroup controller (needs root and cgroup pids)")
    yield path

    def removed() -> bool:
        try:
            os.rmdir(path)
        except OSError:
            return False
        return True
    wait_until(removed, message=f"{path} to be empty")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def test_a_fork_at_the_process_limit_refuses_one_start(tmp_path, pids_cgroup, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE},
                         functions={f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(plugin)
    fn = host.start_function(f"fn{unique}")
    src = host.start_source(f"src{unique}", f"r1{unique}", config={"interval": 0.05})
    (zygote,) = psutil.Process(host.process.pid).children()
    _write(os.path.join(pids_cgroup, "cgroup.procs"), str(zygote.pid))
    _write(os.path.join(pids_cgroup, "pids.max"), "1")     # the zygote alone: fork fails

    with pytest.raises(HostError) as refused:
        host.start_source(f"src{unique}", f"r2{unique}")
    text = str(refused.value)
    assert "cannot fork" in text and f"src{unique}" in text and f"r2{unique}" in text
    assert "\n" not in text
    assert host.alive()
    assert fn.exec(["echo", "still"]) == {"state": True, "result": "still"}
    src.recv(timeout=5)

    _write(os.path.join(pids_cgroup, "pids.max"), "max")
    again = host.start_source(f"src{unique}", f"r3{unique}", config={"interval": 0.05})
    assert again.recv(timeout=5)["message"]["n"] >= 1


# --- a full run directory -----------------------------------------------------------------------

@pytest.fixture
def full_fs(tmp_path):
    """A tiny tmpfs that the test fills with ``fill()``; unmounted at teardown."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64,mode=0755",
                           "tmpfs", str(mnt)], stderr=subprocess.PIPE, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")

    def fill() -> int:
        os.mkdir(mnt / "filler")
        n = 0
        while True:
            try:
                os.close(os.open(str(mnt / "filler" / str(n)), os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError:
                return n
            n += 1
    yield str(mnt), fill
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_workers_start_on_a_run_directory_with_no_free_inode(tmp_path, full_fs, host_runs, unique):
    mnt, fill = full_fs
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE},
                         functions={f"fn{unique}": MODE_FUNCTION}, settings={"runtime_dir": mnt})
    host = host_runs.launch(plugin)
    # the handshake comes before the run dir and status socket exist: fill the fs after them
    wait_until(lambda: glob.glob(os.path.join(mnt, "kuiper_pool-*", f"kp{unique}.sock")), 10, 0.01,
               "the supervisor's status socket")
    assert fill() > 0
    fn = host.start_function(f"fn{unique}")
    assert fn.exec(["echo", 1]) == {"state": True, "result": 1}
    src = host.start_source(f"src{unique}", f"r{unique}", config={"interval": 0.05})
    assert src.recv(timeout=5)["message"]["n"] >= 1
    log = open(os.path.join(plugin, "stdout.log")).read()
    assert "no stack dump on a crash or hang" in log and "Traceback" not in log


# --- stack files of removed instances -------------------------------------------------------

def test_refused_starts_leave_no_stack_files(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE})
    host = host_runs.launch(plugin)
    for i in range(5):
        with pytest.raises(HostError):
            host.start_source(f"src{unique}", f"r{i}{unique}", config={"fail_configure": "no"})
    (rundir,) = glob.glob(os.path.join(runtime_base(), f"kp{unique}-*"))
    wait_until(lambda: not glob.glob(os.path.join(rundir, "stack-*")),
               message="the stack files of refused starts to be removed")


# --- processes forked by plugin code ----------------------------------------------------------

FORKING_FUNCTION = '''
class ForkingFunction(Function):
    """exec(["fork", x]): forks, and parent and child both return x."""

    def validate(self, args):
        return ""

    def is_aggregate(self):
        return False

    def exec(self, args, ctx):
        if args[0] == "fork":
            os.fork()
        return args[1]
'''

FORKING_SINK = '''
class ForkingSink(Sink):
    """Records every item's "i" with its pid; an item with "fork" forks in collect, and
    both processes return."""

    def configure(self, conf):
        self.file = conf["file"]

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        item = json.loads(data)
        record("collect", path=self.file, i=item["i"])
        if item.get("fork"):
            os.fork()

    def close(self, ctx):
        pass
'''

FORKING_SOURCE = '''
class ForkingSource(Source):
    """Emits {"n", "pid"} every 10 ms; forks after item 3, and both processes go on."""

    def configure(self, datasource, conf):
        self.stopped = threading.Event()

    def open(self, ctx):
        n = 0
        while not self.stopped.wait(0.01):
            n += 1
            ctx.emit({"n": n, "pid": os.getpid()})
            if n == 3:
                os.fork()

    def close(self, ctx):
        self.stopped.set()
'''
FORKED_LINE = "a process forked by plugin code"


def _forked_lines(plugin: str) -> int:
    with open(os.path.join(plugin, "stdout.log")) as f:
        return sum(FORKED_LINE in line for line in f)


def test_a_forked_child_of_exec_never_answers_ekuiper(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": FORKING_FUNCTION})
    host = host_runs.launch(plugin)
    fn = host.start_function(f"fn{unique}")
    assert fn.exec(["fork", "echo0"]) == {"state": True, "result": "echo0"}
    for i in range(1, 6):
        assert fn.exec(["echo", f"echo{i}"]) == {"state": True, "result": f"echo{i}"}
    wait_until(lambda: _forked_lines(plugin) == 1, message="one line about the forked child")


def test_a_forked_child_of_collect_never_takes_items(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": FORKING_SINK})
    host = host_runs.launch(plugin)
    items = str(tmp_path / "items.jsonl")
    sink = host.start_sink(f"snk{unique}", f"r{unique}", config={"file": items})
    sink.collect(b'{"i": 0, "fork": true}')
    for i in range(1, 30):
        sink.collect(b'{"i": %d}' % i)
    rows = wait_until(lambda: (lambda r: r if len(r) >= 30 else None)(read_jsonl(items, "collect")),
                      message="30 items collected")
    assert sorted(r["i"] for r in rows) == list(range(30))
    assert len({r["pid"] for r in rows}) == 1, "every item is collected by the worker itself"
    wait_until(lambda: _forked_lines(plugin) == 1, message="one line about the forked child")


def test_a_forked_child_of_open_never_emits(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": FORKING_SOURCE})
    host = host_runs.launch(plugin)
    src = host.start_source(f"src{unique}", f"r{unique}")
    got = [src.recv(timeout=5)["message"] for _ in range(20)]
    assert [m["n"] for m in got] == list(range(got[0]["n"], got[0]["n"] + 20))
    assert len({m["pid"] for m in got}) == 1
    wait_until(lambda: _forked_lines(plugin) == 1, message="one line about the forked child")


# --- files another user controls -----------------------------------------------------------------

@pytest.mark.skipif(os.getuid() != 0, reason="making files of another user needs root")
def test_settings_another_user_can_write_stop_the_start(tmp_path, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "kp.yaml").write_text(f"runtime_dir: {theirs}\nstart_method: spawn\n")
    os.chown(theirs, 65534, 65534)
    os.chown(theirs / "kp.yaml", 65534, 65534)
    os.symlink(theirs / "kp.yaml", tmp_path / "settings.yaml")
    env = {**os.environ, "PYTHONPATH": REPO, "KUIPER_POOL_CONFIG": str(tmp_path / "settings.yaml")}
    proc = subprocess.run([sys.executable, "main.py"], cwd=plugin, stdout=subprocess.PIPE, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        f"kuiper_pool: cannot start: kuiper_pool config: refusing settings file {tmp_path}/settings.yaml: "
        f"{theirs} belongs to uid 65534, not to uid 0 or root"]
    del env["KUIPER_POOL_CONFIG"]
    env["KUIPER_POOL_RUNTIME_DIR"] = str(theirs)
    proc = subprocess.run([sys.executable, "main.py"], cwd=plugin, stdout=subprocess.PIPE, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2 and f"refusing runtime_dir {theirs}: {theirs} belongs to uid 65534" in proc.stdout
