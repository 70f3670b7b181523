"""ML libraries under kuiper_pool, side by side with the official SDK, through real processes.

examples/mlinfer (OpenCV decoding base64 JPEGs, a scikit-learn classifier, ONNX Runtime on
the shipped tiny model, vectorised numpy with its aggregate twin) runs once under the official
SDK and once under kuiper_pool, each from a copy whose main script imports the libraries at
the top (their thread pools are alive when the plugin starts). Under kuiper_pool two symbols
are called in parallel, one worker is SIGKILLed between calls and another is recycled by
``max_calls``; every result must equal the official SDK's. Skipped, with one line naming the
library, where a library has no wheel for this Python.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Dict, List

import pytest

for _lib in ("numpy", "cv2", "sklearn", "onnxruntime", "threadpoolctl"):
    pytest.importorskip(_lib, reason=f"{_lib} is not installed for Python {sys.version.split()[0]} "
                               f"(the ml-test extra; skipped where it has no wheel)")

from conftest import wait_until  # noqa: E402
from kuiper_pool.runtime import status  # noqa: E402
from side_by_side import REPO, RUNTIMES, copy_example  # noqa: E402

EXAMPLE = os.path.join(REPO, "examples", "mlinfer")
FUNCTIONS = ("features", "classify", "infer", "score", "score_batch")

PROBE = '''
class Probe(Function):
    """exec() -> this worker's pid and the thread counts of its loaded OpenBLAS pools."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        from threadpoolctl import threadpool_info
        return {"pid": os.getpid(),
                "blas": sorted({p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openblas"})}

    def is_aggregate(self):
        return False


EXTRA_FUNCTIONS = {"probe": Probe, "probe_env": Probe}
'''
# an exec'd replacement imports scikit-learn and ONNX Runtime afresh (seconds on a busy box):
# a call waiting for it is bounded by call_deadline
SETTINGS = """symbols:
  {p}infer: {env: {OMP_NUM_THREADS: '1'}, call_deadline: 30}
  {p}classify: {max_calls: 4, call_deadline: 30}
  {p}probe_env: {env: {OPENBLAS_NUM_THREADS: '2'}}
"""


def _frames(n: int) -> List[str]:
    sys.path.insert(0, EXAMPLE)
    try:
        import mlinfer
    finally:
        sys.path.remove(EXAMPLE)
    return [mlinfer.encode_jpeg(mlinfer.frame(i)) for i in range(n)]


def _ok(reply: Dict[str, Any]) -> Any:
    assert reply["state"] is True, reply
    return reply["result"]


def _pid(plugin: str, symbol: str) -> int:
    for inst in status.query(plugin)["instances"]:
        if inst["symbol"] == symbol and inst["state"] == "running" and inst["pid"]:
            return inst["pid"]
    return 0


def _run(host, prefix: str, frames: List[str], plugin: str = "") -> Dict[str, Any]:
    """Every function on every frame; classify and infer of one frame run in parallel.
    With ``plugin`` (kuiper_pool), infer's worker is SIGKILLed after the third frame and
    classify's pids are collected (max_calls recycles it)."""
    fn = {s: host.start_function(prefix + s) for s in FUNCTIONS}
    out: Dict[str, Any] = {"features": [], "classify": [], "infer": [], "score": [],
                           "aggregate": _ok(fn["score_batch"].is_aggregate()),
                           "validate": fn["infer"].validate(["a", "b"])}
    classify_pids = set()
    for i, img in enumerate(frames):
        feats = _ok(fn["features"].exec([img], rule="ml"))
        results: Dict[str, Any] = {}

        def call(symbol: str) -> None:
            results[symbol] = _ok(fn[symbol].exec([feats], rule="ml"))
        threads = [threading.Thread(target=call, args=(s,)) for s in ("classify", "infer")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        out["features"].append(feats)
        out["classify"].append(results["classify"])
        out["infer"].append(results["infer"])
        out["score"].append(_ok(fn["score"].exec([feats], rule="ml")))
        if plugin:
            classify_pids.add(wait_until(lambda: _pid(plugin, prefix + "classify"), timeout=60))
            if i == 2:
                victim = wait_until(lambda: _pid(plugin, prefix + "infer"), timeout=60)
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda: _pid(plugin, prefix + "infer") not in (0, victim), timeout=60,
                           message="infer's replacement worker")
    # an aggregate call: each argument is the list of the window's values
    out["batch"] = _ok(fn["score_batch"].exec([out["features"]], rule="ml"))
    out["classify_pids"] = len(classify_pids)
    return out


def test_ml_functions_equal_the_official_sdk_through_parallel_calls_a_crash_and_a_recycle(
        tmp_path, unique, host_runs):
    frames = _frames(10)
    runs = {}
    for runtime in RUNTIMES:
        d, env, prefix = copy_example("mlinfer", str(tmp_path), runtime, unique, extra=PROBE,
                                      extra_functions=("probe", "probe_env"), settings=SETTINGS)
        host = host_runs.launch(d, env=env, recv_timeout=60.0)
        runs[runtime] = _run(host, prefix, frames, env["KP_PLUGIN"] if runtime == "kuiper_pool" else "")
        if runtime == "kuiper_pool":
            probe = {s: _ok(host.start_function(prefix + s).exec([], rule="ml")) for s in ("probe", "probe_env")}
        host.close()
    official, pool = runs["official"], runs["kuiper_pool"]
    for key in ("features", "classify", "infer", "score", "batch", "aggregate", "validate"):
        assert pool[key] == official[key], key
    assert official["aggregate"] is True and len(official["batch"]) == len(frames)
    assert official["batch"] == official["score"]  # one vectorised call = one call per row
    assert pool["classify_pids"] >= 3  # 10 calls, max_calls 4: recycled twice
    # a symbol's env is read by OpenBLAS at import; the others get threads_per_worker (1)
    assert probe["probe"]["blas"] == [1] and probe["probe_env"]["blas"] == [2], probe
