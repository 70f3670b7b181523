"""Random and hostile input on every channel eKuiper talks to a running plugin over: the
control channel, a sink's data path and a function's channel. Each answer must be one line
(or a ``{"state", "result"}`` reply), the supervisor must stay the same process, and healthy
instances started before the barrage must keep working after it.

One plugin per test, started before hypothesis runs: examples are fed to the running plugin
(fixtures tear it down however hypothesis ends).
"""
from __future__ import annotations

import json
import os
import socket
import struct

import pynng
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_until
from kuiper_pool.tools.emulator import HostError, control, go_json
from kuiper_pool.transport import TransportError, sp
from plugins import COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, make_plugin, read_jsonl

FUZZ = settings(max_examples=40, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
SP_PUSH_HEADER = b"\x00SP\x00\x00\x50\x00\x00"  # SP over ipc: magic, version, protocol 0x50 (push)


def deep(depth: int, inner: str = "{}") -> str:
    return '{"k":' * depth + inner + "}" * depth


class Plugin:
    """A running plugin with one healthy source, sink and function, checked after barrages."""

    def __init__(self, tmp_path, unique: str, host_runs) -> None:
        self.u = unique
        self.src, self.snk, self.fn = f"src{unique}", f"snk{unique}", f"fn{unique}"
        self.dir = make_plugin(str(tmp_path), f"p{unique}", sources={self.src: COUNTING_SOURCE},
                               sinks={self.snk: RECORDING_SINK}, functions={self.fn: MODE_FUNCTION},
                               settings={"dial_timeout": 1.0})
        self.host = host_runs.launch(self.dir, command_timeout=15.0, recv_timeout=15.0)
        self.pid = self.host.process.pid
        self.items = os.path.join(str(tmp_path), "items.jsonl")
        self.source = self.host.start_source(self.src, f"r{unique}", op="src")
        self.sink = self.host.start_sink(self.snk, f"r{unique}", op="snk", config={"file": self.items})
        self.func = self.host.start_function(self.fn)
        self.good = 0
        self.healthy()

    def log_tail(self) -> str:
        with open(os.path.join(self.dir, "stdout.log"), "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")

    def assert_alive(self, what: object = "") -> None:
        assert self.host.alive() and self.host.process.pid == self.pid, (
            f"supervisor died after {str(what)[:300]}; its output ends:\n{self.log_tail()}")

    def healthy(self) -> None:
        """The source flows, the sink records a fresh good item, the function answers."""
        self.assert_alive("the barrage")
        n = self.source.recv()["message"]["n"]
        assert self.source.recv()["message"]["n"] > n
        self.good += 1
        marker = f"good-{self.u}-{self.good}"
        self.sink.send(marker.encode())
        wait_until(lambda: any(r["data"] == marker for r in read_jsonl(self.items, "item")),
                   message=f"sink to record {marker}")
        assert self.func.exec(["echo", marker]) == {"state": True, "result": marker}

    def command(self, payload: bytes) -> str:
        """Send raw bytes as a command; the answer must be ``ok`` or one line."""
        self.assert_alive(payload)
        try:
            answer = self.host.send_raw(payload)
        except HostError as e:
            self.assert_alive(payload)
            raise AssertionError(f"no answer to {payload[:200]!r}: {e}") from None
        assert answer and "\n" not in answer and "\r" not in answer, (payload[:200], answer[:300])
        return answer


def test_control_channel_survives_random_and_malformed_commands(tmp_path, unique, host_runs):
    p = Plugin(tmp_path, unique, host_runs)
    names = st.sampled_from([p.src, p.snk, p.fn, "nosuch" + unique, "x" * 300, "\x00" + p.src,
                             "\ud800", ""]) | st.text(max_size=12)
    wrong = st.fixed_dictionaries({}, optional={
        "symbolName": names | json_values,
        "pluginType": st.sampled_from(["source", "sink", "func", "widget"]) | json_values,
        "meta": json_values | st.fixed_dictionaries({}, optional={
            "ruleId": st.sampled_from(["q" + unique, "", "a\x00b"]) | json_values,
            "opId": st.sampled_from(["o", ""]) | json_values,
            "instanceId": st.integers(min_value=-(1 << 64), max_value=1 << 70) | json_values}),
        "config": json_values, "dataSource": json_values})

    def as_command(cmd, arg) -> bytes:
        return json.dumps({"cmd": cmd, "arg": arg}).encode()

    def start_of(symbol: str, ptype: str, config_text: str) -> bytes:
        arg = (f'{{"symbolName":"{symbol}","meta":{{"ruleId":"q{unique}","opId":"o","instanceId":0}},'
               f'"pluginType":"{ptype}","config":{config_text}}}')
        return as_command("start", arg)

    cmds = st.sampled_from(["start", "stop", "restart", "", None])
    commands = st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(cmds, json_values).map(lambda t: as_command(t[0], json.dumps(t[1]))),
        st.tuples(cmds, json_values).map(lambda t: as_command(*t)),
        st.tuples(st.sampled_from(["start", "stop"]), wrong).map(lambda t: as_command(t[0], json.dumps(t[1]))),
        st.sampled_from([1000, 10000]).map(lambda d: start_of(p.src, "source", deep(d))),
        st.sampled_from([1000, 10000]).map(lambda d: as_command("start", "[" * d + "]" * d)),
        st.sampled_from([1000, 10000]).map(lambda d: ('{"cmd":"start","arg":' * d + '""' + "}" * d).encode()),
        st.just(1_000_000).map(lambda n: start_of("y" * n, "source", "{}")),
        st.just(2_000_000).map(lambda n: as_command("start", "z" * n)),
        st.just(start_of(p.src, "source", '{"x":NaN}')),
        st.just(b""),
        st.text(max_size=10).map(lambda s: start_of("nosuch" + unique + s.replace('"', ""), "sink", "{}")),
        st.just(as_command("stop", json.dumps(control(p.snk, "sink", "nobody" + unique, "o", 3)))),
        st.just(as_command("stop", json.dumps(control(p.fn, "func")))),
        st.just(as_command("start", json.dumps(control(p.fn, "func")))),
        st.just(as_command("start", json.dumps(control(p.src, "source", f"r{unique}", "src")))),
    )

    @given(commands)
    @FUZZ
    def barrage(payload: bytes) -> None:
        p.command(payload)

    barrage()
    p.healthy()


