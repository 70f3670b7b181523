"""Big sink items under a low descriptor limit (``ulimit -n 256``): every item reaches
``collect``; what the supervisor cannot hold in descriptors it holds in memory or leaves
in eKuiper's socket, and nothing is dropped without a line in the log and a count."""
from __future__ import annotations

import os
import stat
import sys
import threading
import time

from conftest import wait_until
from plugins import make_plugin, read_jsonl

ITEMS, SIZE = 200, 300 << 10   # each a memfd under the native transport (sink frames.SPILL: 256 KiB)

SLOW_SINK = '''
class SlowSink(Sink):
    """Records {"n"} of each item (its first bytes) after conf["delay"] seconds."""

    def configure(self, conf):
        self.conf = dict(conf)

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        time.sleep(float(self.conf["delay"]))
        record("item", self.conf["file"], n=json.loads(data)["n"], size=len(data))

    def close(self, ctx):
        pass
'''


def _limited_python(tmp_path, nofile: int) -> str:
    """The interpreter as eKuiper would run it from a shell with ``ulimit -n <nofile>``."""
    path = str(tmp_path / "python-ulimit")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nulimit -n {nofile} || exit 1\nexec {sys.executable} \"$@\"\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def test_200_big_items_to_a_slow_sink_under_ulimit_256_all_reach_collect(tmp_path, unique, host_runs):
    name = f"kp{unique}"
    plugin_dir = make_plugin(str(tmp_path), name, sinks={f"snk{unique}": SLOW_SINK},
                             settings={"heartbeat_interval": 0.1})
    host = host_runs.launch(plugin_dir, python=_limited_python(tmp_path, 256))
    items = str(tmp_path / "items.jsonl")
    sink = host.start_sink(f"snk{unique}", f"r{unique}", op="out", config={"file": items, "delay": 0.02})
    pad = b"x" * SIZE
    errors = []

    def feed() -> None:
        for n in range(ITEMS):
            try:
                sink.send(b'{"n":%d,"pad":"%s"}' % (n, pad))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"item {n}: {e}")

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    feeder.join(120)
    assert not errors, errors[:3]
    wait_until(lambda: len(read_jsonl(items, "item")) >= ITEMS, timeout=60,
               message=f"{ITEMS} items collected")
    got = [r["n"] for r in read_jsonl(items, "item")]
    assert got == list(range(ITEMS))
    with open(os.path.join(plugin_dir, "stdout.log"), errors="replace") as f:
        log = f.read()
    assert "Too many open files" not in log and "dropped" not in log, log[-2000:]
    assert "big items are held in memory and relayed by copy" in log   # the budget said so


def test_item_frames_queued_for_a_slow_worker_cost_no_descriptor_each():
    """Over a real socketpair that takes nothing more: every queued big item keeps its own
    memfd and no duplicate, so a low RLIMIT_NOFILE does not make a frame disappear."""
    import resource
    import socket

    from kuiper_pool.runtime import frames
    from kuiper_pool.runtime.kinds.sink import frames as sinkframes
    from kuiper_pool.transport.sp import MemfdPool

    pool, n = MemfdPool(), 40
    items = []
    for i in range(n):
        spilled = pool.spill(300 << 10)
        spilled.take(memoryview(bytes([i]) * (300 << 10)))
        items.append((i + 1, spilled.seal()))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link = frames.Link(ours)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 4, hard))   # no room for 40 duplicates
    try:
        for frame, fds in sinkframes.item_frames(items):
            link.send(frame, fds)
        assert len(link.outbox.queue) > 1   # they wait: the worker reads nothing yet
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got = []
    theirs.setblocking(False)
    reader = frames.FrameBuffer()
    received: list = []
    deadline = time.monotonic() + 10
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} items arrived"
        link.flush()
        try:
            data, fds, _flags, _addr = socket.recv_fds(theirs, 1 << 16, 4)
        except BlockingIOError:
            continue
        received.extend(fds)
        for ftype, payload in reader.feed(data):
            assert ftype == sinkframes.ITEM_FD
            got.extend(sinkframes.ItemFd.decode(payload, received.pop(0)))
    assert [(seq, data[:1]) for seq, data in got] == [(i + 1, bytes([i])) for i in range(n)]
    link.close()
    theirs.close()
    del items
    pool.close()


def test_an_item_lost_on_ekuipers_data_channel_is_logged_and_counted(tmp_path, unique, host_runs):
    """A connection to the sink path that breaks the protocol mid-item is dropped with what
    it had sent: one ERROR line naming the sink and the cause, one error in its status row;
    eKuiper's own connection goes on."""
    import socket

    from kuiper_pool import wire
    from kuiper_pool.runtime import status
    from kuiper_pool.transport import sp

    name, rule = f"kp{unique}", f"r{unique}"
    plugin_dir = make_plugin(str(tmp_path), name, sinks={f"snk{unique}": SLOW_SINK})
    host = host_runs.launch(plugin_dir)
    items = str(tmp_path / "items.jsonl")
    sink = host.start_sink(f"snk{unique}", rule, op="out", config={"file": items, "delay": 0})
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with rogue:
        rogue.connect(wire.ipc_path(wire.data_url(rule, "out", 0)))
        rogue.sendall(sp.header(sp.PUSH) + b"\x07" + b"\x00" * 8)   # message type 7: not SP
        rogue.settimeout(10)
        assert len(rogue.recv(8)) == 8 and rogue.recv(1) == b""   # our SP header, then dropped
    sink.send(b'{"n":1,"pad":""}')
    wait_until(lambda: read_jsonl(items, "item"), message="eKuiper's item collected")

    def row():
        return next(r for r in status.query(name)["instances"] if r["rule"] == rule)
    wait_until(lambda: row()["errors"] == 1, message="the loss counted")
    with open(os.path.join(plugin_dir, "stdout.log"), errors="replace") as f:
        lines = [line for line in f if "dropped eKuiper's connection" in line]
    assert len(lines) == 1 and " ERROR " in lines[0] and f"rule {rule}" in lines[0], lines
    assert "bad SP message type 7" in lines[0]
