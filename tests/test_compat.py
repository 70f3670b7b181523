"""Plugins written for the official SDK: its module paths under kuiper_pool, and
``kuiper-pool-python``, under which they run on kuiper_pool without an edit."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Dict, List

import pytest

from conftest import kuiper_pool_cli
from kuiper_pool.interpreter import MODULES, split_options
from kuiper_pool.tools.rule import run_rule
from plugins import COUNTING_SOURCE, make_plugin, unique_pysam

# Modules of the official package that are its single-process runtime, not an API a plugin
# uses: kuiper_pool's supervisor and workers replace them.
INTERNAL_MODULES = {"connection", "contextimpl", "function", "reg", "shared", "sink", "source",
                    "symbol", "test_connection"}
# Functions of a public module that only the official runtime itself calls.
INTERNAL_NAMES = {"ekuiper.runtime.plugin": {"init_vars", "command_reply"}}


def public_names(module) -> List[str]:
    """``__all__``, else the names the module defines or takes from the official API."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    public_modules = {"ekuiper" + m for m in MODULES}
    return sorted(n for n, v in vars(module).items()
                  if not n.startswith("_") and not inspect.ismodule(v)
                  and getattr(v, "__module__", None) in public_modules
                  and n not in INTERNAL_NAMES.get(module.__name__, ()))


def test_every_public_module_of_the_official_sdk_is_importable_under_kuiper_pool():
    import ekuiper

    official = ["ekuiper"] + [m.name for m in pkgutil.walk_packages(ekuiper.__path__, "ekuiper.")]
    public = {"ekuiper" + m for m in MODULES}
    internal = {"ekuiper.runtime." + m for m in INTERNAL_MODULES}
    assert set(official) == public | internal, "a module of the official SDK is neither mapped nor internal"
    for name in sorted(public):
        ours = importlib.import_module("kuiper_pool" + name[len("ekuiper"):])
        names = public_names(importlib.import_module(name))
        missing = [n for n in names if not hasattr(ours, n)]
        assert not missing, f"{ours.__name__} lacks {missing} of {name}"
    from kuiper_pool.runtime.plugin import PluginConfig, start  # the example import

    assert start is importlib.import_module("kuiper_pool.plugin").start
    assert PluginConfig is importlib.import_module("kuiper_pool").PluginConfig


def test_importing_the_compatibility_modules_loads_no_supervisor_or_worker():
    code = ("import sys\n"
            + "".join(f"import kuiper_pool{m}\n" for m in MODULES if m)
            + "print(sorted(m for m in sys.modules if m.startswith('kuiper_pool.runtime.') and "
              "m not in ('kuiper_pool.runtime.context', 'kuiper_pool.runtime.plugin')))")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, script", [
    (["-u", "p.py", "{}"], 1), (["p.py"], 0), (["-uB", "-W", "ignore", "-X", "dev", "p.py"], 5),
    (["-Wignore", "-E", "-s", "p.py", "-c"], 3), (["--", "p.py"], 1),
    (["--check-hash-based-pycs", "never", "p.py"], 2),
    (["-c", "pass", "p.py"], None), (["-uc", "pass"], None), (["-m", "pip"], None), (["-"], None),
    ([], None), (["--version"], None), (["-u"], None)])
def test_the_interpreter_finds_the_script_after_pythons_options(argv, script):
    assert split_options(argv) == script


