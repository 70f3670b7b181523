"""parse_command and the other readers of eKuiper's bytes, fed random and hostile input:
each either returns a valid value or raises ProtocolError with a one-line message."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kuiper_pool import wire
from kuiper_pool.tools.emulator import control, go_json

EXAMPLES = settings(max_examples=300, deadline=None)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)
names = st.text(min_size=1, max_size=20)
odd = json_values  # any JSON value where a field of a particular type is expected


def parse(raw: bytes):
    """parse_command's result, or its ProtocolError after checking the message is one line."""
    try:
        ctrl = wire.parse_command(raw)
    except wire.ProtocolError as e:
        text = str(e)
        assert text and "\n" not in text and "\r" not in text, repr(text)
        assert wire.one_line(f"plugin p: {e}").decode("utf-8")  # answerable as one UTF-8 line
        return e
    assert isinstance(ctrl, wire.Control)
    assert ctrl.cmd in (wire.CMD_START, wire.CMD_STOP)
    assert ctrl.plugin_type in wire.PLUGIN_TYPES and isinstance(ctrl.symbol, str) and ctrl.symbol
    assert isinstance(ctrl.config, dict) and isinstance(ctrl.data_source, str)
    assert isinstance(ctrl.instance_id, int) and 0 <= ctrl.instance_id <= wire.MAX_INSTANCE_ID
    for text in (ctrl.symbol, ctrl.rule_id, ctrl.op_id, ctrl.key, ctrl.describe()):
        text.encode("utf-8")  # socket paths and log lines are built from these
    json.dumps(ctrl.to_dict())  # it travels to the worker as JSON
    wire.require_ack(ctrl.config)
    ctrl.datasource()
    return ctrl


def command(cmd, arg) -> bytes:
    return json.dumps({"cmd": cmd, "arg": arg}).encode()


def start(ctrl) -> bytes:
    return command("start", json.dumps(ctrl))


@given(st.binary(max_size=512))
@EXAMPLES
def test_random_bytes(raw):
    parse(raw)


@given(json_values)
@EXAMPLES
def test_random_json_command(value):
    parse(json.dumps(value).encode())


@given(st.sampled_from(["start", "stop", 1, None]), json_values)
@EXAMPLES
def test_random_json_arg(cmd, arg):
    parse(command(cmd, json.dumps(arg)))
    parse(command(cmd, arg))


@given(st.fixed_dictionaries({}, optional={
    "symbolName": odd | names, "pluginType": odd | st.sampled_from(wire.PLUGIN_TYPES),
    "meta": odd | st.fixed_dictionaries({}, optional={
        "ruleId": odd | names, "opId": odd | names,
        "instanceId": odd | st.integers(min_value=-2, max_value=1 << 70)}),
    "config": odd, "dataSource": odd}))
@EXAMPLES
def test_plausible_controls_with_wrong_types(ctrl):
    parse(start(ctrl))
    parse(command("stop", json.dumps(ctrl)))


@given(st.sampled_from(["symbolName", "ruleId", "opId"]), st.text(min_size=1, max_size=10),
       st.sampled_from(["\x00", "\n", "\ud800", "\udfff"]))
@EXAMPLES
def test_names_that_cannot_be_paths_or_log_lines(field, text, bad):
    ctrl = control("sym", "sink", "rule", "op", 0)
    value = text + bad
    if field == "symbolName":
        ctrl["symbolName"] = value
    else:
        ctrl["meta"][field] = value
    assert isinstance(parse(start(ctrl)), wire.ProtocolError)


def test_a_valid_start_and_stop_decode():
    ctrl = control("sym", "sink", "rule", "op", 3, config={"requireAck": True, "a": [1, {"b": None}]})
    got = parse(go_json({"cmd": "start", "arg": go_json(ctrl).decode()}))
    assert (got.cmd, got.symbol, got.plugin_type, got.rule_id, got.op_id, got.instance_id) == \
        ("start", "sym", "sink", "rule", "op", 3)
    assert wire.require_ack(got.config)
    assert parse(go_json({"cmd": "stop", "arg": go_json(control("f", "func")).decode()})).key == "func:f"


