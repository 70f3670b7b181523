"""Process lifecycle: where instances run, and that nothing outlives the plugin however it ends
(stop, SIGKILL from eKuiper, SIGTERM/SIGINT, eKuiper's control channel going away)."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from conftest import ipc_files, wait_until
from plugins import (COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, descendants, events, is_dead,
                     make_plugin, read_jsonl, runtime_entries)


class Running:
    """A plugin with two sources, a sink and two functions running, and their worker pids."""

    def __init__(self, host_runs, tmp_path, u: str, **settings):
        self.u = u
        self.plugin, self.src, self.snk = f"kp{u}", f"src{u}", f"snk{u}"
        self.fns = [f"fa{u}", f"fb{u}"]
        self.rule = f"r{u}"
        self.items = str(tmp_path / "items.jsonl")
        self.dir = make_plugin(str(tmp_path), self.plugin, sources={self.src: COUNTING_SOURCE},
                               sinks={self.snk: RECORDING_SINK},
                               functions={f: MODE_FUNCTION for f in self.fns},
                               settings=dict({"stop_grace": 1.0}, **settings))
        self.host = host_runs.launch(self.dir)
        self.supervisor = self.host.process.pid
        self.sources = [self.host.start_source(self.src, self.rule, op=f"s{i}") for i in (1, 2)]
        # the zygote exists once a start is answered (the handshake may come before it)
        (self.zygote,) = [p.pid for p in psutil.Process(self.supervisor).children()]
        self.source_pids = [s.recv()["message"]["pid"] for s in self.sources]
        self.sink = self.host.start_sink(self.snk, self.rule, op="k", config={"file": self.items},
                                         require_ack=True)
        for i in range(10):
            assert self.sink.collect(json.dumps({"i": i}).encode()) == {}
        self.sink_pid = read_jsonl(self.items)[0]["pid"]
        self.functions = [self.host.start_function(f) for f in self.fns]
        self.function_pids = [f.exec(["pid"])["result"] for f in self.functions]
        self.workers = self.source_pids + [self.sink_pid] + self.function_pids
        self.sink_data_path = f"/tmp/{self.rule}_k_0.ipc"  # the plugin listens here

    def all_dead(self, pids) -> bool:
        return all(is_dead(p) for p in pids)

    def closed_pids(self, kind: str):
        return sorted(e["pid"] for e in events(self.dir, kind))


def test_every_instance_runs_in_its_own_process_and_stop_leaves_nothing(tmp_path, unique, host_runs):
    run = Running(host_runs, tmp_path, unique)
    assert len(set(run.workers)) == len(run.workers)
    assert run.supervisor not in run.workers and run.zygote not in run.workers
    assert descendants(run.supervisor) == {run.zygote, *run.workers}  # and nothing else

    for handle, pid in zip(run.sources, run.source_pids):
        handle.stop()
        assert is_dead(pid)
    run.sink.stop()
    assert is_dead(run.sink_pid)
    assert run.closed_pids("source_close") == sorted(run.source_pids)
    assert run.closed_pids("sink_close") == [run.sink_pid]
    assert ipc_files(run.rule) == []
    assert descendants(run.supervisor) == {run.zygote, *run.function_pids}

    run.host.close()  # eKuiper deletes the plugin: SIGKILL of the plugin process only
    wait_until(lambda: run.all_dead([run.supervisor, run.zygote, *run.workers]), timeout=5,
               message="every process of the plugin to be gone")
    wait_until(lambda: not ipc_files(unique) and not runtime_entries(unique), timeout=5,
               message="no ipc file and no runtime entry left")


def test_sigkill_of_the_supervisor_leaves_nothing_within_one_second(tmp_path, unique, host_runs):
    run = Running(host_runs, tmp_path, unique)
    assert os.path.exists(run.sink_data_path)
    assert len(runtime_entries(run.plugin)) == 2  # the run dir and the status socket
    run.host.kill()
    assert run.host.process.returncode == -signal.SIGKILL
    wait_until(lambda: run.all_dead([run.zygote, *run.workers]), timeout=1.0,
               message=f"workers and zygote dead (alive: "
                       f"{[p for p in [run.zygote, *run.workers] if not is_dead(p)]})")
    wait_until(lambda: not os.path.exists(run.sink_data_path) and not runtime_entries(unique),
               timeout=1.0, message="the sink's ipc file, run dir and status socket removed")
    run.host.close()  # eKuiper's own sockets
    assert ipc_files(unique) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_everything_gracefully(tmp_path, unique, host_runs, sig):
    run = Running(host_runs, tmp_path, unique)
    os.kill(run.supervisor, sig)
    assert run.host.process.wait(timeout=10) == 0
    assert run.closed_pids("source_close") == sorted(run.source_pids)
    assert run.closed_pids("sink_close") == [run.sink_pid]
    wait_until(lambda: run.all_dead([run.zygote, *run.workers]), timeout=2,
               message="workers and zygote gone")
    assert not os.path.exists(run.sink_data_path)
    assert runtime_entries(unique) == []


def drop_control_channel(host) -> None:
    """eKuiper's control REP socket goes away while the plugin process lives on. The emulator
    has no public call for this (eKuiper never does it on purpose); close its socket."""
    host._ctrl.close()
    host._ctrl = None


def test_losing_the_control_channel_stops_the_plugin_after_control_lost_timeout(tmp_path, unique, host_runs):
    timeout = 0.5
    run = Running(host_runs, tmp_path, unique, control_lost_timeout=timeout)
    dropped = time.monotonic()
    drop_control_channel(run.host)
    wait_until(lambda: run.host.process.poll() is not None, timeout=timeout + 4.0,
               message="the supervisor to exit after losing eKuiper")
    elapsed = time.monotonic() - dropped
    assert elapsed >= timeout - 0.1, f"exited {elapsed:.2f}s after the loss, before control_lost_timeout"
    assert run.host.process.returncode == 0
    assert run.closed_pids("source_close") == sorted(run.source_pids)
    assert run.closed_pids("sink_close") == [run.sink_pid]
    wait_until(lambda: run.all_dead([run.zygote, *run.workers]), timeout=2,
               message="workers and zygote gone")
    assert runtime_entries(unique) == []


def socket_inodes(pid: int) -> set:
    """The sockets ``pid`` holds, by inode (a copy of an fd across fork is the same inode)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            found.add(target)
    return found


