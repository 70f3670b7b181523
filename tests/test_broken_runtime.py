"""Starts that cannot succeed are answered at once, in one line naming plugin, symbol, rule
and cause, leave no process behind, and the plugin keeps serving every other instance:

* a broken installed copy of kuiper_pool (the plugin runs through the emulator Host from a
  copy of the package, as a user's site-packages would hold it, with one module deleted):
  a kind whose code cannot be loaded refuses only its own starts;
* a start refused after its worker was forked ends that worker.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from conftest import wait_until
from kuiper_pool.runtime.kinds.sink.page import SIZE
from kuiper_pool.tools.emulator import HostError
from plugins import COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, REPO, descendants, make_plugin

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


@pytest.mark.parametrize("half, module", [
    ("supervisor", "kuiper_pool.runtime.kinds.sink.route"),   # refused before a worker is made
    ("worker", "kuiper_pool.runtime.kinds.sink.serve"),       # refused by the worker, at START
])
def test_a_missing_sink_module_refuses_sink_starts_only(tmp_path, unique, host_runs, half, module):
    """Either half of a kind: the zygote preloads the worker halves it can, and a worker
    whose kind cannot be loaded answers its START with the cause; the zygote lives on."""
    snk, fn, src, rule = f"snk{unique}", f"fn{unique}", f"src{unique}", f"r{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sources={src: COUNTING_SOURCE},
                     sinks={snk: RECORDING_SINK}, functions={fn: MODE_FUNCTION})
    site = installed_copy(tmp_path, os.path.join(*module.split(".")[1:]) + ".py")
    # a start left unanswered would fail here, long before eKuiper's own 20 s
    host = host_runs.launch(pd, env={"PYTHONPATH": site}, command_timeout=15.0)
    for attempt in range(2):  # every sink start is answered, each time, in one line
        with pytest.raises(HostError) as refused:
            host.start_sink(snk, rule, instance=attempt)
        text = refused.value.answer
        assert "\n" not in text.strip()
        assert text.startswith(f"plugin kp{unique} sink {snk} rule {rule} "), text
        assert "internal error: " in text and f"ModuleNotFoundError: No module named '{module}'" in text, text
    f = host.start_function(fn)
    assert f.exec(["echo", "still serving"])["result"] == "still serving"
    s = host.start_source(src, f"{rule}s")
    assert "n" in s.recv()["message"]
    assert host.alive()
    with open(os.path.join(pd, "stdout.log"), encoding="utf-8", errors="replace") as log:
        lines = [ln for ln in log if f"No module named '{module}'" in ln and "ERROR" in ln]
    assert lines and f"sink {snk} rule {rule}" in lines[0], lines


FSIZE_PYTHON = '''#!{python}
"""The interpreter, with files (memfds too) limited to {limit} bytes."""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
'''


def test_a_start_refused_after_its_worker_was_forked_leaves_no_process(tmp_path, unique,
                                                                       host_runs, transport):
    """An acked sink's item page is made after its worker is forked; when it cannot be
    (files limited below its size) the start is refused and that worker must end."""
    if transport != "sp":
        pytest.skip("only a native sink connection is lent, with its item page")
    snk, fn, rule = f"snk{unique}", f"fn{unique}", f"r{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={snk: RECORDING_SINK},
                     functions={fn: MODE_FUNCTION})
    python = tmp_path / "fsize-python"
    python.write_text(FSIZE_PYTHON.format(python=sys.executable, limit=SIZE - 1))
    python.chmod(0o755)
    host = host_runs.launch(pd, python=str(python))
    f = host.start_function(fn)  # its call page is smaller than the limit
    assert f.exec(["echo", 1])["result"] == 1
    serving = descendants(host.process.pid)  # the zygote and the function's worker
    for instance in range(3):
        with pytest.raises(HostError) as refused:
            host.start_sink(snk, rule, instance=instance, require_ack=True)
        text = refused.value.answer
        assert text.startswith(f"plugin kp{unique} sink {snk} rule {rule} ") and "\n" not in text
        assert "cannot start a worker: File too large" in text, text
    wait_until(lambda: descendants(host.process.pid) == serving,
               message="every refused sink's worker gone")
    assert f.exec(["echo", 2])["result"] == 2
