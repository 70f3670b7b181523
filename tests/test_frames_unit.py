"""The typed messages on a worker's link: each decodes to what was encoded, under its own
frame type, and no kind's frame type is one every kind speaks (a link serves one kind, so
kinds may share a type byte among themselves, never with the generic frames)."""
from __future__ import annotations

import os

import pytest

from kuiper_pool.runtime import frames
from kuiper_pool.runtime.kinds.function import frames as fn
from kuiper_pool.runtime.kinds.sink import frames as sink

MESSAGES = [
    (frames.READY, frames.Ready(None)), (frames.READY, frames.Ready("plugin p sink s: open failed")),
    (frames.BEAT, frames.Beat(7, 12.5, 0.25, 2)), (frames.BEAT, frames.Beat(0, 0.0, None)),
    (frames.FAULT, frames.Fault("plugin p function f: exec raised ValueError: x")),
    (sink.DONE, sink.Done(2 ** 40)), (sink.ACK, sink.Ack(3, b'{"state": true}')),
    (sink.LOST, sink.Lost(sink.Why.LARGE)), (sink.ACK_REST, sink.AckRest(b"end")),
    (fn.CALL, fn.Call(9, b'{"func": "Exec"}')), (fn.REPLY, fn.Reply(9, b"{}", True)),
    (fn.REPLY, fn.Reply(10, b'{"state": false}', False)),
    (fn.CONN, fn.Conn(0x80000007, (1234, "worker pid 5 died"), b"part", b"call")),
    (fn.CONN, fn.Conn(1, None)),
    (fn.CONN, fn.Conn(0, None, rest={"path": "/noop", "args": ["string"], "result": "string"})),
]


def split(frame: bytes):
    ftype, n = frames.HEADER.unpack_from(frame)
    assert len(frame) == frames.HEADER.size + n
    return ftype, frame[frames.HEADER.size:]


@pytest.mark.parametrize("ftype, msg", MESSAGES, ids=[type(m).__name__ for _t, m in MESSAGES])
def test_a_message_decodes_to_what_was_encoded(ftype, msg):
    got_type, payload = split(msg.encode())
    assert got_type == ftype and type(msg).decode(payload) == msg


def test_items_and_a_big_item_in_its_memfd():
    ftype, payload = split(sink.Items(5, [b"a", b"", b"ccc"]).encode())
    assert ftype == sink.ITEMS and list(sink.Items.decode(payload)) == [(5, b"a"), (6, b""), (7, b"ccc")]
    fd = os.memfd_create("test-item")
    os.write(fd, b"big item")
    ftype, payload = split(sink.ItemFd(8, 8).encode())
    assert ftype == sink.ITEM_FD and sink.ItemFd.decode(payload, fd) == [(8, b"big item")]


def test_a_lost_frame_with_an_unknown_reason_is_refused():
    with pytest.raises(ValueError):
        sink.Lost.decode(b"whatever")


@pytest.mark.parametrize("kind", [sink, fn], ids=["sink", "function"])
def test_no_kind_frame_type_is_a_generic_one(kind):
    assert kind.TYPES and not kind.TYPES & frames.TYPES
