"""Generic fixtures and helpers: unique names, process-tree cleanup, ipc leak checks, polling."""
from __future__ import annotations

import glob
import os
import time
import uuid
from typing import Callable, List, Optional, TypeVar

import psutil
import pytest

T = TypeVar("T")


@pytest.fixture
def unique() -> str:
    """A short name fragment unique to this test, for plugin, rule and symbol names
    (ipc paths in /tmp are global, so parallel test runs must not share them)."""
    return "u" + uuid.uuid4().hex[:10]


def kill_tree(pid: int, timeout: float = 5.0) -> List[int]:
    """SIGKILL a process and all its descendants; return the pids that were still alive."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    try:
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        procs = [root]
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.fixture(params=["sp", "nng"])
def transport(request, monkeypatch) -> str:
    """Run the test under both transports (``transport: sp``, the native default, and the
    pynng fallback): plugins started by the test read KUIPER_POOL_TRANSPORT."""
    monkeypatch.setenv("KUIPER_POOL_TRANSPORT", request.param)
    return request.param


@pytest.fixture
def reaper():
    """Register pids with ``reaper(pid)``; their whole trees are killed at teardown."""
    pids: List[int] = []
    yield pids.append
    for pid in pids:
        kill_tree(pid)


def ipc_files(fragment: str) -> List[str]:
    """The /tmp/*.ipc files whose name contains ``fragment``."""
    return sorted(glob.glob(f"/tmp/*{fragment}*.ipc"))


@pytest.fixture
def ipc_leak_check(unique):
    """Fails the test at teardown if an ipc file named with ``unique`` is left in /tmp.
    Request it before fixtures that create sockets, so it is torn down after them."""
    yield unique
    leaked = ipc_files(unique)
    for path in leaked:  # clean up anyway, then fail
        try:
            os.unlink(path)
        except OSError:
            pass
    assert not leaked, f"ipc files left behind: {leaked}"


def wait_until(condition: Callable[[], Optional[T]], timeout: float = 10.0, interval: float = 0.01,
               message: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def host_runs(ipc_leak_check, unique):
    """``plugins.HostRuns`` for this test: ``host_runs.launch(plugin_dir, **Host kwargs)`` returns
    a started emulator Host. At teardown every Host is closed (as eKuiper: stop, SIGKILL) and
    the test fails if any process of a plugin tree, a /tmp/kuiper_pool-<uid>/ entry or a
    /tmp/*.ipc file naming ``unique`` is left."""
    from plugins import HostRuns

    runs = HostRuns(unique)
    yield runs
    problems = runs.close()
    assert not problems, "; ".join(problems)


def kuiper_pool_command() -> List[str]:
    """How to run the ``kuiper-pool`` command: the installed script, else ``python -m``."""
    import shutil
    import sys

    exe = shutil.which("kuiper-pool")
    return [exe] if exe else [sys.executable, "-m", "kuiper_pool.tools.cli"]


def kuiper_pool_cli(*args, cwd=None, timeout: float = 120, env=None):
    """Run ``kuiper-pool <args>``; a CompletedProcess with text stdout and stderr (separate)."""
    import subprocess

    return subprocess.run(kuiper_pool_command() + [str(a) for a in args], cwd=cwd, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=None if env is None else {**os.environ, **env})
