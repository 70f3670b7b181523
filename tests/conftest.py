"""Generic fixtures and helpers: unique names, process-tree cleanup, ipc leak checks, polling,
and the backstop that bounds a test blocked where pytest-timeout cannot reach."""
from __future__ import annotations

import faulthandler
import glob
import os
import time
import uuid
from typing import Callable, Dict, List, Optional, TypeVar

import psutil
import pytest

T = TypeVar("T")
_BACKSTOP_FD = pytest.StashKey[int]()


# --- the timeout backstop ----------------------------------------------------------------------
# pytest-timeout's signal method fails a test that overruns its timeout and the run goes on, but
# its handler is Python code: a test blocked inside a C call (pynng's nng_close waiting for good)
# never sees it. Its thread method reaches such a test but ends the whole run at the first
# timeout. So: signal method, and this backstop, which ``timeout_backstop`` seconds after a
# test's timeout (still blocked, then) writes every thread's traceback and ends the run
# (faulthandler's watchdog is a C thread: it needs neither the main thread nor the GIL).

def pytest_addoption(parser) -> None:
    parser.addini("timeout_backstop", "seconds after a test's timeout at which a test still "
                  "blocked (e.g. in a C call) ends the run with every thread's traceback",
                  default="30")


def pytest_configure(config) -> None:
    config.stash[_BACKSTOP_FD] = os.dup(2)  # stderr itself, before a test's capture replaces fd 2


def pytest_unconfigure(config) -> None:
    os.close(config.stash[_BACKSTOP_FD])


def _timeout_of(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    else:
        value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _timeout_of(item)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + float(item.config.getini("timeout_backstop")),
                                          exit=True, file=item.config.stash[_BACKSTOP_FD])
    try:
        yield
    finally:
        if limit > 0:
            faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def unique() -> str:
    """A short name fragment unique to this test, for plugin, rule and symbol names
    (ipc paths in /tmp are global, so parallel test runs must not share them)."""
    return "u" + uuid.uuid4().hex[:10]


_FUNCTION_SYMBOLS: Dict[str, str] = {}  # function symbol -> the test that started it first


@pytest.fixture(autouse=True)
def function_symbols_cannot_collide(request, monkeypatch) -> None:
    """Every function the emulator starts in this process must carry this test's ``unique``
    token and no other test's symbol: eKuiper names a function's socket after its symbol alone
    (``/tmp/func_<symbol>.ipc``), so a unique plugin name does not keep two tests or two jobs
    apart. (``kuiper-pool try`` runs in a subprocess: its plugins are named by the same rule,
    ``plugins.unique_pysam``.)"""
    from kuiper_pool.tools.emulator import Host
    from plugins import function_symbol_problem

    start = Host.start_function

    def checked(self, symbol: str):
        problem = function_symbol_problem(symbol, request.node.nodeid, _FUNCTION_SYMBOLS)
        if problem:
            pytest.fail(problem, pytrace=False)
        return start(self, symbol)

    monkeypatch.setattr(Host, "start_function", checked)


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


@pytest.fixture(scope="session")
def kuiper_pool_wheel(tmp_path_factory) -> str:
    """The kuiper-pool wheel as the build backend makes it: ``$TEST_KUIPER_POOL_WHEEL`` (the one
    ``.ci/test-installed`` built and installed), else one built now from this source tree."""
    import subprocess
    import sys

    given = os.environ.get("TEST_KUIPER_POOL_WHEEL")
    if given:
        assert os.path.isfile(given), f"TEST_KUIPER_POOL_WHEEL={given} is not a file"
        return given
    out = str(tmp_path_factory.mktemp("kuiper_pool_wheel"))
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, source],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    (wheel,) = glob.glob(os.path.join(out, "kuiper_pool-*.whl"))
    return wheel
