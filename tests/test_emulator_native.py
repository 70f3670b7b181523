"""The emulator's native data side (``Host(data_transport="sp")``, mangos-like framing on
plain Unix sockets) speaks correctly to every plugin side the benchmark drives: kuiper_pool
with its native transport, kuiper_pool with ``transport: nng`` (pynng) and the official SDK
(pynng 0.8.1). Library source and sink of tests/plugins.py, real processes throughout."""
from __future__ import annotations

import json
import os
import time

import pytest

from conftest import wait_until
from kuiper_pool.tools.emulator import Host, HostError
from kuiper_pool.transport import sp
from plugins import COUNTING_SOURCE, RECORDING_SINK, make_plugin, read_jsonl

VARIANTS = {
    "kuiper_pool-sp": dict(settings={"transport": "sp"}),
    "kuiper_pool-nng": dict(settings={"transport": "nng"}),
    "official": dict(base="ekuiper", config_class="ekuiper", runner="ekuiper"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_host_drives_source_and_acked_sink(tmp_path, unique, host_runs, variant):
    src, snk, rule = f"src{unique}", f"snk{unique}", f"r{unique}"
    items = str(tmp_path / "items.jsonl")
    pd = make_plugin(str(tmp_path), f"nat{unique}", sources={src: COUNTING_SOURCE},
                     sinks={snk: RECORDING_SINK}, **VARIANTS[variant])
    host = host_runs.launch(pd, data_transport="sp")
    assert host.handshake_seconds is not None and host.handshake_seconds > 0

    source = host.start_source(src, rule, config={"interval": 0, "count": 500})
    got = [source.recv(timeout=10.0) for _ in range(500)]
    assert [m["message"]["n"] for m in got] == list(range(1, 501))  # in order, none lost
    assert {m["message"]["rule"] for m in got} == {rule}
    with pytest.raises(HostError, match="no message"):
        source.recv(timeout=0.3)  # count reached: the source waits, nothing more arrives
    source.stop()

    sink = host.start_sink(snk, rule + "s", config={"file": items, "reject": "bad"}, require_ack=True)
    acks = [sink.collect(json.dumps({"k": i}).encode(), timeout=10.0) for i in range(200)]
    assert acks == [{}] * 200
    assert "rejected" in sink.collect(b'{"k":"bad"}', timeout=10.0)["error"]
    recorded = [json.loads(r["data"]) for r in read_jsonl(items, "item")]
    assert recorded == [{"k": i} for i in range(200)] + [{"k": "bad"}]
    sink.stop()


@pytest.mark.parametrize("variant", ["kuiper_pool-sp", "official"])
def test_native_host_floods_a_sink_without_ack_and_loses_nothing(tmp_path, unique, host_runs, variant):
    """The host writes as fast as its socket takes frames (one frame per write, waiting while
    the socket is full); every item arrives once, in order."""
    snk, n = f"snk{unique}", 5000
    items = str(tmp_path / "items.jsonl")
    pd = make_plugin(str(tmp_path), f"flo{unique}", sinks={snk: RECORDING_SINK}, **VARIANTS[variant])
    host = host_runs.launch(pd, data_transport="sp")
    sink = host.start_sink(snk, f"r{unique}", config={"file": items, "ack": False})
    for i in range(n):
        sink.send(b'{"i":%d}' % i)
    wait_until(lambda: len(read_jsonl(items, "item")) >= n, timeout=60.0)
    assert [json.loads(r["data"])["i"] for r in read_jsonl(items, "item")] == list(range(n))
    sink.stop()


def test_native_host_closes_its_sockets_and_rejects_unknown_transports(tmp_path, unique, host_runs):
    src = f"src{unique}"
    pd = make_plugin(str(tmp_path), f"cls{unique}", sources={src: COUNTING_SOURCE})
    with pytest.raises(HostError, match="data_transport"):
        Host(pd, data_transport="zmq")
    host = host_runs.launch(pd, data_transport="sp")
    source = host.start_source(src, f"r{unique}")
    assert source.recv(timeout=10.0)["message"]["n"] == 1
    path = source.url[len("ipc://"):]
    assert os.path.exists(path)
    host.close()
    assert not os.path.exists(path)


def test_an_acked_sink_takes_an_item_whose_frame_its_peer_wrote_in_pieces(tmp_path, unique, host_runs):
    """eKuiper's PUSH may write a frame in more than one write (header and body apart, or a
    body in parts). Under the native transport an acked sink's worker reads eKuiper's data
    connection itself once it is lent (after the first acks): it must wait for the whole
    frame, take that item once, whole, and ack it; then go on with the next."""
    snk, rule = f"snk{unique}", f"r{unique}"
    items = str(tmp_path / "items.jsonl")
    pd = make_plugin(str(tmp_path), f"pcs{unique}", sinks={snk: RECORDING_SINK}, settings={"transport": "sp"})
    host = host_runs.launch(pd, data_transport="sp")
    sink = host.start_sink(snk, rule, config={"file": items}, require_ack=True)
    sent = [b'{"k":%d}' % i for i in range(5)]
    assert [sink.collect(item, timeout=10.0) for item in sent] == [{}] * 5
    data = sink._data.sock  # noqa: SLF001 - eKuiper's side of the connection, written by hand
    for i, cut in enumerate((1, 4, 9, 12, 20)):
        item = b'{"piece":%d,"pad":"%s"}' % (i, b"x" * 40)
        frame = sp.frame(item)
        data.sendall(frame[:cut])
        time.sleep(0.02)  # the peer stalls mid-frame (part of the scenario, not a wait for anything)
        data.sendall(frame[cut:])
        assert sink.recv_ack(timeout=10.0) == {}, f"cut after {cut} bytes"
        sent.append(item)
    assert sink.collect(b'{"k":"after"}', timeout=10.0) == {}
    sent.append(b'{"k":"after"}')
    assert [r["data"].encode() for r in read_jsonl(items, "item")] == sent  # each once, whole, in order
    sink.stop()