def sp_frames(payloads) -> bytes:
    return b"".join(struct.pack("!Q", len(x)) + x for x in payloads)


def test_sink_data_path_survives_hostile_pushers(tmp_path, unique, host_runs):
    p = Plugin(tmp_path, unique, host_runs)
    path = p.sink.url[len("ipc://"):]
    pusher = pynng.Push0(send_timeout=5000)
    pusher.dial(p.sink.url, block=True)
    raw_streams = st.one_of(
        st.binary(max_size=64),                                                  # bad SP header
        st.binary(max_size=64).map(lambda b: SP_PUSH_HEADER + b),                # bad frames
        st.lists(st.binary(max_size=64), max_size=5).map(lambda xs: SP_PUSH_HEADER + sp_frames(xs)),
        st.integers(min_value=1 << 20, max_value=(1 << 64) - 1).map(             # lying length
            lambda n: SP_PUSH_HEADER + struct.pack("!Q", n) + b"x" * 100),
        st.just(SP_PUSH_HEADER + sp_frames([b""])),                              # 0-byte item
        st.just(2_000_000).map(lambda n: SP_PUSH_HEADER + sp_frames([b"\xff" * n])),  # huge item
        st.just(b"\x00SP\x00\x00\x51\x00\x00" + sp_frames([b"pull speaking"])),  # wrong protocol
    )
    items = st.binary(max_size=200) | st.sampled_from([b"", b"\xff"]).map(lambda b: b * 900_000)

    @given(st.one_of(raw_streams.map(lambda b: ("raw", b)), items.map(lambda b: ("push", b))))
    @FUZZ
    def barrage(case) -> None:
        kind, data = case
        if kind == "push":
            # a fresh native pusher per example (as mangos writes: one frame per write); pynng
            # sockets made and closed per example can hang in nng_close (nanomsg/nng#2238)
            try:
                extra = sp.connect(path, sp.PUSH, sp.PULL, 2.0)
            except (OSError, TransportError):
                extra = None
            try:
                if extra is not None:
                    extra.settimeout(2.0)
                    extra.sendall(sp.frame(data))
                pusher.send(data)  # and the long-lived pynng pusher, the independent peer
            except (OSError, pynng.Timeout):
                pass  # the sink may hold back (window full); dropping an item is the sender's call
            finally:
                if extra is not None:
                    extra.close()
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                try:
                    s.connect(path)
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    s.recv(64)  # whatever the supervisor answers, or its close
                except OSError:
                    pass
        p.assert_alive(case)

    try:
        barrage()
    finally:
        pusher.close()
    p.healthy()


MISBEHAVING = {"exit", "segv", "loop", "hang", "stop", "sleep", "mem", "raise"}


def test_function_channel_answers_every_random_call(tmp_path, unique, host_runs):
    p = Plugin(tmp_path, unique, host_runs)
    fmeta = go_json({"ruleId": "r", "opId": "o", "instanceId": 0, "funcId": 0}).decode()
    safe_args = st.lists(json_values, max_size=4).filter(
        lambda a: not (a and isinstance(a[0], str) and a[0] in MISBEHAVING))
    calls = st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({}, optional={
            "func": st.sampled_from(["Exec", "Validate", "IsAggregate"]) | json_values,
            "arg": json_values}).map(lambda d: json.dumps(d).encode()),
        safe_args.map(lambda a: go_json({"func": "Exec", "arg": a + [fmeta]})),
        st.tuples(safe_args, json_values).map(
            lambda t: go_json({"func": "Exec", "arg": t[0] + [json.dumps(t[1])]})),
        st.sampled_from([1000, 10000]).map(lambda d: ('{"func":"Exec","arg":' + "[" * d + "]" * d + "}").encode()),
        st.sampled_from([1000, 10000]).map(lambda d: deep(d).encode()),
        st.just(b""),
        st.just(2_000_000).map(lambda n: go_json({"func": "Exec", "arg": ["echo", "x" * n, fmeta]})),
    )

    @given(calls)
    @FUZZ
    def barrage(payload: bytes) -> None:
        p.assert_alive(payload)
        try:
            reply = p.func.request(payload)
        except HostError as e:
            p.assert_alive(payload)
            raise AssertionError(f"no valid reply to {payload[:200]!r}: {e}") from None
        assert isinstance(reply, dict) and set(reply) == {"state", "result"}, reply
        assert isinstance(reply["state"], bool)
        json.dumps(reply, allow_nan=False)  # what Go decodes
        if not reply["state"]:
            assert isinstance(reply["result"], str) and "\n" not in reply["result"], reply

    barrage()
    p.healthy()
