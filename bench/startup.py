#!/usr/bin/env python3
"""Plugin start-up under eKuiper's runtime stand-in: kuiper_pool against the official SDK.

    python bench/startup.py --host /path/to/ekhostc            # 10 alternating runs
    python bench/startup.py --host /path/to/ekhostc --runs 15 --results startup.md

``--host`` (or ``$EKHOSTC``) is the C stand-in for eKuiper's portable-plugin runtime
(``ekhostc``, docs/startup-bench.md): it starts a plugin as eKuiper does (``<python> -u <script>
'{"sendTimeout":1000}'``) and its ``check`` mode prints ``PASS handshake <ms> ms``, the time
from eKuiper's ``CreateIns`` (control channel, exec) to the plugin's handshake.

Three variants of the same plugin (bench/plugin/main.py) are started, in an order that
rotates between runs:

* ``official``: the official SDK (``from ekuiper import ...``) under plain ``python``;
* ``switched``: kuiper_pool with the imports switched (``from kuiper_pool import ...``);
* ``zero-edit``: the official SDK's script unchanged under ``kuiper-pool-python``.

Each run measures, for each variant, in fresh plugin processes:

1. plugin start -> control handshake: ``ekhostc check``, its handshake line (the host is
   stopped right after it);
2. plugin start -> first source item: ``ekhostc source`` with the ``clock`` source, which
   emits the wall-clock time it emitted at; measured from just before the host is started
   (the host's own start, a few ms of C, is the same for every variant).

kuiper_pool is measured as an install leaves it: a throwaway virtualenv holds a copy of the
package, byte-compiled, and the ``kuiper-pool-python`` console script as pip writes it;
the official SDK, pynng and the other dependencies come from this interpreter's
site-packages, already byte-compiled by their install. Every variant runs with that
virtualenv's ``python``.
"""
from __future__ import annotations

import argparse
import compileall
import glob
import json
import os
import re
import shutil
import signal
import site
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

import psutil

import reap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PACKAGE = os.path.join(REPO, "kuiper_pool")
PLUGIN_MAIN = os.path.join(HERE, "plugin", "main.py")
VARIANTS = ("official", "switched", "zero-edit")
HANDSHAKE = re.compile(r"PASS handshake (\d+(?:\.\d+)?) ms")
ITEM = re.compile(r"ITEM 0 (\{.*\}) META ")
# pip's console-script template (what `pip install` writes for [project.scripts])
CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from kuiper_pool.interpreter import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


class BenchError(RuntimeError):
    pass


