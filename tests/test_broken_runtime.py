"""A broken installed copy of kuiper_pool says so: a kind whose code cannot be loaded
refuses its own starts at once, in one line naming plugin, symbol, rule and cause, and
the plugin keeps serving every other kind.

The plugin runs through the emulator Host from a copy of the package (as a user's
site-packages would hold it) with one module deleted.
"""
from __future__ import annotations

import os
import shutil

import pytest

from kuiper_pool.tools.emulator import HostError
from plugins import COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, REPO, make_plugin

pytestmark = pytest.mark.usefixtures("transport")


def installed_copy(tmp_path, *missing: str) -> str:
    """A copy of the kuiper_pool package without the modules ``missing`` (paths inside it);
    returns the directory to put on PYTHONPATH."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(REPO, "kuiper_pool"), site / "kuiper_pool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in missing:
        os.unlink(site / "kuiper_pool" / path)
    return str(site)


def test_a_missing_sink_module_refuses_sink_starts_only(tmp_path, unique, host_runs):
    snk, fn, src, rule = f"snk{unique}", f"fn{unique}", f"src{unique}", f"r{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sources={src: COUNTING_SOURCE},
                     sinks={snk: RECORDING_SINK}, functions={fn: MODE_FUNCTION})
    site = installed_copy(tmp_path, os.path.join("runtime", "routes", "sink.py"))
    # a start left unanswered would fail here, long before eKuiper's own 20 s
    host = host_runs.launch(pd, env={"PYTHONPATH": site}, command_timeout=15.0)
    for attempt in range(2):  # every sink start is answered, each time, in one line
        with pytest.raises(HostError) as refused:
            host.start_sink(snk, rule, instance=attempt)
        text = refused.value.answer
        assert "\n" not in text.strip()
        assert text.startswith(f"plugin kp{unique} sink {snk} rule {rule} "), text
        assert ("internal error: ModuleNotFoundError: No module named "
                "'kuiper_pool.runtime.routes.sink'") in text, text
    f = host.start_function(fn)
    assert f.exec(["echo", "still serving"])["result"] == "still serving"
    s = host.start_source(src, f"{rule}s")
    assert "n" in s.recv()["message"]
    assert host.alive()
    with open(os.path.join(pd, "stdout.log"), encoding="utf-8", errors="replace") as log:
        lines = [ln for ln in log if "No module named 'kuiper_pool.runtime.routes.sink'" in ln
                 and "ERROR" in ln]
    assert lines and f"sink {snk} rule {rule}" in lines[0], lines