def kp_python(*args: str, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("kuiper-pool-python")
    assert exe, "kuiper-pool-python is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # only -u may unbuffer
    return subprocess.run([exe, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60, env=env)


def test_the_interpreter_passes_everything_but_a_script_to_python():
    got = kp_python("-c", "import sys, ekuiper; print(sys.argv, ekuiper.__name__)", "a")
    assert got.stdout.split() == ["['-c',", "'a']", "ekuiper"], got.stderr  # the official package
    assert kp_python("--version").stdout.strip() == f"Python {sys.version.split()[0]}"
    assert kp_python("-m", "json.tool", "--help").returncode == 0


@pytest.mark.parametrize("options", [["-u"], ["-u", "-W", "ignore"]], ids=["ekuiper-form", "more-options"])
def test_a_script_sees_python_s_argv_and_path_and_ekuiper_is_kuiper_pool(tmp_path, options):
    """eKuiper's own form (``-u``) runs the script in the console script's process; any other
    option makes it exec Python with those options: the script sees the same either way."""
    sub = tmp_path / "plugin"
    sub.mkdir()
    (sub / "helper.py").write_text("VALUE = 'from the script folder'\n")
    (sub / "main.py").write_text(textwrap.dedent("""\
        import json, sys, warnings
        import ekuiper, ekuiper.runtime.plugin
        from ekuiper.runtime.context import Context
        from helper import VALUE
        try:
            import ekuiper.runtime.connection
        except ModuleNotFoundError as e:
            internal = str(e)
        print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0], "value": VALUE,
                          "ekuiper": ekuiper.__name__, "plugin": ekuiper.runtime.plugin.__name__,
                          "context": Context.__module__, "internal": internal,
                          "unbuffered": not sys.stdout.line_buffering and sys.stdout.write_through,
                          "raw": [type(f.buffer).__name__ for f in (sys.stdout, sys.stderr)],
                          "filters": [f[0] for f in warnings.filters[:1]]}))
        """))
    got = kp_python(*options, "plugin/main.py", '{"sendTimeout":1000}', cwd=str(tmp_path))
    assert got.returncode == 0, got.stderr
    seen = json.loads(got.stdout)
    assert seen["name"] == "__main__" and seen["argv"] == ["plugin/main.py", '{"sendTimeout":1000}']
    assert seen["path0"] == os.path.realpath(sub) and seen["value"] == "from the script folder"
    assert (seen["ekuiper"], seen["plugin"], seen["context"]) == (
        "kuiper_pool", "kuiper_pool.runtime.plugin", "kuiper_pool.api")
    assert "'ekuiper.runtime.connection'" in seen["internal"] and "not its internals" in seen["internal"]
    assert seen["unbuffered"] and seen["raw"] == ["FileIO", "FileIO"]  # as python -u makes them
    assert (seen["filters"] == ["ignore"]) == ("-W" in options)


@pytest.fixture
def no_official_sdk(tmp_path, monkeypatch) -> None:
    """Processes started by the test find an ``ekuiper`` that fails to import ahead of the
    official one: the plugin (and each spawned worker) works only if the alias holds."""
    shadow = tmp_path / "shadow" / "ekuiper"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the official ekuiper was imported')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(shadow.parent), os.environ.get("PYTHONPATH", "")) if p))


def test_a_script_that_fails_at_import_ends_with_one_line_naming_the_cause(tmp_path):
    (tmp_path / "main.py").write_text("from ekuiper import plugin\nimport not_installed_here\n")
    got = kp_python("-u", "main.py", "{}", cwd=str(tmp_path))
    assert got.returncode == 1
    assert got.stderr.splitlines()[-1] == ("kuiper-pool-python: main.py failed: ModuleNotFoundError: "
                                           "No module named 'not_installed_here'"), got.stderr


def files_digest(folder: str) -> Dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if not f.endswith(".pyc"):
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_the_official_pysam_runs_unmodified_under_kuiper_pool_python(tmp_path, unique, ipc_leak_check,
                                                                     monkeypatch, start_method,
                                                                     no_official_sdk):
    """Spawned workers re-import the plugin's modules (``from ekuiper import ...``): they get
    the alias too."""
    dst = str(tmp_path / "pysam")
    names = unique_pysam(dst, unique, sdk="ekuiper")
    before = files_digest(dst)
    monkeypatch.setenv("KUIPER_POOL_START_METHOD", start_method)
    out = io.StringIO()
    assert run_rule(dst, out=out, python=shutil.which("kuiper-pool-python")) == 0, out.getvalue()
    text = out.getvalue()
    assert re.search(r'#5 source \{"name":"sink","value":5\}', text), text
    assert f'#1 {names["revert"]}("pyjson") -> "nosjyp"' in text
    assert text.count("sink acked {}") == 5
    assert f"plugin {names['pysam']}: supervisor pid" in text  # kuiper_pool served it
    after = files_digest(dst)
    assert {k: v for k, v in after.items() if k in before} == before


SUBMODULE_PLUGIN = '''\
import threading
from ekuiper.function import Function
from ekuiper.runtime.context import Context
from ekuiper.runtime.plugin import PluginConfig, start
from ekuiper.sink import Sink
from ekuiper.source import Source


class Ticks(Source):
    def configure(self, datasource, conf):
        self.stop = threading.Event()

    def open(self, ctx: Context):
        n = 0
        while not self.stop.wait(0.02):
            n += 1
            ctx.emit({"n": n}, None)

    def close(self, ctx):
        self.stop.set()


class Quiet(Sink):
    def configure(self, conf):
        pass

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        ctx.ack_ok()

    def close(self, ctx):
        pass


class Double(Function):
    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return args[0] * 2

    def is_aggregate(self):
        return False


if __name__ == "__main__":
    start(PluginConfig(NAME, {SRC: lambda: Ticks()}, {SNK: lambda: Quiet()}, {FN: lambda: Double()}))
'''


def write_submodule_plugin(root: str, unique: str) -> Dict[str, str]:
    n = {"NAME": f"sub_{unique}", "SRC": f"ticks_{unique}", "SNK": f"quiet_{unique}",
         "FN": f"double_{unique}"}
    os.makedirs(os.path.join(root, "sources"))
    with open(os.path.join(root, "main.py"), "w") as f:
        f.write("".join(f"{k} = {v!r}\n" for k, v in n.items()) + SUBMODULE_PLUGIN)
    with open(os.path.join(root, n["NAME"] + ".json"), "w") as f:
        json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                   "sources": [n["SRC"]], "sinks": [n["SNK"]], "functions": [n["FN"]]}, f)
    with open(os.path.join(root, "sources", n["SRC"] + ".yaml"), "w") as f:
        f.write("default: {}\n")
    with open(os.path.join(root, "rule.json"), "w") as f:
        json.dump({"id": f"r_{unique}", "source": {"symbol": n["SRC"]},
                   "functions": [{"symbol": n["FN"], "args": ["$.n"], "as": "twice"}],
                   "sink": {"symbol": n["SNK"], "config": {"requireAck": True}}, "count": 3}, f)
    return n


