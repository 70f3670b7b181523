"""What operators rely on, through the real runtime: where a worker was when it crashed or was
killed, per-symbol policy, slow sinks left alone, failed instances coming back by themselves,
and emit_error that logs instead of feeding eKuiper empty rows."""
from __future__ import annotations

import json

from conftest import wait_until
from kuiper_pool.runtime import status
from plugins import MODE_FUNCTION, RECORDING_SINK, make_plugin

FAST = {"heartbeat_interval": 0.1, "sample_interval": 0.1, "restart_backoff_min": 0.05,
        "restart_jitter": 0.0, "stop_grace": 0.5}


def row(plugin: str, symbol: str) -> dict:
    (inst,) = [i for i in status.query(plugin)["instances"] if i["symbol"] == symbol]
    return inst


def test_a_killed_or_crashed_worker_is_reported_with_the_plugin_frames_it_was_in(tmp_path, host_runs, unique):
    log = tmp_path / "log"
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     settings={**FAST, "call_deadline": 1.0})
    host = host_runs.launch(pd, stdout=open(log, "ab"))
    fn = host.start_function(f"fn{unique}")
    hung = fn.exec(["loop"])                            # a busy loop in plugin code
    assert hung["state"] is False and "call exceeded call_deadline 1s" in hung["result"]
    assert "(at kp_symbols.py:" in hung["result"] and " act < kp_symbols.py:" in hung["result"]
    crashed = fn.exec(["segv"])                         # a segfault in plugin code
    assert crashed["state"] is False and "signal 11 (SIGSEGV)" in crashed["result"]
    assert "(at kp_symbols.py:" in crashed["result"]
    assert "(at kp_symbols.py:" in row(f"kp{unique}", f"fn{unique}")["last_error"]
    assert fn.exec(["echo", 1])["result"] == 1
    lines = [ln for ln in log.read_text().splitlines() if "restart" in ln and "(at kp_symbols.py:" in ln]
    assert len(lines) == 2, lines


def test_a_symbol_policy_applies_to_that_symbol_only(tmp_path, host_runs, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}",
                     functions={f"quick{unique}": MODE_FUNCTION, f"slow{unique}": "ModeFunction"},
                     settings={**FAST, "call_deadline": 0.5,
                               "symbols": {f"slow{unique}": {"call_deadline": 5.0}}})
    host = host_runs.launch(pd)
    quick, slow = host.start_function(f"quick{unique}"), host.start_function(f"slow{unique}")
    assert slow.exec(["sleep", 1.0]) == {"state": True, "result": "slept"}
    late = quick.exec(["sleep", 1.0])
    assert late["state"] is False and "call_deadline 0.5s" in late["result"]


def test_a_slow_sink_is_not_killed_unless_collect_deadline_is_set(tmp_path, host_runs, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": RECORDING_SINK},
                     settings={**FAST, "call_deadline": 0.3})
    host = host_runs.launch(pd)
    slow = host.start_sink(f"snk{unique}", f"r{unique}", config={"delay": 0.8}, require_ack=True)
    assert slow.collect(b'{"a": 1}', timeout=5) == {}  # call_deadline no longer bounds sinks
    assert row(f"kp{unique}", f"snk{unique}")["restarts"] == 0


def test_collect_deadline_bounds_a_sink_when_set(tmp_path, host_runs, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={f"snk{unique}": RECORDING_SINK},
                     settings={**FAST, "collect_deadline": 0.3, "sink_max_deliveries": 1})
    host = host_runs.launch(pd)
    sink = host.start_sink(f"snk{unique}", f"r{unique}", config={"on": {"slow": "sleep:5"}},
                           require_ack=True)
    ack = sink.collect(b'{"slow": 1}', timeout=5)
    assert "error" in ack                              # killed at the deadline, dropped as poison
    inst = row(f"kp{unique}", f"snk{unique}")
    assert inst["restart_causes"].get("deadline") == 1 and "collect_deadline 0.3s" in inst["last_error"]
    assert sink.collect(b'{"fine": 1}', timeout=5) == {}


def test_a_failed_function_comes_back_after_failed_retry_min(tmp_path, host_runs, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     settings={**FAST, "flap_max_restarts": 1, "failed_retry_min": 1.0})
    host = host_runs.launch(pd)
    fn = host.start_function(f"fn{unique}")
    for _ in range(2):
        assert fn.exec(["exit"])["state"] is False
    assert row(f"kp{unique}", f"fn{unique}")["state"] == "failed"
    wait_until(lambda: fn.exec(["echo", 1]) == {"state": True, "result": 1}, timeout=10,
               message="the failed function to be tried again")


EMITS_ERRORS = '''
class ErrorSource(Source):
    def configure(self, datasource, conf):
        self.stopped = threading.Event()

    def open(self, ctx):
        for i in range(3):
            ctx.emit({"i": i})
            ctx.emit_error("sensor %d unreadable" % i)
        self.stopped.wait()

    def close(self, ctx):
        self.stopped.set()
'''


def test_emit_error_logs_and_counts_instead_of_sending_an_empty_row(tmp_path, host_runs, unique):
    log = tmp_path / "log"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sources={f"err{unique}": EMITS_ERRORS},
                     settings=FAST)
    host = host_runs.launch(pd, stdout=open(log, "ab"))
    src = host.start_source(f"err{unique}", f"r{unique}")
    got = [src.recv(timeout=5) for _ in range(3)]
    assert [g["message"] for g in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    wait_until(lambda: row(f"kp{unique}", f"err{unique}")["errors"] == 3, message="3 errors counted")
    errors = [ln for ln in log.read_text().splitlines() if "emit_error: sensor" in ln]
    assert len(errors) == 3 and all(" ERROR " in ln and f"symbol=err{unique}" in ln
                                    and f"rule=r{unique}" in ln for ln in errors)
    assert json.dumps({"error": "sensor 0 unreadable"}) not in log.read_text()
