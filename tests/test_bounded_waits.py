"""No test blocks without bound: a pynng close that is stuck inside nng_close is left behind
by the emulator, and a test blocked in a C call ends the run (with every thread's traceback)
instead of hanging it. The stuck close is real: nng_close waits for a pipe callback that
waits on an event."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from typing import Iterator, Tuple

import pynng
import pytest

from conftest import ipc_files, wait_until
from kuiper_pool.tools.emulator import _close

TESTS = os.path.dirname(os.path.abspath(__file__))

STUCK = '''\
import threading
import pynng


def stuck_pull(url):
    """A PULL socket whose close blocks until ``gate`` is set: its pipe callback waits."""
    gate, entered = threading.Event(), threading.Event()

    def hold(pipe):
        entered.set()
        gate.wait()

    pull = pynng.Pull0()
    pull.add_pre_pipe_connect_cb(hold)
    pull.listen(url)
    push = pynng.Push0()
    push.dial(url, block=False)
    assert entered.wait(10), "the pipe never connected"
    return pull, push, gate
'''


@pytest.fixture
def stuck(unique) -> Iterator[Tuple[pynng.Socket, threading.Event]]:
    namespace: dict = {}
    exec(STUCK, namespace)
    pull, push, gate = namespace["stuck_pull"](f"ipc:///tmp/stuck_{unique}.ipc")
    yield pull, gate
    gate.set()
    push.close()


def test_the_emulator_leaves_a_stuck_pynng_close_behind_and_says_so(stuck, unique, caplog):
    pull, gate = stuck
    with caplog.at_level(logging.WARNING, logger="kuiper_pool.tools.emulator"):
        assert _close(pull, f"the source {unique}", timeout=0.2) is False
    assert f"closing the pynng socket of the source {unique} did not finish" in caplog.text
    closer = [t for t in threading.enumerate() if t.name == f"close the source {unique}"]
    assert len(closer) == 1 and closer[0].daemon
    gate.set()  # the close completes once nng_close is no longer held
    wait_until(lambda: not closer[0].is_alive(), message="the background close to finish")
    wait_until(lambda: not ipc_files(f"stuck_{unique}"), message="the listener's ipc file to go")


def test_a_test_blocked_in_a_c_call_ends_the_run_with_tracebacks(tmp_path, unique):
    """pytest-timeout's signal (timeout 1 s) cannot interrupt nng_close; the backstop ends the
    run timeout_backstop (1 s) later, naming the blocked test in the tracebacks."""
    url = f"ipc:///tmp/stuck_{unique}.ipc"
    (tmp_path / "test_blocked.py").write_text(STUCK + textwrap.dedent(f"""

        def test_blocked_in_nng_close():
            pull, push, gate = stuck_pull({url!r})
            pull.close()
        """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                               "-o", "timeout=1", "-o", "timeout_backstop=1", "test_blocked.py"],
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=90)
    finally:
        for path in ipc_files(f"stuck_{unique}"):  # the run was ended: nothing closed the listener
            os.unlink(path)
    assert proc.returncode != 0
    assert "(most recent call first)" in proc.stdout, proc.stdout
    assert "in test_blocked_in_nng_close" in proc.stdout, proc.stdout
