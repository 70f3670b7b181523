"""The shipped alert rules and Grafana dashboard against a real Prometheus (Debian's
``prometheus`` package carries ``prometheus`` and ``promtool``): the rules load and pass
``promtool test rules`` on recorded series; a Prometheus scraping ``kuiper-pool metrics``
in front of a running plugin sees the hang alert once a worker hangs, and every query of
the dashboard runs against it without error. Skipped, in one line naming the binary,
where a binary is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List

import pytest

from conftest import wait_until
from kuiper_pool.runtime import status
from metrics_text import Exporter, free_port
from plugins import COUNTING_SOURCE, MODE_FUNCTION, REPO, make_plugin

RULES = os.path.join(REPO, "docs", "prometheus", "kuiper_pool.rules.yml")
RULE_TESTS = os.path.join(REPO, "tests", "prometheus", "kuiper_pool.rules.test.yml")
DASHBOARD = os.path.join(REPO, "docs", "grafana", "kuiper_pool.json")
# what Grafana puts in for the dashboard's variables
MAY_BE_EMPTY = {"Instances not running"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${datasource}": "", "$plugin": ".+"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found (Debian package prometheus)")
    return path


def test_the_alert_rules_load():
    proc = subprocess.run([binary("promtool"), "check", "rules", RULES], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS: 5 rules found" in proc.stdout, proc.stdout


def test_the_alert_rules_pass_their_tests_on_recorded_series():
    proc = subprocess.run([binary("promtool"), "test", "rules", RULE_TESTS], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout


def test_every_alert_the_docs_show_is_a_tested_rule():
    import yaml

    with open(RULES) as f:
        rules = {r["alert"]: r["expr"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]}
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    shown = re.findall(r"- alert: (\w+).*\n  expr: (.+)", readme)
    assert shown, "no alert in README.md"
    for name, expr in shown:
        assert rules.get(name) == expr.strip(), f"README.md's {name} is not the rule in {RULES}"
    with open(os.path.join(REPO, "docs", "operating.md")) as f:
        named = set(re.findall(r"`(KuiperPool\w+)`", f.read()))
    assert named == set(rules)


def dashboard() -> Dict[str, Any]:
    with open(DASHBOARD) as f:
        return json.load(f)


class Prometheus:
    """A real Prometheus on a free loopback port with its own storage, evaluating the
    shipped rules every second."""

    def __init__(self, tmp_path, target: str, reaper) -> None:
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [RULES],
            "scrape_configs": [{"job_name": "kuiper_pool", "static_configs": [{"targets": [target]}]}]}))
        self.log = open(tmp_path / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        reaper(self.proc.pid)
        wait_until(self.ready, timeout=60, interval=0.2, message="Prometheus ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert self.proc.poll() is None, "Prometheus exited; see prometheus.log"
            return False

    def api(self, path: str, **params: Any) -> Dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # a bad query: 400 with the error in the body
            with e:
                return json.load(e)

    def query(self, expr: str) -> List[Dict[str, Any]]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def stop_worker(plugin: str, symbol: str) -> None:
    """SIGSTOP the function's current worker (a busy machine may have replaced the one seen
    before: then the next one)."""
    def stopped() -> bool:
        (pid,) = [i["pid"] for i in status.query(plugin)["instances"] if i["symbol"] == symbol]
        try:
            if pid:
                os.kill(pid, signal.SIGSTOP)
                return True
        except ProcessLookupError:
            pass
        return False
    wait_until(stopped, timeout=30, message="a function worker to stop")


@pytest.fixture
def prometheus_binaries():
    binary("prometheus")
    binary("promtool")


def test_prometheus_sees_a_hang_alert_and_runs_every_dashboard_query(
        prometheus_binaries, tmp_path, unique, host_runs, reaper):
    name, fn, src = f"kp{unique}", f"fn{unique}", f"src{unique}"
    pd = make_plugin(str(tmp_path), name, functions={fn: MODE_FUNCTION}, sources={src: COUNTING_SOURCE},
                     settings={"heartbeat_interval": 0.2, "sample_interval": 0.1,
                               "restart_backoff_initial": 0.0, "restart_jitter": 0.0})
    host = host_runs.launch(pd)
    function = host.start_function(fn)
    assert function.exec(["echo", 1])["result"] == 1
    host.start_source(src, f"r{unique}", config={"interval": 0.05}).recv()
    exporter = Exporter(reaper, "--listen", "127.0.0.1:0")
    with urllib.request.urlopen(exporter.url, timeout=10) as r:  # Prometheus' own linter
        lint = subprocess.run([binary("promtool"), "check", "metrics"], input=r.read(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert lint.returncode == 0 and lint.stdout == b"", lint.stdout
    prom = Prometheus(tmp_path, exporter.url.split("/")[2], reaper)
    try:
        wait_until(lambda: prom.query(f'kuiper_pool_restarts_total{{plugin="{name}",cause="hang"}} == 0'),
                   timeout=60, interval=0.2, message="the hang counter scraped at 0 before any hang")
        assert prom.query(f'kuiper_pool_instance_state{{plugin="{name}",symbol="{fn}",state="running"}} == 1')
        stop_worker(name, fn)  # a worker that hangs: no heartbeat, no CPU
        alert = wait_until(lambda: [a for a in prom.api("alerts")["data"]["alerts"]
                                    if a["labels"]["alertname"] == "KuiperPoolHangs"
                                    and a["labels"].get("plugin") == name
                                    and a["labels"].get("symbol") == fn], timeout=60, interval=0.2,
                           message="the KuiperPoolHangs alert in Prometheus")
        (hang,) = alert
        assert hang["state"] in ("pending", "firing") and hang["labels"]["symbol"] == fn
        assert hang["labels"]["cause"] == "hang" and hang["labels"]["type"] == "func"
        assert hang["annotations"]["summary"] == f"kuiper_pool {name}/{fn}: worker killed (hang)"
        assert function.exec(["echo", 3])["result"] == 3  # a new worker serves meanwhile
        dash = dashboard()
        for variable in dash["templating"]["list"]:  # Grafana's label_values(metric, label)
            if variable["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)",
                                             variable["query"]["query"]).groups()
                found = prom.api(f"label/{label}/values", **{"match[]": metric})
                assert found["status"] == "success" and name in found["data"], found
        for panel in dash["panels"]:
            for expr in [t["expr"] for t in panel["targets"]]:
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                # every metric name is right: data, except where none is the healthy answer
                assert prom.query(expr) or panel["title"] in MAY_BE_EMPTY, (panel["title"], expr)
                now = time.time()
                ranged = prom.api("query_range", query=expr, start=now - 60, end=now, step=1)
                assert ranged["status"] == "success", (expr, ranged)
        restarts = prom.query(f'sum by (cause) (increase(kuiper_pool_restarts_total{{plugin="{name}"}}[5m]))')
        assert "hang" in {r["metric"]["cause"] for r in restarts if float(r["value"][1]) > 0}
    finally:
        prom.stop()
        exporter.stop()
