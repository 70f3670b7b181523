"""Forking with threads alive, per-symbol environment and threads_per_worker, through real
processes: a plugin whose main module starts a thread at import (as numpy's OpenBLAS, OpenCV
and ONNX Runtime do) gets its workers exec'd and one WARNING naming the threads;
``start_method`` still forces either way; a symbol's ``env`` reaches its worker before any
import."""
from __future__ import annotations

import os
from typing import Dict, List

import psutil

from conftest import wait_until
from plugins import make_plugin

ENV_FUNCTION = '''
class EnvFunction(Function):
    """exec(names) -> {"pid", "env": the values of those variables in this worker}."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return {"pid": os.getpid(), "env": {k: os.environ.get(k) for k in args}}

    def is_aggregate(self):
        return False
'''

THREAD_AT_IMPORT = '''
import threading
_poller_stop = threading.Event()
threading.Thread(target=_poller_stop.wait, name="kp-poller", daemon=True).start()
'''

WARNING = "thread(s) alive besides the main one before forking"


def _call(host, symbol: str, names: List[str]) -> Dict:
    fn = host.start_function(symbol)
    reply = fn.exec(names)
    assert reply["state"] is True, reply
    return reply["result"]


def _exec_d(pid: int) -> bool:
    """Whether the worker was exec'd (a fresh interpreter) rather than forked."""
    return psutil.Process(pid).cmdline()[0].startswith("kuiper-pool (exec) ")  # its process title


def _warnings(plugin_dir: str) -> List[str]:
    with open(os.path.join(plugin_dir, "stdout.log"), errors="replace") as f:
        return [line for line in f if WARNING in line]


def test_threads_alive_at_start_make_workers_exec_and_are_named_once(tmp_path, unique, host_runs):
    fn = f"env_{unique}"
    d = make_plugin(str(tmp_path), f"thr{unique}", functions={fn: ENV_FUNCTION}, main_code=THREAD_AT_IMPORT)
    host = host_runs.launch(d)
    got = _call(host, fn, ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"])
    assert _exec_d(got["pid"])
    # threads_per_worker (default 1) keeps each worker's math libraries to one thread
    assert got["env"] == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    [line] = wait_until(lambda: _warnings(d), message="the threads warning")
    assert " WARNING " in line and "'kp-poller' (Python)" in line and "started with exec" in line


def test_start_method_fork_forks_anyway_and_says_so(tmp_path, unique, host_runs):
    fn = f"env_{unique}"
    d = make_plugin(str(tmp_path), f"thf{unique}", functions={fn: ENV_FUNCTION}, main_code=THREAD_AT_IMPORT,
                    settings={"start_method": "fork", "threads_per_worker": 0})
    host = host_runs.launch(d)
    got = _call(host, fn, ["OPENBLAS_NUM_THREADS"])
    assert not _exec_d(got["pid"])
    assert got["env"] == {"OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
    [line] = wait_until(lambda: _warnings(d), message="the threads warning")
    assert "forked anyway (start_method: fork)" in line


def test_a_symbol_env_reaches_only_its_workers_which_exec(tmp_path, unique, host_runs):
    with_env, plain = f"enva_{unique}", f"envb_{unique}"
    d = make_plugin(str(tmp_path), f"the{unique}", functions={with_env: ENV_FUNCTION, plain: "EnvFunction"},
                    yaml_settings={"symbols": {with_env: {"env": {"KP_MARK": "a", "OMP_NUM_THREADS": "3"}}}})
    host = host_runs.launch(d)
    a = _call(host, with_env, ["KP_MARK", "OMP_NUM_THREADS"])
    b = _call(host, plain, ["KP_MARK", "OMP_NUM_THREADS"])
    assert a["env"] == {"KP_MARK": "a", "OMP_NUM_THREADS": "3"} and _exec_d(a["pid"])
    # in the process environment from the first instruction, so libraries see it at import
    with open(f"/proc/{a['pid']}/environ", "rb") as f:
        assert b"KP_MARK=a" in f.read().split(b"\0")
    assert b["env"] == {"KP_MARK": None, "OMP_NUM_THREADS": "1"} and not _exec_d(b["pid"])
    assert _warnings(d) == []  # nothing but the main thread was alive


def test_factories_that_cannot_be_shipped_make_auto_fork_and_say_why(tmp_path, unique, host_runs):
    fn = f"env_{unique}"
    d = make_plugin(str(tmp_path), f"thp{unique}", functions={fn: ENV_FUNCTION},
                    main_code=THREAD_AT_IMPORT + "_LOCK = threading.Lock()\n",
                    factories={fn: "lambda lock=_LOCK: EnvFunction()"})  # a lock does not pickle
    host = host_runs.launch(d)
    got = _call(host, fn, ["OPENBLAS_NUM_THREADS"])
    assert not _exec_d(got["pid"])
    with open(os.path.join(d, "stdout.log"), errors="replace") as f:
        text = f.read()
    assert "cannot ship the factories to exec'd workers: TypeError" in text and "workers are forked" in text