def test_a_plugin_importing_the_official_submodules_runs_and_validates_under_kuiper_pool_python(
        tmp_path, unique, ipc_leak_check, no_official_sdk):
    root = str(tmp_path / "sub")
    n = write_submodule_plugin(root, unique)
    python = shutil.which("kuiper-pool-python")
    proc = kuiper_pool_cli("validate", root, "--python", python)
    assert proc.returncode == 0, proc.stdout
    assert "runs ekuiper imports on kuiper_pool" in proc.stdout
    assert f"ok       function {n['FN']}: the factory builds __main__.Double" in proc.stdout, proc.stdout
    out = io.StringIO()
    assert run_rule(root, out=out, python=python) == 0, out.getvalue()
    assert f'#3 {n["FN"]}(3) -> 6' in out.getvalue() and out.getvalue().count("sink acked {}") == 3


def test_the_same_plugin_with_kuiper_pool_imports_runs_under_plain_python(tmp_path, unique, ipc_leak_check):
    """'Change the imports; nothing else': ekuiper.<module> -> kuiper_pool.<module>."""
    root = str(tmp_path / "sub")
    n = write_submodule_plugin(root, unique)
    main = os.path.join(root, "main.py")
    with open(main) as f:
        text = f.read().replace("from ekuiper.", "from kuiper_pool.")
    with open(main, "w") as f:
        f.write(text)
    out = io.StringIO()
    assert run_rule(root, out=out) == 0, out.getvalue()
    assert f'#3 {n["FN"]}(3) -> 6' in out.getvalue()


def test_source_datasource_empty_passes_what_the_official_sdk_passes_and_the_start_line_says_it(
        tmp_path, unique, host_runs):
    """A source written against the official SDK's "" (e.g. one that subscribes to whatever
    configure gets) keeps working with ``source_datasource: empty`` on its symbol."""
    stream, official = f"s{unique}", f"o{unique}"
    d = make_plugin(str(tmp_path), f"kp{unique}", sources={stream: COUNTING_SOURCE, official: "CountingSource"},
                    yaml_settings={"symbols": {official: {"source_datasource": "empty"}}})
    host = host_runs.launch(d)
    cfg = {"datasource": f"topic/{unique}"}
    got = {s: host.start_source(s, f"r{unique}", op=s, config=cfg).recv()["message"]["datasource"]
           for s in (stream, official)}
    assert got == {stream: f"topic/{unique}", official: ""}
    with open(os.path.join(d, "stdout.log")) as f:
        log = f.read()
    for symbol, value, policy in ((stream, f"topic/{unique}", "stream"), (official, "", "empty")):
        assert re.search(rf"INFO .*source {symbol} rule r{unique} op {symbol} instance 0: started in worker "
                         rf"pid \d+; configure got datasource {value!r} \(source_datasource: {policy}\)", log), log
