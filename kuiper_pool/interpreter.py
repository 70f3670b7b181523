"""``kuiper-pool-python``: a Python interpreter under which ``import ekuiper`` is kuiper_pool.

Name it as eKuiper's ``portable.pythonBin`` and plugins written for the official SDK run
under kuiper_pool without an edit. eKuiper starts a plugin as ``<pythonBin> -u <script>
'<json>'``: for that form (any interpreter options, then a script) :func:`main` re-executes
the real interpreter (``sys.executable``) with the same options on ``kuiper_pool.interpreter
<script> <args>`` (``launch.py``: the script's folder first on ``sys.path``, as Python puts
it, never the working directory), which makes the official SDK's public modules
(:data:`MODULES`) resolve to the kuiper_pool modules of the same path (:func:`install`), then
runs the script as ``__main__`` with ``sys.argv`` and ``sys.path[0]`` as Python sets them.
eKuiper's own form (``-u`` or no option) needs no second interpreter: the script runs in this
process, with stdout and stderr made unbuffered as ``-u`` makes them (a second start of Python
and of kuiper_pool cost ~80 ms of every plugin start). Every other use (``-c``,
``-m``, ``-``, no arguments, ``--version``, ``-m pip``) execs the real interpreter unchanged,
so the alias exists only in plugin processes, whether or not the official package is installed.
"""
from __future__ import annotations

import importlib
import io
import os
import runpy
import sys
import traceback
from typing import List, Optional, Sequence

from .launch import python_command

OFFICIAL = "ekuiper"
# The official SDK's public modules; each is served by the kuiper_pool module of the same
# path (``ekuiper.runtime.plugin`` -> ``kuiper_pool.runtime.plugin``).
MODULES = ("", ".function", ".source", ".sink", ".runtime", ".runtime.context", ".runtime.plugin")

_OPTIONS_WITH_VALUE = "WX"  # -W arg, -X opt: the value is the rest of the word or the next one
_STOP_OPTIONS = "cm"  # -c cmd, -m mod: not a script; the real interpreter runs it as is


class _RefuseInternals:
    """``ekuiper.<anything else>`` (the official runtime's internals) is not found, with a
    message that says why, instead of being looked up in kuiper_pool's own folders. (A meta
    path finder needs only ``find_spec``; ``importlib.abc`` would import importlib.resources,
    tempfile and pathlib at every plugin start.)"""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.startswith(OFFICIAL + "."):
            public = ", ".join(OFFICIAL + m for m in MODULES)
            raise ModuleNotFoundError(f"No module named {fullname!r}: under kuiper-pool-python, "
                                      f"kuiper_pool provides the official SDK's public modules "
                                      f"({public}), not its internals", name=fullname)


def install() -> None:
    """Make ``ekuiper`` and its public submodules the kuiper_pool modules in this process."""
    for suffix in MODULES:
        sys.modules[OFFICIAL + suffix] = importlib.import_module("kuiper_pool" + suffix)
    if not any(isinstance(f, _RefuseInternals) for f in sys.meta_path):
        sys.meta_path.insert(0, _RefuseInternals())


def installed() -> bool:
    """Whether ``ekuiper`` is kuiper_pool in this process (spawned workers need it too)."""
    return sys.modules.get(OFFICIAL) is sys.modules.get("kuiper_pool")


def run(argv: Sequence[str]) -> None:
    """``-m <module> [args]`` or ``<script> [args]`` with the alias installed, as ``__main__``."""
    install()
    if argv[0] == "-m":
        sys.argv = [argv[1]] + list(argv[2:])  # runpy replaces argv[0] with the module's path
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    sys.argv = list(argv)
    if not (sys.flags.isolated or getattr(sys.flags, "safe_path", False)) and sys.path:
        sys.path[0] = os.path.dirname(os.path.realpath(script))  # as `python <script>` has it
    try:
        runpy.run_path(script, run_name="__main__")
    except Exception as e:  # noqa: BLE001 - e.g. an import of the plugin's own that fails
        traceback.print_exc()
        # eKuiper logs the plugin's output, but the rule only gets "control handshake error"
        # after portable.initTimeout: one line that says what happened
        print(f"kuiper-pool-python: {script} failed: {type(e).__name__}: {' '.join(str(e).split())}",
              file=sys.stderr, flush=True)
        sys.exit(1)


def split_options(args: Sequence[str]) -> Optional[int]:
    """The index of the script in an interpreter command line, or None when it runs no script
    file (``-c``, ``-m``, ``-`` for stdin, no arguments, or an option this does not know)."""
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return i + 1 if i + 1 < len(args) else None
        if word == "--check-hash-based-pycs":
            i += 2
            continue
        if not word.startswith("-") or word == "-":
            return None if word == "-" else i
        if word.startswith("--"):
            return None  # --help, --version ...: nothing to alias
        for k, flag in enumerate(word[1:], 1):
            if flag in _STOP_OPTIONS:
                return None
            if flag in _OPTIONS_WITH_VALUE:
                i += 0 if k + 1 < len(word) else 1
                break
        i += 1
    return None


def unbuffered() -> None:
    """stdout and stderr as ``python -u`` makes them: text written through to the file
    descriptor at once, no buffer in between (what eKuiper's ``-u`` asks for)."""
    for name in ("stdout", "stderr"):
        old = getattr(sys, name)
        if old is None:
            continue
        old.flush()
        raw = io.FileIO(old.fileno(), "w", closefd=False)
        raw.name = f"<{name}>"  # as Python names its own
        new = io.TextIOWrapper(raw, encoding=old.encoding, errors=old.errors, newline="\n",
                               line_buffering=False, write_through=True)
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)


def main(argv: Optional[List[str]] = None) -> Optional[int]:
    """The ``kuiper-pool-python`` console script (see the module doc): eKuiper's form runs the
    script here; every other use execs the real interpreter."""
    args = sys.argv[1:] if argv is None else argv
    at = split_options(args)
    if at is not None and set(args[:at]) <= {"-u"}:
        if args[:at]:
            unbuffered()
        run(args[at:])
        return 0
    command = [sys.executable] + list(args)
    if at is not None:
        options = list(args[:at - 1] if args[at - 1:at] == ["--"] else args[:at])
        script = args[at]
        command = python_command(os.path.dirname(os.path.realpath(script)), [__name__], options)
        command += list(args[at:])
    sys.stdout.flush()
    os.execv(sys.executable, command)


if __name__ == "__main__":
    # Run from the canonical module (this file also runs as __main__ of ``-m``).
    from kuiper_pool.interpreter import run as _run

    _run(sys.argv[1:])
