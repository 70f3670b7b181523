"""What the served function gets from eKuiper's protobuf JSON body, and what eKuiper reads
back (kuiper_pool/transport/rest.py, kuiper_pool/serve/schema.py; docs/serve.md, "What eKuiper sends")."""
from __future__ import annotations

import json

import pytest

from kuiper_pool.serve.schema import proto_text
from kuiper_pool.transport.rest import CallError, decode_args, encode_result


def test_protobuf_json_becomes_the_argument_list():
    types = ["string", "double", "int64", "bool", "bytes"]
    body = b'{"arg0":"a","arg1":"NaN","arg2":"9007199254740993","arg3":true,"arg4":"AAE="}'
    args = decode_args(body, types)
    assert args[0] == "a" and args[1] != args[1] and args[2] == 9007199254740993
    assert args[3] is True and args[4] == "AAE="
    # zero values are left out of protobuf JSON: they come back as zero values
    assert decode_args(b"{}", types) == ["", 0.0, 0, False, ""]


@pytest.mark.parametrize("body", [b'{"arg0": 1}', b'not json', b'[]'])
def test_a_body_eKuiper_would_not_send_is_refused(body):
    with pytest.raises(CallError):
        decode_args(body, ["string"])


@pytest.mark.parametrize("result,rtype,expected", [
    ("text", "string", (200, b"text")),
    ({"a": [1, 2]}, "string", (200, b'{"a":[1,2]}')),
    (2.5, "double", (200, b"2.5")),
    (7, "int64", (200, b"7")),
    (False, "bool", (200, b"false")),
    ("7", "int64", 500),
    (2.5, "int64", 500),
])
def test_results_are_text_eKuiper_casts_into_the_wrapper_type(result, rtype, expected):
    status, body = encode_result(json.dumps({"state": True, "result": result}).encode(), rtype)
    assert (status, body) == expected if isinstance(expected, tuple) else status == expected


def test_an_error_reply_is_a_500_with_its_line():
    assert encode_result(b'{"state": false, "result": "plugin p function f: boom"}', "string") == \
        (500, b"plugin p function f: boom")


def test_the_schema_has_one_rpc_and_one_message_per_function():
    text = proto_text("my-plugin", {"detect": (["string", "double"], "double"), "noargs": ([], "bool")})
    assert "package kuiper_pool.my_plugin;" in text
    assert "rpc detect(detect_args) returns (google.protobuf.DoubleValue) {}" in text
    assert "message detect_args {\n  string arg0 = 1;\n  double arg1 = 2;\n}" in text
    assert "message noargs_args {\n}" in text
