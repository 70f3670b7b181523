"""Ending the processes a benchmark started: shared by bench/run.py and bench/startup.py."""
from __future__ import annotations

from typing import List

import psutil


def end(procs: List[psutil.Process], grace: float) -> None:
    """Wait up to ``grace`` seconds for ``procs`` to end; SIGKILL what is left and wait for it."""
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5.0)
