"""The Prometheus text of snapshots (``runtime/metrics.py``), without processes: what every
instance has from its start, and a snapshot that cannot be read (another kuiper_pool
version's, or a bug) costing only its own plugin's series."""
from __future__ import annotations

from kuiper_pool.runtime.metrics import render
from metrics_text import parse, value

FRESH = {"symbol": "f", "type": "func", "rule": "", "op": "", "instance": 0, "state": "starting",
         "restart_causes": {}, "items_in": 0, "items_out": 0, "errors": 0, "rss": 0, "cpu_seconds": 0.0}


def snap(plugin: str, *instances: dict) -> dict:
    return {"plugin": plugin, "version": "1.2.3", "python": "3.11.7", "started": 1700000000.5,
            "instances": list(instances)}


def test_a_fresh_instance_has_every_series_at_zero_and_one_state():
    samples = parse(render([snap("p", FRESH)]))
    assert value(samples, "kuiper_pool_build_info", plugin="p", version="1.2.3", python="3.11.7") == 1
    assert value(samples, "kuiper_pool_start_time_seconds", plugin="p") == 1700000000.5
    states = {dict(ls)["state"]: v for (n, ls), v in samples.items() if n == "kuiper_pool_instance_state"}
    assert states == {"starting": 1, "running": 0, "killing": 0, "backoff": 0, "recycling": 0,
                      "stopping": 0, "failed": 0, "ended": 0}
    causes = {dict(ls)["cause"]: v for (n, ls), v in samples.items() if n == "kuiper_pool_restarts_total"}
    assert causes == {"exit": 0, "signal": 0, "hang": 0, "deadline": 0}
    for name in ("items_in_total", "items_out_total", "errors_total", "resident_memory_bytes",
                 "cpu_seconds_total"):
        assert (f"kuiper_pool_{name}", frozenset({("plugin", "p"), ("symbol", "f"), ("type", "func"),
                                                  ("rule", ""), ("op", ""), ("instance", "0")})) in samples


def test_a_snapshot_that_cannot_be_read_is_up_0_and_the_others_are_served():
    bad = snap("b", dict(FRESH, items_in="many"))
    older = {"plugin": "o", "instances": [{k: v for k, v in FRESH.items() if k != "cpu_seconds"}]}
    samples = parse(render([snap("p", FRESH), bad, older, snap("q", dict(FRESH, symbol="g"))], down=["d"]))
    ups = {dict(ls)["plugin"]: v for (n, ls), v in samples.items() if n == "kuiper_pool_up"}
    assert ups == {"p": 1, "b": 0, "o": 1, "q": 1, "d": 0}
    assert value(samples, "kuiper_pool_items_in_total", plugin="q") == 0
    assert not [k for k in samples if ("plugin", "b") in k[1] and k[0] != "kuiper_pool_up"]
    # an older supervisor's snapshot: what it has is served, what it lacks is left out
    assert value(samples, "kuiper_pool_instance_state", plugin="o", state="starting") == 1
    assert not [k for k in samples if ("plugin", "o") in k[1] and k[0] in (
        "kuiper_pool_cpu_seconds_total", "kuiper_pool_build_info")]


def test_a_shared_worker_is_counted_once_and_an_older_snapshot_as_it_said():
    shared = [dict(FRESH, symbol="s", type="source", rule=f"r{i}", shared=True, rss=300, cpu_seconds=2.0)
              for i in range(3)]
    own = dict(FRESH, symbol="s", type="source", rule="o", rss=100, cpu_seconds=1.0)
    proc = {"symbol": "s", "type": "source", "pid": 42, "rss": 300, "cpu_percent": 1.0, "cpu_seconds": 2.0,
            "instances": [{"rule": f"r{i}", "op": "", "instance": 0} for i in range(3)]}
    samples = parse(render([dict(snap("p", own, *shared), shared_workers=[proc])]))
    assert total(samples, "resident_memory_bytes") == 400 and total(samples, "cpu_seconds_total") == 3.0
    assert value(samples, "kuiper_pool_resident_memory_bytes", worker="shared", pid="42", symbol="s") == 300
    assert value(samples, "kuiper_pool_shared_worker_instances", pid="42") == 3
    assert ("kuiper_pool_items_in_total", frozenset({("plugin", "p"), ("symbol", "s"), ("type", "source"),
            ("rule", "r1"), ("op", ""), ("instance", "0")})) in samples  # its other series stay
    older = parse(render([snap("p", own, *shared)]))  # no shared_workers: each instance as it said
    assert total(older, "resident_memory_bytes") == 1000


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == f"kuiper_pool_{name}")