def nested(depth: int) -> dict:
    """Objects nesting ``depth`` levels, built without recursion."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def deep_text(depth: int) -> str:
    return '{"k":' * (depth - 1) + "{}" + "}" * (depth - 1)


@pytest.mark.parametrize("depth", [wire.MAX_DEPTH + 1, 1000, 10000])
def test_deep_config_is_refused_naming_the_symbol(depth):
    arg = '{"symbolName":"deep","pluginType":"source","meta":{"ruleId":"r","opId":"o"},"config":' \
          + deep_text(depth) + "}"
    e = parse(command("start", arg))
    assert isinstance(e, wire.ProtocolError)
    assert "deep" in str(e) and str(wire.MAX_DEPTH) in str(e)


@pytest.mark.parametrize("depth", [1000, 10000])
def test_deep_command_itself_is_refused(depth):
    assert isinstance(parse(("[" * depth + "]" * depth).encode()), wire.ProtocolError)
    assert isinstance(parse(deep_text(depth).encode()), wire.ProtocolError)


def test_control_at_the_depth_limit_is_accepted():
    ctrl = control("sym", "source", "r", "o")
    ctrl["config"] = nested(wire.MAX_DEPTH - 1)  # the Control object is one level
    assert isinstance(parse(start(ctrl)), wire.Control)
    ctrl["config"] = nested(wire.MAX_DEPTH)
    assert isinstance(parse(start(ctrl)), wire.ProtocolError)


@pytest.mark.parametrize("raw, words", [
    (b"", ["empty"]),
    (b"\xff\xfe{\x00}\x00", ["utf-8"]),
    (b'{"cmd":"start","arg":"{\\"symbolName\\":\\"s\\",\\"pluginType\\":\\"func\\",\\"config\\":{\\"x\\":NaN}}"}',
     ["nan"]),
    (command("start", json.dumps(control("s", "source", "r", "o", -1))), ["instanceId"]),
    (command("start", json.dumps(control("s", "source", "r", "o", 1 << 63))), ["instanceId"]),
    (command("start", json.dumps(control("s", "source", "r", "o", 1.0))), ["instanceId"]),
    (command("start", json.dumps({**control("s", "source", "r", "o"), "config": []})), ["config"]),
    (command("start", json.dumps({**control("s", "source", "r", "o"), "dataSource": 7})), ["dataSource"]),
    (command("start", {"symbolName": "s"}), ["arg"]),
    (b'{"cmd":"start","arg":"' + b"1" * 5000 + b'"}', ["json"]),
    (b'{"cmd":' + b"9" * 5000 + b"}", ["json"]),
])
def test_malformed_commands_name_their_fault(raw, words):
    e = parse(raw)
    assert isinstance(e, wire.ProtocolError)
    for word in words:
        assert word.lower() in str(e).lower(), (word, str(e))


def test_huge_command_is_refused_without_decoding():
    e = parse(b" " * (wire.MAX_COMMAND_BYTES + 1))
    assert isinstance(e, wire.ProtocolError) and "larger" in str(e)


@given(odd | st.text())
@EXAMPLES
def test_require_ack_never_raises(value):
    assert isinstance(wire.require_ack({"requireAck": value}), bool)
    assert wire.require_ack(value) is False or isinstance(value, dict)


@given(st.text() | st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")))
@EXAMPLES
def test_one_line_is_one_utf8_line(text):
    line = wire.one_line(text)
    assert b"\n" not in line and b"\r" not in line and line
    line.decode("utf-8")


@given(json_values | st.floats() | st.builds(object))
@EXAMPLES
def test_func_reply_is_always_strict_json(result):
    reply = json.loads(wire.func_reply(True, result), parse_constant=lambda c: pytest.fail(c))
    assert set(reply) == {"state", "result"} and isinstance(reply["state"], bool)


# what Go's encoding/json can write: finite floats, integers of at most 64 bits
go_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
                         | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                         lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


@given(go_values)
@EXAMPLES
def test_loads_reads_what_go_writes_as_json_does(value):
    wire.encoder()  # chooses loads too (orjson under the fast extra)
    raw = go_json({"func": "Exec", "arg": [value]})
    assert wire.loads(raw) == json.loads(raw)
