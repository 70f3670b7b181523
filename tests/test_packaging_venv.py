"""``kuiper-pool package --venv``: a virtual environment per plugin, installed and run as eKuiper
does (unzip, ``/bin/sh install.sh``, ``<pythonBin> -u <executable> '<json>'``).

Offline: the zip carries the real kuiper-pool wheel; pip reads a local wheel folder
(``PIP_NO_INDEX``, ``PIP_FIND_LINKS``, which the generated install.sh leaves to pip) holding two
versions of a tiny package and kuiper-pool's dependencies repacked from this interpreter's
installed copies. The plugins import that package, which is not installed here: they are
packaged with ``--no-run``.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import posixpath
import re
import subprocess
import sys
import zipfile
from typing import Dict, List

import psutil
import pytest

from conftest import kuiper_pool_cli as cli
from kuiper_pool.tools.emulator import HostError
from kuiper_pool.tools.packaging import ENTRY
from test_tooling import install_like_ekuiper, needs_installed_kuiper_pool, run_install_sh, write

PROBE = "kpvenvprobe"  # a package name used only here; versions 1.0 and 2.0 live in the wheel folder
PYTHON_BIN = os.path.join(sys.base_prefix, "bin", "python3")  # an interpreter without kuiper-pool


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def write_wheel(folder: str, name: str, version: str, files: Dict[str, bytes], metadata: str) -> str:
    """A py3-none-any wheel of ``files`` (path in site-packages -> bytes) with ``metadata``."""
    dist_info = f"{_canonical(name)}-{version}.dist-info"
    files = {**files, f"{dist_info}/METADATA": metadata.encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                   b"Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()] + [f"{dist_info}/RECORD,,"]
    path = os.path.join(folder, f"{_canonical(name)}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for arc, data in files.items():
            zf.writestr(arc, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def _dependencies(name: str) -> List[importlib.metadata.Distribution]:
    """The installed distributions ``name`` needs, transitively (extras left out)."""
    found: Dict[str, importlib.metadata.Distribution] = {}
    todo = [r for r in importlib.metadata.requires(name) or [] if "extra ==" not in r]
    while todo:
        dep = re.match(r"[A-Za-z0-9._-]+", todo.pop()).group(0)
        if _canonical(dep) not in found:
            dist = found[_canonical(dep)] = importlib.metadata.distribution(dep)
            todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return list(found.values())


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> str:
    """The wheel folder: the probe package 1.0 and 2.0 and kuiper-pool's dependencies (the zip
    carries kuiper-pool's own wheel)."""
    folder = str(tmp_path_factory.mktemp("wheels"))
    for version in ("1.0", "2.0"):
        write_wheel(folder, PROBE, version, {f"{PROBE}/__init__.py": f"__version__ = {version!r}\n".encode()},
                    f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n")
    for dist in _dependencies("kuiper-pool"):
        files = {f.as_posix(): dist.locate_file(f).read_bytes() for f in dist.files or []
                 if f.parts[0] != ".." and not f.parts[0].endswith(".dist-info")
                 and "__pycache__" not in f.parts}
        write_wheel(folder, dist.metadata["Name"], dist.version, files, dist.read_text("METADATA"))
    return folder


MAIN = '''\
import kuiper_pool
import {probe}
from kuiper_pool import Function, PluginConfig, plugin


class Version(Function):
    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return {{"{probe}": {probe}.__version__, "kuiper_pool": kuiper_pool.__file__}}

    def is_aggregate(self):
        return False


if __name__ == "__main__":
    plugin.start(PluginConfig({name!r}, {{}}, {{}}, {{{symbol!r}: lambda: Version()}}))
'''


def probe_plugin(root: str, name: str, symbol: str, version: str, executable: str = "main.py") -> str:
    """A plugin folder whose function ``symbol`` reports the probe version it imports."""
    folder = os.path.join(root, name)
    write(os.path.join(folder, executable), MAIN.format(probe=PROBE, name=name, symbol=symbol))
    write(os.path.join(folder, name + ".json"),
          f'{{"version": "v1.0.0", "language": "python", "executable": "{executable}", '
          f'"sources": [], "sinks": [], "functions": ["{symbol}"]}}')
    write(os.path.join(folder, "requirements.txt"), f"{PROBE}=={version}\nkuiper-pool\n")
    return folder


def package_and_install(tmp_path, src: str, name: str, wheel: str) -> dict:
    """``kuiper-pool package --venv``, then eKuiper's unzip; ``install.sh`` not run yet."""
    zip_path = tmp_path / (name + ".zip")
    proc = cli("package", "--venv", "--no-run", "--kuiper-pool-wheel", wheel, src, "-o", zip_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return install_like_ekuiper(str(zip_path), name, str(tmp_path / "ekuiper"))


def venv_python(plugin_dir: str) -> str:
    return os.path.join(plugin_dir, ".venv", "bin", "python")


@needs_installed_kuiper_pool
@pytest.mark.timeout(300)
def test_two_plugins_pinning_different_versions_run_side_by_side(tmp_path, unique, wheels, host_runs,
                                                                  monkeypatch, kuiper_pool_wheel):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", wheels)
    plugins = {}
    for version, executable in (("1.0", "main.py"), ("2.0", "src/main.py")):  # and one in a subfolder
        name, symbol = f"p{version[0]}{unique}", f"v{version[0]}{unique}"
        src = probe_plugin(str(tmp_path / "src"), name, symbol, version, executable)
        got = package_and_install(tmp_path, src, name, kuiper_pool_wheel)
        assert got["info"]["executable"] == posixpath.join(posixpath.dirname(executable), ENTRY)
        result = run_install_sh(got["plugin_dir"])
        assert result.returncode == 0, result.stdout
        plugins[version] = (got["plugin_dir"], symbol)
    # both run at once under one pythonBin that has neither kuiper-pool nor the probe package,
    # PYTHONPATH empty: everything they import comes from their own .venv
    hosts = {v: host_runs.launch(d, python=PYTHON_BIN, env={"PYTHONPATH": ""}) for v, (d, _) in plugins.items()}
    for version, (plugin_dir, symbol) in plugins.items():
        host = hosts[version]
        reply = host.start_function(symbol).exec([])
        assert reply.get("state"), reply
        assert reply["result"][PROBE] == version
        assert reply["result"]["kuiper_pool"].startswith(os.path.join(plugin_dir, ".venv", "")), reply
        # the entry exec'd the venv's python in place: the pid eKuiper holds is the plugin's
        cmdline = psutil.Process(host.process.pid).cmdline()
        assert cmdline[:2] == [venv_python(plugin_dir), "-u"], cmdline
        assert hosts["1.0" if version == "2.0" else "2.0"].alive()
        # and the installed folder passes validate with that same pythonBin
        check = cli("validate", plugin_dir, "--python", PYTHON_BIN, env={"PYTHONPATH": ""})
        assert check.returncode == 0, check.stdout + check.stderr


def test_without_its_venv_the_plugin_says_so_in_one_line(tmp_path, unique, host_runs, kuiper_pool_wheel):
    """install.sh never ran (or failed): eKuiper's log gets one line naming plugin and cause."""
    name = "p" + unique
    got = package_and_install(tmp_path, probe_plugin(str(tmp_path / "src"), name, "v" + unique, "1.0"), name,
                              kuiper_pool_wheel)
    with pytest.raises(HostError, match="exited with code 1 before the handshake"):
        host_runs.launch(got["plugin_dir"], python=PYTHON_BIN)
    with open(os.path.join(got["plugin_dir"], "stdout.log")) as f:
        lines = f.read().splitlines()
    assert lines == [f"kuiper-pool: plugin {name} cannot start: {venv_python(got['plugin_dir'])}: No such file "
                     "or directory: the plugin's virtual environment is missing or broken; install the "
                     "plugin again (install.sh creates it)"], lines


def test_install_fails_clearly_when_python_cannot_make_a_venv(tmp_path, unique, monkeypatch, kuiper_pool_wheel):
    """A Python without a working venv module (minimal images; Debian's python3 without
    python3-venv) or no Python at all: install.sh exits non-zero (eKuiper fails the install)
    and says what to do."""
    name = "p" + unique
    got = package_and_install(tmp_path, probe_plugin(str(tmp_path / "src"), name, "v" + unique, "1.0"), name,
                              kuiper_pool_wheel)
    write(str(tmp_path / "no_venv" / "venv" / "__init__.py"), "raise ImportError('No module named venv')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "no_venv"))
    result = run_install_sh(got["plugin_dir"])
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[-1] == (
        f"kuiper-pool: cannot create .venv: {sys.executable} -m venv failed (it needs the venv and "
        "ensurepip modules; on Debian and Ubuntu: apt-get install python3-venv)"), result.stdout
    assert not os.path.exists(os.path.join(got["plugin_dir"], ".venv"))
    missing = "python-" + unique
    result = subprocess.run(["/bin/sh", "install.sh", missing], cwd=got["plugin_dir"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert result.returncode == 1
    assert result.stdout == f"kuiper-pool: cannot create .venv: {missing} is missing or not Python 3.9 or newer\n"


@pytest.mark.parametrize("case, problem", [
    ("own install.sh", "install.sh: the folder has its own; --venv generates the one that creates the "
                       "plugin's environment"),
    ("no requirements.txt", "requirements.txt: missing, and --no-kuiper-pool: --venv would install nothing"),
    ("entry taken", f"{ENTRY}: --venv generates this file; rename yours"),
    ("conda", "pv.json: virtualEnvType (conda) and --venv exclude each other: eKuiper would run the "
              "entry in conda"),
])
def test_package_venv_refuses_what_it_cannot_generate(tmp_path, case, problem):
    src = probe_plugin(str(tmp_path), "pv", "pvf", "1.0")
    if case == "own install.sh":
        write(os.path.join(src, "install.sh"), "#!/bin/sh\npip install -r requirements.txt\n")
    elif case == "no requirements.txt":
        os.unlink(os.path.join(src, "requirements.txt"))
    elif case == "entry taken":
        write(os.path.join(src, ENTRY), "")
    else:
        write(os.path.join(src, "pv.json"), '{"language": "python", "executable": "main.py", '
                                            '"functions": ["pvf"], "virtualEnvType": "conda", "env": "e"}')
    proc = cli("package", "--venv", "--no-run", "--no-kuiper-pool", src, "-o", tmp_path / "pv.zip")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("problem")] == \
        [f"problem  {problem}"]
    assert not os.path.exists(tmp_path / "pv.zip")
