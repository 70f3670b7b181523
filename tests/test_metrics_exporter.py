"""``kuiper-pool metrics``: one HTTP endpoint for every plugin of a node, and what each
supervisor says in its log about where its metrics are served.

Real processes: two plugins started through the emulator Host as eKuiper would, one
exporter process (the real command), real HTTP requests.
"""
from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from typing import List

import pytest

from conftest import kuiper_pool_command, wait_until
from kuiper_pool import paths
from metrics_text import Exporter, free_port, scrape, value
from plugins import COUNTING_SOURCE, MODE_FUNCTION, make_plugin

FAST = {"sample_interval": 0.1, "restart_backoff_initial": 0.0, "restart_jitter": 0.0}


def plugin(tmp_path, host_runs, name: str, fn: str, **settings):
    pd = make_plugin(str(tmp_path / name), name, functions={fn: MODE_FUNCTION},
                     sources={f"src{name}": COUNTING_SOURCE}, settings={**FAST, **settings})
    host = host_runs.launch(pd)
    return pd, host, host.start_function(fn)


def test_one_exporter_serves_every_plugin_labelled_by_plugin(tmp_path, unique, host_runs, reaper):
    pa, pb = f"kpa{unique}", f"kpb{unique}"
    pda, host_a, fa = plugin(tmp_path, host_runs, pa, f"fa{unique}")
    _pdb, host_b, fb = plugin(tmp_path, host_runs, pb, f"fb{unique}")
    src = host_a.start_source(f"src{pa}", f"r{unique}", config={"interval": 0.02})
    src.recv()
    assert fa.exec(["echo", 1])["result"] == 1 and fb.exec(["echo", 2])["result"] == 2
    exporter = Exporter(reaper, "--listen", "127.0.0.1:0")
    assert exporter.url.startswith("http://127.0.0.1:") and exporter.url.endswith("/metrics")
    assert exporter.line.startswith(f"kuiper-pool metrics: serving the metrics of every plugin in "
                                    f"{paths.usual_base()} at "), exporter.line
    assert "beyond loopback" not in exporter.line

    samples = wait_until(lambda: (lambda s: s if value(s, "kuiper_pool_items_in_total", plugin=pa,
                                                       symbol=f"src{pa}") > 0 else None)(scrape(exporter.url)),
                         timeout=10, message="the source's items through the exporter")
    for p, fn in ((pa, f"fa{unique}"), (pb, f"fb{unique}")):
        assert value(samples, "kuiper_pool_up", plugin=p) == 1
        assert value(samples, "kuiper_pool_instance_state", plugin=p, symbol=fn, state="running") == 1
        assert value(samples, "kuiper_pool_items_out_total", plugin=p, symbol=fn) == 1
        assert value(samples, "kuiper_pool_restarts_total", plugin=p, symbol=fn, cause="signal") == 0
    assert value(samples, "kuiper_pool_instance_state", plugin=pb, symbol=f"src{pb}") == 0  # no rule

    head = urllib.request.Request(exporter.url, method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as r:  # as GET, without the body
        assert r.status == 200 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(exporter.url.replace("/metrics", "/"), timeout=10)
    assert e.value.code == 404
    e.value.close()

    # a plugin eKuiper stops (SIGKILL of its supervisor) leaves the exporter's answer
    host_b.close()
    wait_until(lambda: value(scrape(exporter.url), "kuiper_pool_up", plugin=pb) == 0
               and value(scrape(exporter.url), "kuiper_pool_up", plugin=pa) == 1,
               timeout=10, message=f"{pb} gone from the metrics, {pa} still there")
    # a supervisor that does not answer (stopped) is up 0, the others are served meanwhile
    os.kill(host_a.process.pid, signal.SIGSTOP)
    try:
        stalled = scrape(exporter.url)
        assert value(stalled, "kuiper_pool_up", plugin=pa) == 0
    finally:
        os.kill(host_a.process.pid, signal.SIGCONT)
    assert exporter.stop() == 0
    log = open(os.path.join(pda, "stdout.log")).read()
    assert (f"plugin {pa}: status and metrics on {paths.status_socket(pa)} (kuiper-pool status {pa}; "
            f"kuiper-pool metrics serves every plugin's over HTTP)") in log


def test_the_exporter_listens_beyond_loopback_only_when_asked_and_says_so(reaper):
    exporter = Exporter(reaper, "--listen", "0.0.0.0:0")
    assert exporter.line.endswith(" (beyond loopback, as --listen asks)"), exporter.line
    assert exporter.stop() == 0


@pytest.mark.parametrize("listen, error", [
    ("9464", "--listen must be host:port (got '9464')"),
    ("nosuchhost.invalid:9464", "cannot listen on nosuchhost.invalid:9464: "),
])
def test_a_bad_listen_address_is_one_line(listen, error):
    proc = subprocess.run(kuiper_pool_command() + ["metrics", "--listen", listen], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    lines: List[str] = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"kuiper-pool metrics: {error}")


def test_a_plugin_with_metrics_address_says_where_it_serves_them(tmp_path, unique, host_runs):
    port = free_port()
    pd, _host, fn = plugin(tmp_path, host_runs, f"kp{unique}", f"fn{unique}",
                           metrics_address=f"127.0.0.1:{port}")
    assert fn.exec(["echo", 1])["result"] == 1
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(samples, "kuiper_pool_up", plugin=f"kp{unique}") == 1
    log = open(os.path.join(pd, "stdout.log")).read()
    assert f"plugin kp{unique}: metrics served at http://127.0.0.1:{port}/metrics" in log
    # the same address for a second plugin (one setting for all): it says what to do instead
    pd2, _host2, fn2 = plugin(tmp_path, host_runs, f"kq{unique}", f"fq{unique}",
                              metrics_address=f"127.0.0.1:{port}")
    assert fn2.exec(["echo", 2])["result"] == 2
    log = open(os.path.join(pd2, "stdout.log")).read()
    assert (f"plugin kq{unique}: metrics_address 127.0.0.1:{port}: Address already in use; serving "
            f"them on the status socket only (each plugin needs a port of its own; kuiper-pool "
            f"metrics serves every plugin's on one)") in log
