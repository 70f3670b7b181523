"""What is tested is what users install: the suite runs against kuiper-pool installed from its
wheel into site-packages (``bash .ci/test-installed`` does so), never against a checkout that
happens to be on ``sys.path`` or an editable install.

For a quick edit-and-test loop on an editable install, ``TEST_KUIPER_POOL_CHECKOUT=1`` turns
this check into a skip (one line says so); CI never sets it.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig

import pytest

import kuiper_pool
from conftest import kuiper_pool_cli as cli

FROM_CHECKOUT = os.environ.get("TEST_KUIPER_POOL_CHECKOUT") == "1"


def _site_packages() -> set:
    paths = sysconfig.get_paths()
    return {os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])}


@pytest.mark.skipif(FROM_CHECKOUT, reason="TEST_KUIPER_POOL_CHECKOUT=1: testing a checkout, not the installed wheel")
def test_kuiper_pool_is_imported_from_this_interpreters_site_packages():
    package_dir = os.path.realpath(os.path.dirname(kuiper_pool.__file__))
    assert os.path.dirname(package_dir) in _site_packages(), (
        f"kuiper_pool was imported from {package_dir}, not from site-packages "
        f"({', '.join(sorted(_site_packages()))}): run the suite with `bash .ci/test-installed`")
    direct_url = importlib.metadata.distribution("kuiper-pool").read_text("direct_url.json")
    assert not (direct_url and json.loads(direct_url).get("dir_info", {}).get("editable")), \
        "kuiper-pool is an editable install: the suite must test the installed wheel"


def test_one_version_everywhere():
    """``kuiper-pool --version``, the installed distribution's metadata and the package agree."""
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["kuiper-pool", kuiper_pool.__version__]
    assert importlib.metadata.version("kuiper-pool") == kuiper_pool.__version__


@pytest.mark.skipif(FROM_CHECKOUT, reason="TEST_KUIPER_POOL_CHECKOUT=1: testing a checkout, not the installed wheel")
def test_the_installed_interpreter_runs_the_installed_package(tmp_path):
    """``kuiper-pool-python`` runs a plugin script (its folder first on sys.path, as eKuiper's
    ``python -u <script>`` does) with kuiper_pool from site-packages, even from a folder that
    holds a ``kuiper_pool`` of its own elsewhere on the way."""
    script = tmp_path / "where.py"
    script.write_text("import ekuiper, kuiper_pool\nprint(kuiper_pool.__file__)\n")
    exe = os.path.join(os.path.dirname(sys.executable), "kuiper-pool-python")
    got = subprocess.run([exe, "-u", str(script)], cwd=str(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert os.path.dirname(os.path.dirname(os.path.realpath(got.stdout.strip()))) in _site_packages()
