"""What plugin code starts dies with its worker, and a dead supervisor's zygote removes only
what it created: real processes, real SIGKILLs."""
from __future__ import annotations

import os
import signal
import socket
import time

import psutil

from conftest import wait_until
from plugins import COUNTING_SOURCE, RECORDING_SINK, is_dead, make_plugin

SPAWNER = '''
class Spawner(Source):
    """Starts four kinds of processes, emits their pids, then waits to be stopped."""

    def configure(self, datasource, conf):
        self.stopped = threading.Event()

    def open(self, ctx):
        import subprocess
        pids = {"popen": subprocess.Popen(["sleep", "600"]).pid,
                "setsid": subprocess.Popen(["sleep", "600"], start_new_session=True).pid}
        r, w = os.pipe()
        child = os.fork()
        if child == 0:                      # a double-forked daemon in its own session
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                time.sleep(600)
            os._exit(0)
        os.waitpid(child, 0)
        pids["daemon"] = int(os.read(r, 32))
        forked = os.fork()
        if forked == 0:
            time.sleep(600)
            os._exit(0)
        pids["fork"] = forked
        ctx.emit({"pids": pids, "worker": os.getpid()})
        self.stopped.wait()

    def close(self, ctx):
        self.stopped.set()
'''


def alive(pid: int) -> bool:
    return not is_dead(pid)


def spawned(src) -> dict:
    return src.recv(timeout=10)["message"]


def test_what_a_worker_started_dies_with_it_and_nothing_piles_up(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"sp{unique}": SPAWNER})
    host = host_runs.launch(plugin)
    src = host.start_source(f"sp{unique}", f"r{unique}")
    first = spawned(src)
    assert all(alive(p) for p in first["pids"].values())  # a live worker keeps its processes
    os.kill(first["worker"], signal.SIGKILL)
    second = spawned(src)                                  # restarted: a new worker, new ones
    assert second["worker"] != first["worker"]
    wait_until(lambda: not any(alive(p) for p in first["pids"].values()),
               message=f"the dead worker's processes to die: {first['pids']}")
    assert all(alive(p) for p in second["pids"].values())
    host.process.kill()                                    # eKuiper's stop: SIGKILL of the supervisor
    wait_until(lambda: not any(alive(p) for p in second["pids"].values()),
               message=f"every process the plugin started to die: {second['pids']}")


def test_the_zygote_removes_only_files_it_created(tmp_path, host_runs, unique):
    """A dead supervisor's zygote may clean up late (a big worker takes time to die); by then
    a new supervisor may have made a file at the same path: that one must survive."""
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": RECORDING_SINK})
    host = host_runs.launch(plugin)
    host.start_sink(f"snk{unique}", f"r{unique}")
    path = f"/tmp/r{unique}_op_0.ipc"
    sup = psutil.Process(host.process.pid)
    zygote = sup.children()[0]
    zygote.suspend()                      # its cleanup must wait until we let it go
    try:
        sup.kill()
        sup.wait(5)
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(path)                  # the next supervisor's listener, say
    finally:
        zygote.resume()
    try:
        wait_until(lambda: not psutil.pid_exists(zygote.pid) or is_dead(zygote.pid),
                   message="the old zygote to finish")
        assert os.path.exists(path), "the old zygote removed a file it did not create"
    finally:
        other.close()
        os.unlink(path)


def test_many_sinks_are_all_cleaned_up_when_the_supervisor_is_killed(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": RECORDING_SINK},
                         sources={f"src{unique}": COUNTING_SOURCE})
    for attempt in range(3):
        host = host_runs.launch(plugin)
        for i in range(40):
            host.start_sink(f"snk{unique}", f"r{attempt}x{i}{unique}")
        workers = psutil.Process(host.process.pid).children(recursive=True)
        assert len(workers) == 41  # the zygote and 40 workers
        host.process.kill()
        paths = [f"/tmp/r{attempt}x{i}{unique}_op_0.ipc" for i in range(40)]
        wait_until(lambda: not any(os.path.exists(p) for p in paths)
                   and not any(alive(w.pid) for w in workers), timeout=10,
                   message="every worker gone and every sink file removed")
        host.close()
