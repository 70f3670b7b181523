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
from kuiper_pool.tools.emulator import HostError
from plugins import RECORDING_SINK, events, make_plugin, read_jsonl

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


def test_new_code_on_another_kuiper_pool_version_is_refused(tmp_path, unique, host_runs):
    """kuiper_pool upgraded (or rolled back) under a running plugin: the fresh zygote imports
    the kuiper_pool on disk, whose version differs from the supervisor's. Here the new code
    sets the version it reports, as another installed kuiper_pool would."""
    import kuiper_pool

    rig = Rig(tmp_path, unique, host_runs)
    version, pid, _ = rig.call()
    rig.install('import kuiper_pool.version\nkuiper_pool.version.__version__ = "99.0.0"\nVERSION = "v9"\n')
    proc = rig.reload()
    assert proc.returncode == 1
    assert proc.stdout.strip() == (
        f"plugin {rig.name}: reload refused, nothing changed: the new code imports kuiper_pool 99.0.0, "
        f"this supervisor runs kuiper_pool {kuiper_pool.__version__}: a different kuiper_pool applies "
        f"only when eKuiper restarts the plugin")
    assert rig.call()[:2] == [version, pid]


def test_an_exec_d_worker_of_another_installed_kuiper_pool_serves_nothing(tmp_path, unique, host_runs):
    """kuiper_pool upgraded on disk under a running plugin without a restart: an exec'd worker
    (start_method spawn, or a symbol's env) imports the installed kuiper_pool, whose frames
    may not be its supervisor's. Here the symbol's env points PYTHONPATH at a copy of
    kuiper_pool with another version, as an upgrade would install it."""
    from plugins import REPO

    other = tmp_path / "installed"
    shutil.copytree(os.path.join(REPO, "kuiper_pool"), other / "kuiper_pool")
    version = other / "kuiper_pool" / "version.py"
    version.write_text(version.read_text().replace("__version__ = ", '__version__ = "99.0.0"  # was '))
    name, fn = f"kp{unique}", f"fn{unique}"
    pd = make_plugin(str(tmp_path), name, functions={fn: VERSION_FUNCTION},
                     extra_modules={"version": 'VERSION = "v1"\n'},
                     yaml_settings={**FAST, "symbols": {fn: {"env": {"PYTHONPATH": f"{other}:{REPO}"}}}})
    host = host_runs.launch(pd)
    import kuiper_pool
    from kuiper_pool.tools.emulator import HostError

    with pytest.raises(HostError) as e:
        host.start_function(fn)
    assert "exit code 6" in str(e.value)
    log = open(os.path.join(pd, "stdout.log")).read()
    assert (f": kuiper_pool 99.0.0 is installed now, the plugin's supervisor runs "
            f"{kuiper_pool.__version__}: restart the plugin in eKuiper to run the installed version") in log


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
    assert "kuiper_pool.interpreter" in zygote.cmdline() and "kuiper_pool.runtime.zygote" in zygote.cmdline()
    # the worker it exec'd (with the same interpreter: its `import ekuiper` served v2 above)
    assert psutil.Process(pid).cmdline()[0] == f"kuiper-pool (exec) {name} function {fn}"


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


GATED = '''
def _gate(path):
    """Wait (bounded) until the test creates ``path``."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


class GatedAckSink(Sink):
    """Records each item, then acks it from a thread of its own once conf["gate"] exists."""

    def configure(self, conf):
        self.conf = dict(conf)

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        record("item", self.conf["file"], data=data.decode())

        def late():
            _gate(self.conf["gate"])
            ctx.ack_ok()

        threading.Thread(target=late, daemon=True).start()

    def close(self, ctx):
        pass


class GatedFunction(Function):
    """exec(["gated", gate, seconds]): records "begun", waits for the gate, then sleeps
    ``seconds`` more; any other call: [version.VERSION, pid]."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        import version
        if args and args[0] == "gated":
            record("begun")
            _gate(args[1])
            time.sleep(float(args[2]))
        return [version.VERSION, os.getpid()]

    def is_aggregate(self):
        return False
'''


