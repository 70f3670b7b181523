"""How a process of ours starts another Python: a module of ours, with a folder we chose
first on ``sys.path`` and never the working directory.

``python -m <module>`` puts the working directory first on ``sys.path`` before it looks the
module up, so a ``kuiper_pool/`` (or ``runpy.py``) planted in a working directory another user
can write would run in our process, as root if we are root. ``-I`` would also drop
``PYTHONPATH`` and ``-P`` needs Python 3.11, so the command is ``python -c BOOT <folder> -m
<module> <args>``: ``-c`` puts the working directory first too, as ``""``, and BOOT (run before
any import) replaces that entry by ``<folder>`` (the plugin's folder, which eKuiper's own
``python <script>`` puts first), then runs the module as ``-m`` would. Under ``-I``, ``-P`` or
``PYTHONSAFEPATH`` Python adds no entry and BOOT adds none either, as Python would for a script.
"""
from __future__ import annotations

import sys
from typing import List, Sequence

# sys is built in: nothing is imported from sys.path before its first entry is replaced
BOOT = """\
import sys
if sys.path[:1] == [""]:
    sys.path[0] = sys.argv[1]
import runpy
sys.argv = sys.argv[3:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def python_command(folder: str, modules: Sequence[str], options: Sequence[str] = ("-u",)) -> List[str]:
    """This interpreter with ``options`` running ``-m modules[0]`` with ``folder`` first on
    sys.path; further ``modules`` follow it as ``-m <module>`` words (a module that runs the
    next one, as ``kuiper_pool.interpreter`` does). Arguments go after it."""
    words: List[str] = []
    for module in modules:
        words += ["-m", module]
    return [sys.executable, *options, "-c", BOOT, folder, *words]
