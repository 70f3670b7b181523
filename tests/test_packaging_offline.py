"""``kuiper-pool package --offline``: a zip that installs on an edge node with no package index.

The zips are built with ``pip download`` from the index (pip's cache makes repeated runs
cheap) and installed as eKuiper does, with no index reachable: ``PIP_NO_INDEX=1``, pip's
configuration files ignored and no find-links but the zip's. Without an index here, these
tests are skipped with one line saying so.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import urllib.parse
import zipfile

import pytest

import kuiper_pool
from conftest import kuiper_pool_cli as cli
from test_packaging_venv import PYTHON_BIN, wheels  # noqa: F401 (a fixture)
from plugins import unique_pysam
from test_tooling import install_like_ekuiper, pysam_copy

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")


def _index_reachable() -> bool:
    url = urllib.parse.urlparse(INDEX)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=5).close()
        return True
    except OSError:
        return False


needs_index = pytest.mark.skipif(not _index_reachable(),
                                 reason=f"package index {INDEX} unreachable: --offline downloads wheels from it")

# eKuiper's node: no index, no pip configuration, no find-links of its own
NO_INDEX = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
NO_INDEX.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")


def install_sh(plugin_dir: str, python: str) -> subprocess.CompletedProcess:
    """eKuiper's ``/bin/sh install.sh <shellParas>`` with no index reachable."""
    return subprocess.run(["/bin/sh", os.path.join(plugin_dir, "install.sh"), python], cwd=plugin_dir,
                          env=NO_INDEX, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def wheel_files(path: str) -> dict:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def assert_record_true(files: dict) -> None:
    """Every file of a wheel is in its RECORD with its sha256 and size, RECORD itself unhashed."""
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    rows = {r[0]: r[1:] for r in csv.reader(io.StringIO(files[record].decode())) if r}
    assert set(rows) == set(files), set(rows) ^ set(files)
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert rows[name] == (["", ""] if name == record else [f"sha256={digest}", str(len(data))]), name


@needs_index
@pytest.mark.timeout(600)
def test_offline_zip_installs_with_no_index_and_runs(tmp_path, unique, kuiper_pool_wheel):
    src = str(tmp_path / "pysam")
    names = unique_pysam(src, unique)  # it runs: its function's socket name must be unique too
    name = names["pysam"]
    proc = cli("package", "--offline", src, "-o", tmp_path / "p.zip", "--kuiper-pool-wheel",
               kuiper_pool_wheel, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = "%d.%d" % sys.version_info[:2]
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        wheels = sorted(n for n in zf.namelist() if n.startswith("wheels/") and n.endswith(".whl"))
        script = zf.read("install.sh").decode()
    # kuiper-pool and every one of its dependencies travel in the zip
    for dist in ("kuiper_pool", "pynng", "cloudpickle", "psutil", "pyyaml"):
        assert [w for w in wheels if w.lower().startswith(f"wheels/{dist}-")], (dist, wheels)
    assert f'"$PY" -m pip install --no-index --find-links wheels wheels/kuiper_pool-' in script
    assert f"for Python {version} on" in script, script
    got = install_like_ekuiper(str(tmp_path / "p.zip"), name, str(tmp_path / "ekuiper"))
    venv = str(tmp_path / "venv")
    subprocess.run([PYTHON_BIN, "-m", "venv", venv], check=True, timeout=300, env=NO_INDEX)
    python = os.path.join(venv, "bin", "python")
    result = install_sh(got["plugin_dir"], python)
    assert result.returncode == 0, result.stdout
    assert f"Successfully installed" in result.stdout and f"kuiper-pool-{kuiper_pool.__version__}" in result.stdout
    # the installed copy runs the plugin, from its own site-packages
    where = subprocess.run([python, "-c", "import kuiper_pool; print(kuiper_pool.__file__)"], text=True,
                           stdout=subprocess.PIPE, timeout=60, env=NO_INDEX, cwd=str(tmp_path))
    assert where.stdout.startswith(os.path.join(venv, "lib", "")), where.stdout
    run = subprocess.run([os.path.join(venv, "bin", "kuiper-pool"), "try", got["plugin_dir"], "--python", python],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, env=NO_INDEX)
    assert run.returncode == 0, run.stdout
    assert f'#1 {names["revert"]}("pyjson") -> "nosjyp"' in run.stdout, run.stdout
    # that installed copy packages again: its wheel rebuilt from the installed RECORD is the one
    # it was installed from, file for file, with a true RECORD and no bytecode
    again = subprocess.run([os.path.join(venv, "bin", "kuiper-pool"), "package", "-q", src, "-o",
                            str(tmp_path / "again.zip")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=120, env=NO_INDEX)
    assert again.returncode == 0, again.stdout
    with zipfile.ZipFile(tmp_path / "again.zip") as zf:
        inner = next(n for n in zf.namelist() if n.startswith("wheels/kuiper_pool-"))
        assert inner == "wheels/" + os.path.basename(kuiper_pool_wheel)
        zf.extract(inner, str(tmp_path / "again"))
    rebuilt, original = wheel_files(str(tmp_path / "again" / inner)), wheel_files(kuiper_pool_wheel)
    assert set(rebuilt) == set(original)
    assert [n for n in rebuilt if rebuilt[n] != original[n] and not n.endswith("/RECORD")] == []
    assert not [n for n in rebuilt if n.endswith(".pyc")]
    assert [n for n in rebuilt if n.endswith(".dist-info/entry_points.txt")]
    assert_record_true(rebuilt)


@needs_index
@pytest.mark.timeout(600)
def test_offline_venv_zip_installs_with_no_index_and_runs(tmp_path, unique, kuiper_pool_wheel):
    """--offline with --venv: the plugin's own .venv, filled from the zip alone; the plugin runs
    under a pythonBin that has no kuiper-pool."""
    src = str(tmp_path / "pysam")
    names = unique_pysam(src, unique)  # it runs: its function's socket name must be unique too
    name = names["pysam"]
    proc = cli("package", "--offline", "--venv", "-q", src, "-o", tmp_path / "p.zip",
               "--kuiper-pool-wheel", kuiper_pool_wheel, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = install_like_ekuiper(str(tmp_path / "p.zip"), name, str(tmp_path / "ekuiper"))
    result = install_sh(got["plugin_dir"], PYTHON_BIN)
    assert result.returncode == 0, result.stdout
    run = cli("try", got["plugin_dir"], "--python", PYTHON_BIN, timeout=120, env={"PYTHONPATH": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    assert f'#1 {names["revert"]}("pyjson") -> "nosjyp"' in run.stdout, run.stdout


def test_offline_package_says_in_one_line_when_pip_cannot_download(tmp_path, unique, kuiper_pool_wheel):
    name = "pysam" + unique
    src = pysam_copy(tmp_path, plugin=name)
    proc = cli("package", "--offline", "--python-version", "3.10", "--platform", "manylinux_2_28_aarch64",
               "-q", src, "-o", tmp_path / "p.zip", "--kuiper-pool-wheel", kuiper_pool_wheel,
               env={"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("problem")]
    assert len(problems) == 1 and re.fullmatch(
        r"problem  wheels: pip download for Python 3\.10 on manylinux_2_28_aarch64 failed \(exit 1\): "
        r"ERROR: Could not find a version that satisfies the requirement \S+ \(from kuiper-pool\) "
        r"\(from versions: none\)", problems[0]), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "p.zip").exists()


def test_offline_install_sh_refuses_another_python_version(tmp_path, unique, kuiper_pool_wheel, wheels):
    """Wheels made for one Python version do not install into another: install.sh stops with one
    line before pip runs. (Built from a local wheel folder: no index needed.)"""
    name = "pysam" + unique
    src = pysam_copy(tmp_path, plugin=name)
    proc = cli("package", "--offline", "-q", src, "-o", tmp_path / "p.zip", "--kuiper-pool-wheel",
               kuiper_pool_wheel, env={"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
                                       "PIP_FIND_LINKS": wheels})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = install_like_ekuiper(str(tmp_path / "p.zip"), name, str(tmp_path / "ekuiper"))
    other = tmp_path / "python3.99"
    other.write_text("#!/bin/sh\necho 3.99\n")
    other.chmod(0o755)
    version = "%d.%d" % sys.version_info[:2]
    result = install_sh(got["plugin_dir"], str(other))
    assert result.returncode == 1
    assert result.stdout == (f"kuiper-pool: the wheels in wheels/ are for Python {version}, but {other} is "
                             f"3.99: package the plugin again with --python-version 3.99, or install "
                             f"with a Python {version}\n")


def _installed(site, files: dict):
    """A distribution installed into ``site`` as pip leaves it: the files, a dist-info with a
    RECORD of their hashes, a console script outside site-packages and bytecode."""
    import importlib.metadata
    import pathlib

    info = "kuiper_pool-0.2.0.dist-info"
    files = {**files, f"{info}/METADATA": b"Metadata-Version: 2.1\nName: kuiper-pool\nVersion: 0.2.0\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/entry_points.txt": b"[console_scripts]\nkuiper-pool = kuiper_pool.tools.cli:main\n",
             f"{info}/INSTALLER": b"pip\n", "kuiper_pool/__pycache__/__init__.cpython-311.pyc": b"\0"}
    rows = []
    for name, data in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    rows += [f"{info}/RECORD,,", "../../../bin/kuiper-pool,sha256=x,1"]
    (site / info / "RECORD").write_text("\n".join(rows) + "\n")
    return importlib.metadata.PathDistribution(pathlib.Path(site / info))


def test_wheel_rebuilt_from_an_installed_copy_is_a_true_wheel(tmp_path):
    from kuiper_pool.tools.wheels import rebuild_installed

    dist = _installed(tmp_path / "site", {"kuiper_pool/__init__.py": b"x = 1\n", "kuiper_pool/a.py": b""})
    (tmp_path / "out").mkdir()
    files = wheel_files(rebuild_installed(dist, str(tmp_path / "out")))
    assert sorted(files) == ["kuiper_pool-0.2.0.dist-info/METADATA", "kuiper_pool-0.2.0.dist-info/RECORD",
                             "kuiper_pool-0.2.0.dist-info/WHEEL", "kuiper_pool-0.2.0.dist-info/entry_points.txt",
                             "kuiper_pool/__init__.py", "kuiper_pool/a.py"]
    assert list(files)[-1].endswith("/RECORD")  # last, as wheel builders write it
    assert_record_true(files)
    assert os.listdir(tmp_path / "out") == ["kuiper_pool-0.2.0-py3-none-any.whl"]


@pytest.mark.parametrize("damage, message", [
    (lambda site: os.unlink(site / "kuiper_pool" / "a.py"),
     "the installed kuiper-pool lacks kuiper_pool/a.py (listed in its RECORD: No such file or directory); "
     "reinstall it"),
    (lambda site: (site / "kuiper_pool" / "a.py").write_text("changed = True\n"),
     "the installed kuiper-pool's kuiper_pool/a.py changed since it was installed (its hash differs from "
     "RECORD); reinstall it"),
])
def test_a_damaged_installed_copy_gives_no_wheel(tmp_path, damage, message):
    from kuiper_pool.tools.wheels import WheelError, rebuild_installed

    dist = _installed(tmp_path / "site", {"kuiper_pool/__init__.py": b"x = 1\n", "kuiper_pool/a.py": b""})
    damage(tmp_path / "site")
    with pytest.raises(WheelError) as e:
        rebuild_installed(dist, str(tmp_path))
    assert str(e.value) == message


def test_a_wheel_missing_a_module_of_the_running_package_is_refused(tmp_path, kuiper_pool_wheel):
    """What once shipped: a wheel without kuiper_pool/runtime/routes (now kinds/). Whatever made it, it is refused."""
    from kuiper_pool.tools.wheels import WheelError, check_modules

    cut = str(tmp_path / os.path.basename(kuiper_pool_wheel))
    with zipfile.ZipFile(kuiper_pool_wheel) as src, zipfile.ZipFile(cut, "w") as dst:
        for name in src.namelist():
            if not name.startswith("kuiper_pool/runtime/kinds/"):
                dst.writestr(name, src.read(name))
    with pytest.raises(WheelError) as e:
        check_modules(cut)
    assert str(e.value).startswith(f"{os.path.basename(cut)} lacks kuiper_pool/runtime/kinds/__init__.py, "), e.value
    assert str(e.value).endswith(" (a stale build/ folder, or an incomplete install?)")
    check_modules(kuiper_pool_wheel)