def _gated_plugin(tmp_path, unique, host_runs, **settings):
    name = f"kp{unique}"
    plugin_dir = make_plugin(str(tmp_path), name, sinks={f"snk{unique}": GATED},
                             functions={f"fn{unique}": "GatedFunction"},
                             extra_modules={"version": 'VERSION = "v1"\n'},
                             main_code="import version  # noqa: F401", settings={**FAST, **settings})
    return name, plugin_dir, host_runs.launch(plugin_dir, recv_timeout=60)


def _reload_in_background(name: str, plugin_dir: str) -> Dict[str, object]:
    """Install v2 and run ``kuiper-pool reload`` in a thread; its CompletedProcess lands in the dict."""
    with open(os.path.join(plugin_dir, "version.py"), "w") as f:
        f.write('VERSION = "v2"\n')
    out: Dict[str, object] = {}
    thread = threading.Thread(target=lambda: out.update(proc=kuiper_pool_cli("reload", name, timeout=90)),
                              daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def _log_has(plugin_dir: str, text: str) -> bool:
    with open(os.path.join(plugin_dir, "stdout.log"), errors="replace") as f:
        return text in f.read()


def test_an_item_whose_ack_is_pending_when_a_reload_comes_is_collected_and_acked_once(
        tmp_path, unique, host_runs, transport):
    """A sink may ack after collect returned; the old worker waits for that ack (within
    stop_grace) instead of leaving the item to be collected again by the new one."""
    name, plugin_dir, host = _gated_plugin(tmp_path, unique, host_runs, stop_grace=10.0)
    items, gate = str(tmp_path / "items.jsonl"), str(tmp_path / "gate")
    sink = host.start_sink(f"snk{unique}", f"r{unique}", op="out", require_ack=True,
                           config={"file": items, "gate": gate})
    sink.send(b"first")
    wait_until(lambda: read_jsonl(items, "item"), message="the first item collected")
    (old,) = [r["pid"] for r in read_jsonl(items, "item")]
    reload = _reload_in_background(name, plugin_dir)
    wait_until(lambda: _log_has(plugin_dir, f"recycling worker pid {old}: reload"), timeout=60,
               message="the reload to ask the sink's worker to stop")
    with open(gate, "w"):
        pass  # now the ack comes, while the reload waits for the old worker
    assert sink.recv_ack(timeout=30) == {}
    reload["thread"].join(90)
    proc = reload["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sink.collect(b"second", timeout=30) == {}
    recorded = read_jsonl(items, "item")
    assert [r["data"] for r in recorded] == ["first", "second"], recorded
    assert recorded[1]["pid"] != old
    with pytest.raises(HostError):   # one ack per item: nothing more
        sink.recv_ack(timeout=0.5)


def test_a_call_in_flight_when_a_reload_comes_finishes_past_stop_grace(tmp_path, unique, host_runs):
    """The old worker's call runs on, bounded by call_deadline, not by stop_grace; the
    next call is the new worker's."""
    name, plugin_dir, host = _gated_plugin(tmp_path, unique, host_runs, stop_grace=1.0,
                                           call_deadline=30.0)
    function = host.start_function(f"fn{unique}")
    _version, old = function.exec(["pid"])["result"]
    gate, replies = str(tmp_path / "gate"), []
    caller = threading.Thread(target=lambda: replies.append(function.exec(["gated", gate, 2.0])),
                              daemon=True)
    caller.start()
    wait_until(lambda: events(plugin_dir, "begun"), message="the slow call to begin")
    reload = _reload_in_background(name, plugin_dir)
    wait_until(lambda: _log_has(plugin_dir, f"recycling worker pid {old}: reload"), timeout=60,
               message="the reload to ask the function's worker to stop")
    with open(gate, "w"):
        pass  # the call runs 2 s more: past stop_grace (1 s) after the stop
    caller.join(60)
    assert replies == [{"state": True, "result": ["v1", old]}], replies
    reload["thread"].join(90)
    proc = reload["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reloaded: 1 instance(s) replaced" in proc.stdout, proc.stdout
    version, pid = function.exec(["pid"])["result"]
    assert version == "v2" and pid != old


def test_a_plugin_with_900_functions_reloads(tmp_path, unique, host_runs):
    """The fresh zygote's first report grows with the symbols (over 64 KiB here): it
    arrives whole, whatever its size up to a bound of many MiB."""
    name = f"kp{unique}"
    functions = {f"fn{unique}_{i}": "ModeFunction" for i in range(900)}
    plugin_dir = make_plugin(str(tmp_path), name, functions=functions,
                             settings={**FAST, "start_timeout": 20.0})
    host = host_runs.launch(plugin_dir)
    function = host.start_function(f"fn{unique}_899")
    old = function.exec(["pid"])["result"]
    proc = kuiper_pool_cli("reload", name, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"plugin {name}: reloaded: 1 instance(s) replaced"), proc.stdout
    assert function.exec(["pid"])["result"] != old


def test_zygote_messages_of_any_size_up_to_the_bound_arrive_whole_and_others_name_the_cause():
    """Over a real SEQPACKET socketpair, as between the supervisor and a zygote."""
    import socket

    from kuiper_pool.runtime import protocol

    before = len(os.listdir("/proc/self/fd"))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        for size in (10, protocol.INLINE + 1, 3 << 20):
            hello = protocol.Hello("1.0", "p", functions=["f"], checks={"blob": "x" * size})
            data, fds = protocol.encode_zygote(hello)
            socket.send_fds(a, [data], fds)
            for fd in fds:
                os.close(fd)
            assert protocol.decode_zygote(*protocol.recv_zygote(b)) == (hello, [])
        data, fds = protocol.encode_zygote(protocol.Hello(checks={"blob": "x" * (protocol.MAX_MESSAGE + 1)}))
        socket.send_fds(a, [data], fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(ValueError, match=f"over the bound of {protocol.MAX_MESSAGE} bytes"):
            protocol.decode_zygote(*protocol.recv_zygote(b))
        a.send(b"{" + b" " * protocol.ZYGOTE_DATAGRAM + b"}")   # a datagram too big to read whole
        with pytest.raises(ValueError, match="cut short"):
            protocol.recv_zygote(b)
        for bad, cause in ((b'{"op": "launch"}', "unknown zygote message 'launch'"),
                           (b'{"op": "kill", "wid": 1}', "zygote message 'kill': ")):
            a.send(bad)   # a message this version cannot act on is refused, naming why
            with pytest.raises(ValueError, match=cause):
                protocol.decode_zygote(*protocol.recv_zygote(b))
    assert len(os.listdir("/proc/self/fd")) == before   # every memfd closed, read or refused


def test_a_reload_is_answered_when_its_last_instance_is_replaced_not_at_the_next_tick(monkeypatch):
    """The event that replaces the last instance also ends the reload's outcome: a SIGHUP the
    loop handles before its next tick then begins a new reload over a finished one, never over
    one whose poller would wait for it until its outcome is forgotten ("no reload N")."""
    import logging
    import time
    from types import SimpleNamespace

    from kuiper_pool.runtime.reload import Outcome, Progress, Reloader, Replacing

    sup = SimpleNamespace(log=logging.getLogger("test"), fx=SimpleNamespace(listeners=[]),
                          plugin=SimpleNamespace(name="p_reload_unit"), exiting="",
                          zygote=SimpleNamespace(pid=1), instances={})
    reloader = Reloader(sup, ["main.py"])
    assert sup.fx.listeners == [reloader.on_change]
    reloader.seq = 1
    reloader.outcome = reloader.outcomes[1] = Outcome(1, False)
    reloader.replacing = {"a": Replacing("a", time.monotonic()), "b": Replacing("b", time.monotonic())}
    monkeypatch.setattr(reloader, "_step", lambda r, now: (Progress.REPLACED, ""))
    reloader.on_change(SimpleNamespace(ctrl=SimpleNamespace(key="a")), None)
    assert not reloader.outcome.done and reloader.busy()
    reloader.on_change(SimpleNamespace(ctrl=SimpleNamespace(key="b")), None)
    assert not reloader.busy()
    assert reloader.outcomes[1].done and reloader.outcomes[1].ok
    assert reloader.outcomes[1].lines == ["plugin p_reload_unit: reloaded: 2 instance(s) replaced by "
                                          "workers of the new code (zygote pid 1)"]
