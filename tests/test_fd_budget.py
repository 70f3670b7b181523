"""Big sink items under a low descriptor limit (``ulimit -n 256``): every item reaches
``collect``; what the supervisor cannot hold in descriptors it holds in memory or leaves
in eKuiper's socket, and nothing is dropped without a line in the log and a count."""
from __future__ import annotations

import os
import stat
import sys
import threading

from conftest import wait_until
from plugins import make_plugin, read_jsonl

ITEMS, SIZE = 200, 300 << 10   # each a memfd under the native transport (frames.SPILL: 256 KiB)

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
