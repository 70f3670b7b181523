"""The embedded eKuiper stand-in (kuiper_pool.tools.emulator) driving the *official* SDK.

Each test generates a small official-SDK plugin (``from ekuiper import ...``) into
its tmp_path with names unique to the test, so runs can overlap. Where the
official SDK misbehaves the test asserts the misbehaviour and says so in its name.
"""
from __future__ import annotations

import io
import json
import os
import re
import textwrap
import threading
from dataclasses import dataclass
from typing import List

import psutil
import pytest

from conftest import ipc_files, kill_tree, wait_until
from plugins import unique_pysam
from kuiper_pool.tools.emulator import Host, HostError
from kuiper_pool.tools.rule import RuleError, load_rule, run_rule

MAIN = '''
import json, logging, os, sys, threading
from ekuiper import plugin, PluginConfig, Source, Sink, Function, Context

EVENTS = os.path.join(os.getcwd(), "events.jsonl")
_lock = threading.Lock()


def record(**event):
    with _lock, open(EVENTS, "a") as f:
        f.write(json.dumps(event) + "\\n")


class CounterSource(Source):
    def __init__(self):
        self.stopped = threading.Event()

    def configure(self, datasource, conf):
        self.datasource, self.conf = datasource, conf
        record(event="source_configure", datasource=datasource, conf=conf)

    def open(self, ctx):
        logger, n = ctx.get_logger(), 0
        while not self.stopped.is_set():
            n += 1
            ctx.emit({"n": n, "pid": os.getpid(), "datasource": self.datasource,
                      "logger": type(logger).__name__,
                      "is_logger": isinstance(logger, logging.Logger)},
                     {"rule": ctx.get_rule_id(), "op": ctx.get_op_id()})
            self.stopped.wait(float(self.conf.get("interval", 0.02)))

    def close(self, ctx):
        record(event="source_close", rule=ctx.get_rule_id())
        self.stopped.set()


class RecordSink(Sink):
    """Acks every item, like the official example's print sink."""

    def configure(self, conf):
        record(event="sink_configure", conf=conf)

    def open(self, ctx):
        record(event="sink_open", rule=ctx.get_rule_id())

    def collect(self, ctx, data):
        record(event="collect", data=data.decode())
        ctx.ack_ok()

    def close(self, ctx):
        record(event="sink_close")


class Revert(Function):
    def validate(self, args):
        return "" if len(args) == 1 else "revert wants 1 argument, got %d" % len(args)

    def exec(self, args, ctx):
        if args[0] == "boom":
            raise ValueError("boom requested")
        return {"value": args[0][::-1], "rule": ctx.get_rule_id(), "op": ctx.get_op_id(),
                "instance": ctx.get_instance_id()}

    def is_aggregate(self):
        return False


class Total(Function):
    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return sum(args[0])

    def is_aggregate(self):
        return True


if __name__ == "__main__":
    plugin.start(PluginConfig(NAME, {SRC: lambda: CounterSource()}, {SNK: lambda: RecordSink()},
                              {FN: lambda: Revert(), FN2: lambda: Total()}))
'''