def install_copy(root: str, package: str = PACKAGE, venv_name: str = "venv") -> Tuple[str, str]:
    """A virtualenv with kuiper_pool (``package``: this checkout's, or another's) installed
    as pip leaves it; (python, kuiper-pool-python)."""
    venv = os.path.join(root, venv_name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this interpreter's packages (ekuiper, pynng, psutil, ...) after the copy's own folder;
    # a .pth in them is not run, so an editable kuiper_pool there stays out of the way
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    with open(os.path.join(purelib, "kuiper_pool_bench_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    target = os.path.join(purelib, "kuiper_pool")
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    if not compileall.compile_dir(target, quiet=1):
        raise BenchError("could not byte-compile the installed copy")
    script = os.path.join(venv, "bin", "kuiper-pool-python")
    with open(script, "w") as f:
        f.write(CONSOLE_SCRIPT.format(python=python))
    os.chmod(script, 0o755)
    found = subprocess.run([python, "-c", "import kuiper_pool, ekuiper; print(kuiper_pool.__file__)"],
                           capture_output=True, text=True, cwd=root)
    if found.returncode or not found.stdout.startswith(purelib):
        raise BenchError(f"the installed copy is not what imports: {found.stdout}{found.stderr}")
    return python, script


class Launch:
    """One ``ekhostc`` run of one variant in a plugin folder of its own; every process it
    started (the host, the plugin's tree) is gone when ``close`` returns."""

    def __init__(self, host: str, root: str, name: str, variant: str, python: str, script: str,
                 mode: List[str], symbols: Tuple[str, ...] = ("--source", "clock"), main: str = PLUGIN_MAIN,
                 extra_env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        shutil.copy(main, os.path.join(self.dir, "main.py"))
        with open(os.path.join(self.dir, name + ".json"), "w") as f:
            json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                       "sources": ["clock", "flood"], "sinks": ["count"], "functions": [name + "noop"]}, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPROFILE")}
        env.update(BENCH_RUNTIME="official" if variant != "switched" else "pool", BENCH_PLUGIN=name,
                   BENCH_PREFIX=name, **(extra_env or {}))
        env.pop("PYTHONPATH", None)  # kuiper_pool comes from the installed copy alone
        interpreter = script if variant == "zero-edit" else python
        self.log = os.path.join(root, name + ".log")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [host, *mode, "--python", interpreter, "--dir", self.dir, "--exe", "main.py", "--name", name,
             *symbols, "--log", self.log],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=self.dir)

    def first_line(self, pattern: "re.Pattern[str]", timeout: float = 60.0) -> "re.Match[str]":
        found: List["re.Match[str]"] = []
        seen: List[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                seen.append(line.rstrip())
                m = pattern.search(line)
                if m:
                    found.append(m)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            raise BenchError(f"{self.name}: no {pattern.pattern!r} within {timeout:g}s; host said "
                             f"{seen[-5:]}; log {self.log}")
        return found[0]

    def plugin_processes(self) -> List[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("BENCH_PLUGIN") == self.name:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def close(self) -> None:
        """SIGTERM the host (it SIGKILLs the plugin as eKuiper does and removes its ipc
        files); then wait for the plugin's tree to be gone, SIGKILLing what stays."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        reap.end(self.plugin_processes(), 10.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        # the stand-in names its rules after its pid and sometimes leaves a source's listening
        # socket file behind when it is stopped right after the first item: remove its own
        for path in glob.glob(f"/tmp/ekgo{self.proc.pid}_*.ipc"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def handshake_ms(launch: Launch) -> float:
    return float(launch.first_line(HANDSHAKE).group(1))


def first_item_ms(launch: Launch) -> float:
    item = json.loads(launch.first_line(ITEM).group(1))
    return (float(item["t"]) - launch.started) * 1000


MEASURES: Dict[str, Tuple[List[str], Callable[[Launch], float]]] = {
    "handshake": (["check"], handshake_ms),
    "first_item": (["source", "--n", "1", "--wait", "60"], first_item_ms),
}
LABELS = {"handshake": "plugin start -> control handshake, ms",
          "first_item": "plugin start -> first source item, ms"}


def summary(values: List[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def table(results: Dict[str, Dict[str, List[float]]]) -> str:
    lines = ["| measure | official SDK | kuiper_pool, imports switched | ratio | kuiper-pool-python | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label in LABELS.items():
        off = results["official"][key]
        cells = [label, summary(off)]
        for variant in ("switched", "zero-edit"):
            mine = results[variant][key]
            paired = [m / o for m, o in zip(mine, off)]
            cells += [summary(mine), f"{statistics.median(mine) / statistics.median(off):.2f} "
                                     f"(runs {min(paired):.2f}-{max(paired):.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(lines: List[str], path: Optional[str]) -> None:
    """Print the report; with ``path`` (``--results``) also write it there."""
    text = "\n".join(lines)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=os.environ.get("EKHOSTC"), help="the ekhostc binary (default $EKHOSTC)")
    ap.add_argument("--runs", type=int, default=10, help="alternating runs (default 10)")
    ap.add_argument("--results", default=None, help="also write the table and the per-run values here")
    args = ap.parse_args(argv)
    if not args.host or not os.access(args.host, os.X_OK):
        ap.error("--host: the ekhostc binary of eKuiper's runtime stand-in is needed")
    host = os.path.abspath(args.host)
    tag = "kps" + uuid.uuid4().hex[:6]
    root = tempfile.mkdtemp(prefix=tag + "-")
    results: Dict[str, Dict[str, List[float]]] = {v: {k: [] for k in MEASURES} for v in VARIANTS}
    t_begin = time.monotonic()
    try:
        python, script = install_copy(root)
        for run in range(args.runs):
            order = VARIANTS[run % 3:] + VARIANTS[:run % 3]
            for key, (mode, measure) in MEASURES.items():
                for variant in order:
                    name = f"{tag}{VARIANTS.index(variant)}{key[0]}{run}"
                    launch = Launch(host, root, name, variant, python, script, mode)
                    try:
                        results[variant][key].append(measure(launch))
                    finally:
                        launch.close()
            print(f"run {run + 1}/{args.runs}: " + json.dumps(
                {v: {k: round(results[v][k][-1], 1) for k in MEASURES} for v in VARIANTS}),
                file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = [f"Plugin start-up under eKuiper's runtime stand-in (`ekhostc`), {args.runs} alternating "
           f"runs in {time.monotonic() - t_begin:.0f} s; median (min-max) ms, ratio of the medians "
           f"to the official SDK's (and the range of the per-run ratios). Load average at the end: "
           + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ".", "", table(results), "",
           "Per-run values (ms):", "", "```"]
    out += [f"{v} {k}: " + " ".join(f"{x:.0f}" for x in results[v][k]) for v in VARIANTS for k in MEASURES]
    out += ["```"]
    publish(out, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
