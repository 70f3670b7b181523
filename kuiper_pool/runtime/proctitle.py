"""Process titles, so ``ps`` and ``top`` name what each worker serves.

Workers are forks of the zygote and would otherwise show the command line of the process
that started it: the plugin's (``python -u pysam.py '{...}'``), or after a reload
``python -m kuiper_pool.runtime.zygote ...`` for every worker alike. Linux has two names:

* the thread name (``comm``, 15 bytes; ``ps -o comm``, ``top``): ``prctl(PR_SET_NAME)``;
* the command line (``/proc/<pid>/cmdline``; ``ps -f``, ``ps aux``): the bytes between
  ``arg_start`` and ``arg_end`` of ``/proc/self/stat``. Only a process with
  ``CAP_SYS_RESOURCE`` may move that area (``PR_SET_MM``), so the title is written over the
  original arguments in place through ``/proc/self/mem`` and cut to their length.

Either may be refused (another OS, a kernel that forbids writing ``/proc/self/mem``): then the
process keeps its old name and serves as before.
"""
from __future__ import annotations

from .prctl import PR_SET_NAME, prctl

COMM_MAX = 15


def set_title(title: str, short: str) -> None:
    """Name this process ``title`` in ``ps`` and ``short`` in ``top`` (cut to 15 bytes); best
    effort, never raises."""
    try:
        prctl(PR_SET_NAME, short.encode()[:COMM_MAX], 0, 0, 0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # fields[0] is field 3 (state); arg_start and arg_end are fields 48 and 49
        start, end = int(fields[45]), int(fields[46])
        if end <= start:
            return
        data = title.encode()[:end - start - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data + b"\0" * (end - start - len(data)))
    except (OSError, ValueError, IndexError):
        pass