@dataclass
class Plugin:
    dir: str
    name: str
    src: str
    snk: str
    fn: str
    fn2: str
    rule: str

    def events(self, kind: str = "") -> List[dict]:
        path = os.path.join(self.dir, "events.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            evs = [json.loads(line) for line in f if line.endswith("\n")]
        return [e for e in evs if not kind or e["event"] == kind]


def write_plugin(root: str, unique: str, main: str = MAIN, language: str = "python") -> Plugin:
    p = Plugin(dir=root, name=f"sdk_{unique}", src=f"src_{unique}", snk=f"snk_{unique}",
               fn=f"revert_{unique}", fn2=f"total_{unique}", rule=f"r_{unique}")
    os.makedirs(os.path.join(root, "sources"), exist_ok=True)
    head = "".join(f"{k} = {v!r}\n" for k, v in
                   (("NAME", p.name), ("SRC", p.src), ("SNK", p.snk), ("FN", p.fn), ("FN2", p.fn2)))
    with open(os.path.join(root, "main.py"), "w") as f:
        f.write(head + main)
    with open(os.path.join(root, p.name + ".json"), "w") as f:
        json.dump({"version": "v1.0.0", "language": language, "executable": "main.py",
                   "sources": [p.src], "sinks": [p.snk], "functions": [p.fn, p.fn2]}, f)
    with open(os.path.join(root, "sources", p.src + ".yaml"), "w") as f:
        f.write("default:\n  interval: 0.02\n")
    return p


@pytest.fixture
def plugin(tmp_path, unique) -> Plugin:
    return write_plugin(str(tmp_path / "plugin"), unique)


@pytest.fixture
def make_host(ipc_leak_check, reaper, tmp_path):
    """Host factory; every host is closed and every plugin process tree killed at teardown,
    then ipc_leak_check asserts no /tmp/*<unique>*.ipc is left."""
    hosts: List[Host] = []

    def make(plugin_dir: str, **kw) -> Host:
        kw.setdefault("stdout", open(tmp_path / f"plugin{len(hosts)}.log", "ab"))
        kw.setdefault("init_timeout", 20.0)
        host = Host(plugin_dir, **kw)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        pid = host.process.pid if host.process else None
        host.close()
        if pid:
            reaper(pid)
        if hasattr(host.stdout, "close"):
            host.stdout.close()


def started(host: Host) -> Host:
    host.start()
    return host


# --- handshake and control channel ------------------------------------------------------

def test_handshake_and_command_line_like_ekuiper(plugin, make_host):
    host = started(make_host(plugin.dir))
    assert host.name == plugin.name
    proc = psutil.Process(host.process.pid)
    assert proc.cmdline()[1:] == ["-u", os.path.join(plugin.dir, "main.py"), '{"sendTimeout":1000}']
    assert proc.cwd() == plugin.dir
    assert os.path.exists(f"/tmp/plugin_{plugin.name}.ipc")


def test_plugin_json_is_found_next_to_other_json_files(plugin, make_host):
    with open(os.path.join(plugin.dir, "rule.json"), "w") as f:
        json.dump({"id": "x"}, f)
    assert make_host(plugin.dir).name == plugin.name
    with open(os.path.join(plugin.dir, "other.json"), "w") as f:
        json.dump({"executable": "main.py"}, f)
    with pytest.raises(HostError, match="several plugin jsons"):
        Host(plugin.dir)


def test_early_exit_before_handshake_reports_exit_code(plugin, make_host):
    with open(os.path.join(plugin.dir, "main.py"), "w") as f:
        f.write("import sys\nsys.exit(3)\n")
    host = make_host(plugin.dir)
    with pytest.raises(HostError, match="exited with code 3 before the handshake"):
        host.start()


def test_handshake_timeout_kills_the_plugin(plugin, make_host):
    with open(os.path.join(plugin.dir, "main.py"), "w") as f:
        f.write("import time\ntime.sleep(60)\n")
    host = make_host(plugin.dir, init_timeout=0.5)
    with pytest.raises(HostError, match="handshake timed out after 0.5 s"):
        host.start()
    assert host.process.returncode == -9


def test_official_sdk_answers_unknown_symbol_with_a_key_error_traceback(plugin, make_host):
    """plugin.py means to answer b'symbol not found', but dict lookup raises first."""
    host = started(make_host(plugin.dir))
    with pytest.raises(HostError) as err:
        host.command("start", {"symbolName": "nosuch", "pluginType": "source",
                               "meta": {"ruleId": plugin.rule, "opId": "op", "instanceId": 0}})
    assert str(err.value) == "KeyError: 'nosuch'"
    assert err.value.answer.startswith("Traceback")
    assert host.commands == {}


def test_official_sdk_answers_a_bad_command_with_a_traceback(plugin, make_host):
    host = started(make_host(plugin.dir))
    answer = host.send_raw(b"this is not json")
    assert answer.startswith("Traceback") and "JSONDecodeError" in answer
    host.start_function(plugin.fn)  # the channel still works afterwards


def test_official_sdk_rejects_empty_op_id_with_a_type_error(plugin, make_host):
    """symbol.parse_context does ``raise (tuple)``, which is itself a TypeError."""
    host = started(make_host(plugin.dir))
    with pytest.raises(HostError, match="exceptions must derive from BaseException"):
        host.start_source(plugin.src, plugin.rule, op="")


# --- sources ----------------------------------------------------------------------------

def test_source_items_arrive_in_order_with_meta(plugin, make_host):
    host = started(make_host(plugin.dir))
    src = host.start_source(plugin.src, plugin.rule, config={"interval": 0.005})
    items = [src.recv() for _ in range(5)]
    assert [i["message"]["n"] for i in items] == [1, 2, 3, 4, 5]
    assert items[0]["meta"] == {"rule": plugin.rule, "op": "op"}
    assert os.path.exists(f"/tmp/{plugin.rule}_op_0.ipc")


def test_official_sdk_passes_empty_datasource(plugin, make_host):
    """eKuiper 2.x sends the stream's datasource in config["datasource"] (and, when set,
    top-level "dataSource"); the SDK reads a top-level "datasource" key and always gets ""."""
    host = started(make_host(plugin.dir))
    a = host.start_source(plugin.src, plugin.rule, op="a", config={"datasource": "topic/a"})
    b = host.start_source(plugin.src, plugin.rule, op="b", datasource="topic/b")
    assert a.recv()["message"]["datasource"] == ""
    assert b.recv()["message"]["datasource"] == ""
    confs = wait_until(lambda: len(plugin.events("source_configure")) == 2 and
                       plugin.events("source_configure"), message="two configure calls")
    assert {c["conf"].get("datasource") for c in confs} == {"topic/a", None}


def test_official_sdk_get_logger_returns_stdout_not_a_logger(plugin, make_host):
    host = started(make_host(plugin.dir))
    msg = host.start_source(plugin.src, plugin.rule).recv()["message"]
    assert msg["logger"] == "TextIOWrapper" and msg["is_logger"] is False


def test_source_stop_closes_then_stops_and_can_start_again(plugin, make_host):
    host = started(make_host(plugin.dir))
    src = host.start_source(plugin.src, plugin.rule)
    src.recv()
    src.stop()
    assert not os.path.exists(f"/tmp/{plugin.rule}_op_0.ipc")
    assert (plugin.rule, "op", 0) not in host.commands
    wait_until(lambda: plugin.events("source_close"), message="source close")
    with pytest.raises(HostError, match="stopped"):
        src.recv()
    src.stop()  # idempotent
    again = host.start_source(plugin.src, plugin.rule)
    assert again.recv()["message"]["n"] == 1


def test_official_sdk_answers_ok_to_stop_of_an_unknown_instance(plugin, make_host):
    host = started(make_host(plugin.dir))
    host.command("stop", {"symbolName": plugin.src, "pluginType": "source",
                          "meta": {"ruleId": plugin.rule, "opId": "never", "instanceId": 0}})


# --- sinks ------------------------------------------------------------------------------

def test_sink_collects_items_and_acks_each_with_require_ack(plugin, make_host):
    host = started(make_host(plugin.dir))
    sink = host.start_sink(plugin.snk, plugin.rule, config={"format": "json"}, require_ack=True)
    assert sink.require_ack
    acks = [sink.collect(json.dumps([{"i": i}]).encode()) for i in range(5)]
    assert acks == [{}] * 5
    got = wait_until(lambda: len(plugin.events("collect")) == 5 and plugin.events("collect"),
                     message="5 collects")
    assert [json.loads(e["data"])[0]["i"] for e in got] == list(range(5))
    assert plugin.events("sink_configure")[0]["conf"] == {"format": "json", "requireAck": True}
    with pytest.raises(HostError, match="no ack"):
        sink.recv_ack(timeout=0.2)  # exactly one ack per item
    sink.stop()
    wait_until(lambda: plugin.events("sink_close"), message="sink close")
    assert not os.path.exists(f"/tmp/{plugin.rule}_op_0.ipc")  # the plugin closed its listener


def test_official_sdk_ack_ok_without_require_ack_piles_up_acks(plugin, make_host):
    """Without requireAck eKuiper reads no ack, but the SDK example acks anyway."""
    host = started(make_host(plugin.dir))
    sink = host.start_sink(plugin.snk, plugin.rule)
    assert not sink.require_ack
    for i in range(10):
        assert sink.collect(b'[{"i":%d}]' % i) is None
    wait_until(lambda: len(plugin.events("collect")) == 10, message="10 collects")
    assert [sink.recv_ack(timeout=2) for _ in range(10)] == [{}] * 10  # all unread


def test_official_sdk_ack_ok_without_require_ack_kills_the_sink_when_acks_fill_the_buffer(
        plugin, make_host):
    """After a few hundred unread acks the SDK's ack send times out (1 s), its sink thread
    dies and closes the data listener, and eKuiper's next send times out."""
    host = started(make_host(plugin.dir))
    sink = host.start_sink(plugin.snk, plugin.rule)
    with pytest.raises(HostError, match="send timed out"):
        for _ in range(20000):
            sink.send(b"[{}]")
    assert plugin.events("sink_close"), "the SDK closed the sink on its own"
    assert (plugin.rule, "op", 0) in host.commands  # eKuiper never asked it to stop
    collected = len(plugin.events("collect"))
    assert 10 < collected < 20000
    with open(host.stdout.name, "rb") as f:
        log = f.read()
    assert b"ack_ok" in log and b"Timeout" in log


def test_sink_start_fails_when_nothing_listens_on_the_data_path(tmp_path, unique, make_host):
    """eKuiper dials the sink data path synchronously after start; a plugin that answers ok
    without listening makes the start fail, and the host then sends stop."""
    fake = write_plugin(str(tmp_path / "fake"), unique, main=textwrap.dedent('''
        import json, os, pynng
        s = pynng.Req0(recv_timeout=20000)
        s.dial("ipc:///tmp/plugin_%s.ipc" % NAME, block=True)
        s.send(b"handshake")
        while True:
            cmd = json.loads(s.recv())
            with open("commands.jsonl", "a") as f:
                f.write(json.dumps(cmd) + "\\n")
            s.send(b"ok")
    '''))
    host = started(make_host(fake.dir))
    with pytest.raises(HostError, match="can't dial on push socket"):
        host.start_sink(fake.snk, fake.rule)
    with open(os.path.join(fake.dir, "commands.jsonl")) as f:
        cmds = [json.loads(line)["cmd"] for line in f]
    assert cmds == ["start", "stop"]
    assert host.commands == {}
    assert not ipc_files(fake.rule)


# --- functions --------------------------------------------------------------------------

def test_function_validate_exec_and_is_aggregate(plugin, make_host):
    host = started(make_host(plugin.dir))
    fn = host.start_function(plugin.fn)
    assert fn.validate(["x"]) == {"state": True, "result": ""}
    assert fn.validate([]) == {"state": False, "result": "revert wants 1 argument, got 0"}
    assert fn.is_aggregate() == {"state": True, "result": False}
    assert fn.exec(["abc"], rule="ru", op="pr", instance=2, func_id=1) == {
        "state": True, "result": {"value": "cba", "rule": "ru", "op": "pr", "instance": 2}}
    failed = fn.exec(["boom"])
    assert failed["state"] is False and "ValueError: boom requested" in failed["result"]
    total = host.start_function(plugin.fn2)
    assert total.is_aggregate() == {"state": True, "result": True}
    assert total.exec([[1, 2, 3]]) == {"state": True, "result": 6}
    # every function start shares eKuiper's empty meta key: only the last one is recorded
    assert list(host.commands) == [("", "", 0)]
    assert host.commands[("", "", 0)]["arg"] == {
        "symbolName": plugin.fn2, "meta": {"ruleId": "", "opId": "", "instanceId": 0}, "pluginType": "func"}


def test_function_close_only_closes_the_channel(plugin, make_host):
    host = started(make_host(plugin.dir))
    fn = host.start_function(plugin.fn)
    assert fn.exec(["ab"])["result"]["value"] == "ba"
    fn.close()
    assert not os.path.exists(f"/tmp/func_{plugin.fn}.ipc")
    assert ("", "", 0) in host.commands  # never stopped
    with pytest.raises(HostError, match="closed"):
        fn.exec(["ab"])
    fn.close()  # idempotent


def test_idle_channels_survive_the_sdk_keepalive_handshakes(plugin, make_host):
    """The SDK re-sends b"handshake" after 5 s without a command; the host must take those
    as late handshakes and send its command again, on both kinds of channel."""
    host = started(make_host(plugin.dir))
    fn = host.start_function(plugin.fn)
    assert fn.exec(["ab"])["state"] is True
    threading.Event().wait(6.5)  # the idle period under test, not a synchronisation
    assert fn.exec(["cd"])["result"]["value"] == "dc"
    src = host.start_source(plugin.src, plugin.rule)
    assert src.recv()["message"]["n"] == 1


# --- restart and kill -------------------------------------------------------------------

def test_restart_replays_starts_but_only_the_last_function(plugin, make_host):
    """eKuiper records function starts under one empty meta, so after a plugin restart only
    the last started function symbol comes back; the other one times out."""
    host = started(make_host(plugin.dir, recv_timeout=1.0))
    src = host.start_source(plugin.src, plugin.rule, op="src")
    sink = host.start_sink(plugin.snk, plugin.rule, op="snk", require_ack=True)
    first, last = host.start_function(plugin.fn), host.start_function(plugin.fn2)
    old_pid = host.process.pid
    assert src.recv()["message"]["pid"] == old_pid
    host.restart_plugin()
    assert host.process.pid != old_pid and not psutil.pid_exists(old_pid)
    wait_until(lambda: src.recv()["message"]["pid"] == host.process.pid, message="new source")
    assert sink.collect(b"[{}]") == {}
    assert last.exec([[1, 2]]) == {"state": True, "result": 3}
    with pytest.raises(HostError, match=f"time out, plugin {plugin.name} status running"):
        first.exec(["ab"])
    assert len(plugin.events("sink_configure")) == 2


def test_a_replayed_start_of_a_closed_function_makes_the_official_sdk_exit(plugin, make_host):
    """The SDK's function channel calls exit(0) on the control thread when its dial fails
    (50 x 0.1 s), which ends the whole plugin process."""
    host = started(make_host(plugin.dir))
    host.start_function(plugin.fn).close()
    with pytest.raises(HostError, match="exited with code 0"):
        host.restart_plugin()


def test_kill_leaves_no_process(plugin, make_host):
    host = started(make_host(plugin.dir))
    host.start_source(plugin.src, plugin.rule)
    host.start_function(plugin.fn)
    pid = host.process.pid
    family = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    host.kill()
    assert host.process.returncode == -9
    assert not any(psutil.pid_exists(p) for p in family)
    host.kill()  # idempotent
    host.close()
    host.close()
    assert not ipc_files(plugin.rule) and not ipc_files(plugin.name)


def test_close_stops_everything_and_removes_every_ipc_file(plugin, make_host, unique):
    host = started(make_host(plugin.dir))
    host.start_source(plugin.src, plugin.rule, op="s")
    host.start_sink(plugin.snk, plugin.rule, op="k", require_ack=True)
    host.start_function(plugin.fn)
    assert len(ipc_files(unique)) == 5  # control, source, sink data + ack, function
    with host:
        pass
    assert plugin.events("source_close") and plugin.events("sink_close")
    assert not ipc_files(unique)
    assert kill_tree(host.process.pid) == []


# --- the try runner ---------------------------------------------------------------------

def test_run_rule_drives_the_official_sdk_plugin(plugin, ipc_leak_check):
    with open(os.path.join(plugin.dir, "rule.json"), "w") as f:
        json.dump({"id": plugin.rule, "source": {"symbol": plugin.src, "datasource": "demo"},
                   "functions": [{"symbol": plugin.fn, "args": ["$.logger"], "as": "rev"},
                                 {"symbol": plugin.fn2, "args": [[1, 2]]}],
                   "sink": {"symbol": plugin.snk, "config": {"requireAck": True}},
                   "count": 3, "timeout": 20}, f)
    out = io.StringIO()
    assert run_rule(plugin.dir, out=out) == 0, out.getvalue()
    lines = [ln.split(" | ", 1)[1] for ln in out.getvalue().splitlines() if ln.startswith("try ")]
    assert lines[0].startswith(f"plugin {plugin.name}: started, pid ")
    assert sum(ln.startswith("#") and " source " in ln for ln in lines) == 3
    assert sum(ln.endswith("sink acked {}") for ln in lines) == 3
    assert '#1 %s("TextIOWrapper") -> {"value":"repparWOItxeT"' % plugin.fn in out.getvalue()
    assert lines[-1].startswith("done: 3 rows")
    conf = plugin.events("source_configure")[0]["conf"]
    assert conf["datasource"] == "demo" and conf["format"] == "json" and conf["interval"] == 0.02
    collected = json.loads(plugin.events("collect")[0]["data"])
    assert collected[0]["rev"]["value"] == "repparWOItxeT" and collected[0][plugin.fn2] == 3
    assert plugin.events("source_close") and plugin.events("sink_close")


def test_run_rule_reports_a_bad_rule_in_one_line(plugin, ipc_leak_check):
    rule = os.path.join(plugin.dir, "bad.json")
    cases = [
        ({"source": {"symbol": plugin.src}}, "missing required key 'id'"),
        ({"id": "a b", "source": {"symbol": plugin.src}}, "id 'a b' may only contain"),
        ({"id": "x", "source": {"symbol": "nope"}}, "source.symbol 'nope' is not one of"),
        ({"id": "x", "source": {"symbol": plugin.src}, "functions": [{"symbol": plugin.fn, "args": 1}]},
         "functions[0].args must be a list"),
        ({"id": "x", "source": {"symbol": plugin.src}, "count": 0}, "count must be a positive integer"),
        ({"id": "x", "source": {"symbol": plugin.src}, "sinks": {}}, "unknown key 'sinks'"),
    ]
    for body, expected in cases:
        with open(rule, "w") as f:
            json.dump(body, f)
        out, err = io.StringIO(), io.StringIO()
        assert run_rule(plugin.dir, rule_file=rule, out=out, err=err) == 2
        assert err.getvalue().count("\n") == 1 and expected in err.getvalue(), err.getvalue()
        assert err.getvalue().startswith("kuiper-pool try: ") and out.getvalue() == ""
    with open(rule, "w") as f:
        f.write("{nope")
    with pytest.raises(RuleError, match="bad.json is not valid JSON"):
        load_rule(rule)


def test_run_rule_reports_a_failing_function_and_cleans_up(plugin, ipc_leak_check):
    with open(os.path.join(plugin.dir, "rule.json"), "w") as f:
        json.dump({"id": plugin.rule, "source": {"symbol": plugin.src},
                   "functions": [{"symbol": plugin.fn, "args": ["boom"]}], "count": 2}, f)
    out, err = io.StringIO(), io.StringIO()
    assert run_rule(plugin.dir, out=out, err=err) == 1
    assert err.getvalue().splitlines() == [err.getvalue().strip()], err.getvalue()
    assert err.getvalue().startswith(f"kuiper-pool try: function {plugin.fn} failed on row #1: ")


def test_pysam_example_runs_under_the_official_sdk(tmp_path, unique, ipc_leak_check):
    """The kuiper_pool pysam example, with its imports switched back to ``ekuiper`` and its
    names made unique, runs through `try` unchanged otherwise."""
    dst = str(tmp_path / "pysam")
    names = unique_pysam(dst, unique, sdk="ekuiper")
    out = io.StringIO()
    assert run_rule(dst, out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert re.search(r'#5 source \{"name":"sink","value":5\}', text), text
    assert f'#1 {names["revert"]}("pyjson") -> "nosjyp"' in text
    assert text.count("sink acked {}") == 5