def test_starts_sent_right_after_the_handshake_are_served_and_the_zygote_holds_no_socket_of_ekuiper(
        tmp_path, unique, host_runs, transport):
    # Running sends each start as soon as the previous answer came, the first one right after
    # the handshake; with the native transport the supervisor handshakes before the zygote exists
    run = Running(host_runs, tmp_path, unique)
    zygote_sockets = socket_inodes(run.zygote)
    assert len(zygote_sockets) == 1  # its link to the supervisor, nothing it inherited
    assert not zygote_sockets & socket_inodes(run.supervisor)

    # a restarted plugin gets every start replayed at once, concurrently, as eKuiper restores it
    run.host.restart_plugin()
    supervisor = run.host.process.pid
    host_runs.track([supervisor])
    for handle, old in zip(run.sources, run.source_pids):
        wait_until(lambda: handle.recv()["message"]["pid"] != old, timeout=10,
                   message="an item from the restarted source")
    # eKuiper keeps one start per meta key, and functions share theirs: the last one is replayed
    assert run.functions[-1].exec(["pid"])["result"] not in run.function_pids
    assert run.sink.collect(b'{"i": "after"}') == {}
    (zygote,) = [p.pid for p in psutil.Process(supervisor).children()]
    zygote_sockets = socket_inodes(zygote)
    assert len(zygote_sockets) == 1 and not zygote_sockets & socket_inodes(supervisor)


def test_the_first_worker_does_not_wait_for_the_zygote_to_prepare_and_later_ones_share_it(
        tmp_path, unique, host_runs):
    """eKuiper's first start comes right after the handshake: its worker is forked before the
    zygote imports every kind's worker half (the plugin's first item waits for nothing done
    for later workers); workers forked after find them imported, shared with the zygote."""
    fn = f"fn{unique}"
    plugin_dir = make_plugin(str(tmp_path), f"pl{unique}", functions={fn: MODE_FUNCTION},
                             settings={"max_calls": 1})  # every call: a worker forked anew
    function = host_runs.launch(plugin_dir).start_function(fn)
    kinds = "kuiper_pool.runtime.kinds."
    every_kind = [f"{kinds}{k}.serve" for k in ("function", "sink", "source")]

    def serves() -> list:
        return [m for m in function.exec(["modules", kinds])["result"] if m.endswith(".serve")]

    assert serves() == [f"{kinds}function.serve"]  # its own import, after the fork
    wait_until(lambda: serves() == every_kind, timeout=20,
               message="a worker forked after the zygote prepared, with every kind's worker half")
