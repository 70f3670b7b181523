"""The supervisor never dies from what one instance or one command does: real processes,
real sockets, resource exhaustion and bad input from eKuiper's side.

(Event orderings are covered deterministically in test_instances_unit.py; fuzzing of every
channel in test_fuzz.py.)
"""
from __future__ import annotations

import json

import psutil
import pytest

from kuiper_pool.runtime import status
from kuiper_pool.tools.emulator import HostError
from plugins import COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, make_plugin

# every test here runs under both transports (conftest.transport)
pytestmark = pytest.mark.usefixtures("transport")

LOW_FD_LIMIT = '''
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d))  # soft = hard: nothing to raise
'''


def test_fd_exhaustion_refuses_one_start_and_the_rest_keeps_serving(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE},
                         functions={f"fn{unique}": MODE_FUNCTION}, main_code=LOW_FD_LIMIT % (64, 64))
    host = host_runs.launch(plugin)
    fn = host.start_function(f"fn{unique}")
    started, refusal = [], None
    for i in range(200):
        try:
            started.append(host.start_source(f"src{unique}", f"r{i}{unique}", config={"interval": 0.2}))
        except HostError as e:
            refusal = str(e)
            break
    assert refusal is not None, "64 fds cannot serve 200 sources: a start must have been refused"
    assert "Too many open files" in refusal and f"src{unique}" in refusal and "\n" not in refusal
    assert len(started) >= 5
    assert host.alive()
    assert fn.exec(["echo", "still here"]) == {"state": True, "result": "still here"}
    started[0].recv(timeout=5)                                  # a source keeps flowing
    for src in started[-5:]:                                    # freeing fds makes room again
        src.stop()
    again = host.start_source(f"src{unique}", f"rx{unique}", config={"interval": 0.2})
    assert again.recv(timeout=5)["message"]["n"] >= 1


def test_the_soft_fd_limit_is_raised_to_the_hard_limit(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE},
                         main_code=LOW_FD_LIMIT.replace("(%d, %d)", "(64, 4096)"))
    host = host_runs.launch(plugin)
    src = host.start_source(f"src{unique}", f"r{unique}", config={"interval": 0.2})
    src.recv(timeout=5)
    soft, hard = psutil.Process(host.process.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert (soft, hard) == (4096, 4096)


@pytest.mark.parametrize("command", [
    b"",                                                     # a 0-byte message
    b"\xff\xfe not json",
    b'{"cmd": "start", "arg": "' + b"[" * 2000 + b'"}',      # unterminated deep nesting
])
def test_a_bad_command_is_answered_and_the_plugin_keeps_serving(tmp_path, host_runs, unique, command):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": RECORDING_SINK},
                         functions={f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(plugin)
    fn = host.start_function(f"fn{unique}")
    answer = host.send_raw(command)
    assert answer != "ok" and "\n" not in answer and f"kp{unique}" in answer
    assert host.alive()
    assert fn.exec(["echo", 1]) == {"state": True, "result": 1}
    sink = host.start_sink(f"snk{unique}", f"r{unique}", require_ack=True)
    assert sink.collect(b'{"a": 1}') == {}


def test_a_start_with_a_deeply_nested_config_is_refused_not_fatal(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE})
    host = host_runs.launch(plugin)
    deep = '{"a":' * 3000 + "1" + "}" * 3000  # Go's encoder allows 10000 levels
    ctrl = ('{"symbolName": "src%s", "pluginType": "source", "config": {"deep": %s}, '
            '"meta": {"ruleId": "r%s", "opId": "op", "instanceId": 0}}' % (unique, deep, unique))
    answer = host.send_raw(json.dumps({"cmd": "start", "arg": ctrl}).encode())
    assert answer != "ok" and "\n" not in answer
    src = host.start_source(f"src{unique}", f"r2{unique}", config={"interval": 0.05})
    assert src.recv(timeout=5)["message"]["n"] >= 1


def test_an_empty_sink_item_is_collected(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": RECORDING_SINK})
    host = host_runs.launch(plugin)
    items = tmp_path / "items.jsonl"
    sink = host.start_sink(f"snk{unique}", f"r{unique}", config={"file": str(items)}, require_ack=True)
    assert sink.collect(b"") == {}      # a dataTemplate that renders to nothing
    assert sink.collect(b'{"after": true}') == {}
    got = [json.loads(line)["data"] for line in items.read_text().splitlines()]
    assert got == ["", '{"after": true}']


GIL_HOG = '''
class SlowModel(Source):
    """configure runs a C call that holds the GIL for ~1.5 s (a regex that backtracks), as a
    model load might: the heartbeat thread cannot run meanwhile."""

    def configure(self, datasource, conf):
        import re, time
        t0 = time.monotonic()
        n = 18
        while time.monotonic() - t0 < 1.5:
            re.match(r"(a+)+$", "a" * n + "b")  # one C call, exponential in n
            n += 1
        self.stopped = threading.Event()

    def open(self, ctx):
        ctx.emit({"pid": os.getpid()})
        self.stopped.wait()

    def close(self, ctx):
        self.stopped.set()
'''


def test_a_c_call_holding_the_gil_is_busy_not_hung(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sources={f"gil{unique}": GIL_HOG},
                         settings={"heartbeat_interval": 0.1, "heartbeat_misses": 3})
    host = host_runs.launch(plugin)
    src = host.start_source(f"gil{unique}", f"r{unique}")   # silent for 1.5 s > 0.3 s limit
    first = src.recv(timeout=10)["message"]["pid"]
    (row,) = [i for i in status.query(f"kp{unique}")["instances"] if i["rule"] == f"r{unique}"]
    assert row["restarts"] == 0 and row["pid"] == first


HANGING_OPEN = '''
class HangingSink(Sink):
    def configure(self, conf): pass
    def open(self, ctx): threading.Event().wait()   # blocks forever, using no CPU
    def collect(self, ctx, data): pass
    def close(self, ctx): pass
'''


def test_a_start_that_hangs_is_refused_at_start_timeout_naming_the_cause(tmp_path, host_runs, unique):
    plugin = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"hang{unique}": HANGING_OPEN},
                         settings={"start_timeout": 1.0, "heartbeat_interval": 5.0,
                                   "stop_grace": 0.5})
    host = host_runs.launch(plugin)
    with pytest.raises(HostError) as e:
        host.start_sink(f"hang{unique}", f"r{unique}")
    answer = str(e.value)
    assert "start exceeded start_timeout 1s" in answer and f"hang{unique}" in answer
    assert "\n" not in answer and host.alive()
