"""``kuiper-pool package`` and ``kuiper-pool validate``, run as real commands.

The zips are installed by :func:`install_like_ekuiper`, a small re-enactment of eKuiper's
installer (``internal/plugin/portable/manager.go`` ``Manager.install`` and ``doRegister``,
``model.go`` ``PluginInfo.Validate``, ``internal/pkg/filex`` ``UnzipTo``): the checks a zip
must pass there must pass here. Broken plugins are generated into tmp_path with names
unique to the test; ``validate`` never connects to eKuiper, so nothing listens anywhere.
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from typing import Dict, List

import pytest

import kuiper_pool
from conftest import ipc_files, kuiper_pool_cli as cli, kuiper_pool_command, wait_until
from plugins import COUNTING_SOURCE, MODE_FUNCTION, RECORDING_SINK, REPO, is_dead, make_plugin, unique_pysam

EXAMPLES = os.path.join(REPO, "examples")
PYSAM = os.path.join(EXAMPLES, "pysam")


def lines_of(text: str, level: str = "") -> List[str]:
    """Non-empty lines; with ``level`` only the check lines of that level (ok, note, problem)."""
    return [ln for ln in text.splitlines() if ln.strip() and (not level or ln.split(" ", 1)[0] == level)]


def tree(path: str) -> Dict[str, bytes]:
    """Every file below ``path`` (relative posix name -> bytes)."""
    files = {}
    for top, _dirs, names in os.walk(path):
        for n in names:
            full = os.path.join(top, n)
            with open(full, "rb") as f:
                files[os.path.relpath(full, path).replace(os.sep, "/")] = f.read()
    return files


def pysam_copy(tmp_path, plugin: str = "pysam", folder: str = "pysam") -> str:
    """examples/pysam copied to tmp_path/<folder>, to be packaged; with another ``plugin`` name
    the json file, the PluginConfig name and the rule id are renamed. A copy that runs needs
    every socket name unique, its function's too: plugins.unique_pysam."""
    dst = str(tmp_path / folder)
    shutil.copytree(PYSAM, dst, ignore=shutil.ignore_patterns("__pycache__"))
    if plugin != "pysam":
        os.rename(os.path.join(dst, "pysam.json"), os.path.join(dst, plugin + ".json"))
        edit(os.path.join(dst, "pysam.py"), 'PluginConfig("pysam"', f'PluginConfig("{plugin}"')
        edit(os.path.join(dst, "rule.json"), '"id": "pysamdemo"', f'"id": "r{plugin}"')
    return dst


def edit(path: str, old: str, new: str) -> None:
    with open(path) as f:
        text = f.read()
    assert old in text, f"{old!r} not in {path}"
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def update_json(path: str, **changes) -> None:
    with open(path) as f:
        value = json.load(f)
    value.update(changes)
    with open(path, "w") as f:
        json.dump(value, f)


# --- eKuiper's installer, re-enacted --------------------------------------------------------------

class InstallError(Exception):
    """What eKuiper's install API would answer."""


def _validate_plugin_info(pi: dict, expected: str) -> None:
    """model.go PluginInfo.Validate."""
    if pi.get("name") != expected:
        raise InstallError(f"invalid plugin, expect name '{expected}' but got '{pi.get('name')}'")
    if not pi.get("language"):
        raise InstallError("invalid plugin, missing language")
    if not pi.get("executable"):
        raise InstallError("invalid plugin, missing executable")
    if sum(len(pi.get(k) or []) for k in ("sources", "sinks", "functions")) == 0:
        raise InstallError("invalid plugin, must define at lease one source, sink or function")
    if pi["language"] not in ("go", "python"):
        raise InstallError(f"invalid plugin, language '{pi['language']}' is not supported")


def _unzip_to(zf: zipfile.ZipFile, info: zipfile.ZipInfo, folder: str, name: str) -> str:
    """filex.UnzipTo: inside an os.Root of ``folder``, a NON-recursive mkdir of the parent, the
    file created with the zip entry's mode."""
    os.makedirs(folder, exist_ok=True)
    if name.startswith("/") or ".." in name.split("/"):
        raise InstallError(f"path escapes from parent: {name}")
    target = os.path.join(folder, *name.split("/"))
    if info.is_dir():
        try:
            os.mkdir(target)
        except FileExistsError:
            pass
        return target
    parent = posixpath.dirname(name)
    if parent not in ("", "."):
        try:
            os.mkdir(os.path.join(folder, *parent.split("/")))
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise InstallError(f"mkdir {parent}: no such file or directory") from None
    mode = (info.external_attr >> 16) & 0o777 if info.create_system == 3 else 0o666
    if not mode & 0o400:  # eKuiper does not run as root: it could not read the file
        raise InstallError(f"{name} would be installed with mode {oct(mode)}")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(zf.read(info))
    return target


def install_like_ekuiper(zip_path: str, name: str, root: str) -> dict:
    """Manager.install + doRegister for plugin ``name``: returns the folders and PluginInfo."""
    json_name = name + ".json"
    plugin_dir = os.path.join(root, "plugins", "portable", name)
    etc, data = os.path.join(root, "etc"), os.path.join(root, "data")
    installed: Dict[str, str] = {}
    need_install = False
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        pi = None
        for info in infos:
            if info.filename == json_name:  # exactly the name, at the root
                pi = {"name": name, **json.loads(zf.read(info))}
                break
        if pi is None:
            raise InstallError(f"missing or invalid json file {json_name}, found {len(infos)} files in total")
        _validate_plugin_info(pi, name)
        required = [json_name, pi["executable"]] + [f"sources/{s}.yaml" for s in pi.get("sources") or []]
        os.makedirs(plugin_dir)
        for info in infos:
            file_name = posixpath.normpath(info.filename)  # filepath.ToSlash(filepath.Clean(...))
            if file_name.startswith(("sources/", "sinks/", "functions/")):
                _unzip_to(zf, info, etc, file_name)
                target = _unzip_to(zf, info, data, file_name)
            else:
                target = _unzip_to(zf, info, plugin_dir, file_name)
                need_install = need_install or file_name == "install.sh"
            if not info.is_dir():
                installed[file_name] = target
    for rf in required:
        if rf not in installed:
            raise InstallError(f"missing {rf}")
    exe = os.path.normpath(os.path.join(plugin_dir, pi["executable"]))
    if not os.path.exists(exe):
        raise InstallError(f"cannot find executable `{exe}` when loading portable plugins")
    return {"plugin_dir": plugin_dir, "etc": etc, "data": data, "info": pi,
            "installed": installed, "install_sh": need_install}


def run_install_sh(plugin_dir: str) -> subprocess.CompletedProcess:
    """eKuiper: ``/bin/sh <plugin>/install.sh <shellParas...>`` in the plugin folder; our
    interpreter as the parameter, pip kept off the network."""
    return subprocess.run(["/bin/sh", os.path.join(plugin_dir, "install.sh"), sys.executable],
                          cwd=plugin_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120, env={**os.environ, "PIP_NO_INDEX": "1",
                                            "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _pip_knows_kuiper_pool() -> bool:
    try:
        importlib.metadata.version("kuiper-pool")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_installed_kuiper_pool = pytest.mark.skipif(
    not _pip_knows_kuiper_pool(), reason="kuiper-pool is not pip-installed for this interpreter")


# --- package ------------------------------------------------------------------------------------------

def test_package_pysam_builds_a_zip_ekuipers_installer_accepts(tmp_path):
    """The default package: the kuiper-pool wheel made from this installation (kuiper-pool is
    on no index) travels in wheels/, and install.sh installs it with requirements.txt."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = cli("package", PYSAM, cwd=out_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    zip_path = out_dir / "pysam.zip"  # default: <name>.zip in the current folder
    assert str(zip_path) in proc.stdout.splitlines()[-1]
    assert "add pysam.py" in proc.stdout and "add install.sh" in proc.stdout
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")], names
    wheel = f"wheels/kuiper_pool-{kuiper_pool.__version__}-py3-none-any.whl"
    assert names[-2:] == ["wheels/", wheel], names
    got = install_like_ekuiper(str(zip_path), "pysam", str(tmp_path / "ekuiper"))
    assert got["info"]["executable"] == "pysam.py" and got["install_sh"]
    # every file of the example is installed where eKuiper puts it, byte for byte
    example = {k: v for k, v in tree(PYSAM).items() if "__pycache__" not in k}
    plugin_files = tree(got["plugin_dir"])
    for rel, content in example.items():
        if rel.split("/")[0] in ("sources", "sinks", "functions"):
            assert tree(got["etc"])[rel] == content == tree(got["data"])[rel], rel
        else:
            assert plugin_files[rel] == content, rel
    assert set(plugin_files) - set(example) == {"install.sh", wheel}
    with zipfile.ZipFile(os.path.join(got["plugin_dir"], wheel)) as whl:
        modules = {n for n in whl.namelist() if n.endswith(".py")}
    source = {os.path.relpath(p, REPO).replace(os.sep, "/")
              for p in glob.glob(os.path.join(REPO, "kuiper_pool", "**", "*.py"), recursive=True)}
    assert modules == source  # every module, nothing else (the wheel lacked one, once)
    with open(os.path.join(got["plugin_dir"], "install.sh")) as f:
        script = f.read()
    assert f'"$PY" -m pip install {wheel} -r requirements.txt\n' in script, script
    assert f"#   kuiper-pool ({wheel}) and requirements.txt." in script, script


def test_generated_install_sh_fails_the_install_when_pip_fails(tmp_path, unique, kuiper_pool_wheel):
    src = pysam_copy(tmp_path)
    write(os.path.join(src, "requirements.txt"), f"kuiper-pool\nno-such-package-{unique}\n")
    assert cli("package", src, "-o", tmp_path / "p.zip", "--kuiper-pool-wheel", kuiper_pool_wheel).returncode == 0
    got = install_like_ekuiper(str(tmp_path / "p.zip"), "pysam", str(tmp_path / "ekuiper"))
    result = run_install_sh(got["plugin_dir"])
    assert result.returncode != 0, result.stdout  # eKuiper then removes what it unzipped
    assert f"no-such-package-{unique}" in result.stdout


def test_packaged_plugin_with_nested_packages_installs_and_runs(tmp_path, unique):
    """Nested packages need their folder entries (eKuiper's unzip makes one folder level at a
    time); caches, version control and virtual environments stay out; the installed plugin runs."""
    src = str(tmp_path / "pysam")
    renamed = unique_pysam(src, unique)
    name = renamed["pysam"]
    write(os.path.join(src, "helpers", "__init__.py"), "")
    write(os.path.join(src, "helpers", "text", "__init__.py"), "")
    write(os.path.join(src, "helpers", "text", "rev.py"), "def rev(s):\n    return s[::-1]\n")
    edit(os.path.join(src, "revert.py"), "return value[::-1]",
         "from helpers.text.rev import rev\n        return rev(value)")
    write(os.path.join(src, "helpers", "__pycache__", "rev.cpython-311.pyc"), "junk")
    write(os.path.join(src, ".git", "HEAD"), "ref: refs/heads/main\n")
    write(os.path.join(src, "venv", "pyvenv.cfg"), "home = /usr/bin\n")
    write(os.path.join(src, "venv", "lib", "site.py"), "")
    write(os.path.join(src, "stray.pyc"), "junk")
    proc = cli("package", src, "-o", tmp_path / "plugin.zip", "--no-kuiper-pool")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skip venv/ (virtual environment" in proc.stdout, proc.stdout
    with zipfile.ZipFile(tmp_path / "plugin.zip") as zf:
        names = zf.namelist()
    assert {"helpers/", "helpers/text/", "helpers/text/rev.py"} <= set(names), names
    assert not [n for n in names if n.startswith((".git", "venv")) or n.endswith(".pyc")], names
    got = install_like_ekuiper(str(tmp_path / "plugin.zip"), name, str(tmp_path / "ekuiper"))
    run = cli("try", got["plugin_dir"], timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    revert = renamed["revert"]
    assert f'#1 {revert}("pyjson") -> "nosjyp"' in run.stdout and f'#5 {revert}("sink") -> "knis"' in run.stdout
    wait_until(lambda: not ipc_files(unique), timeout=5, message="the rule's ipc files removed")


def test_package_keeps_a_user_install_sh_and_generates_none_without_requirements(tmp_path, kuiper_pool_wheel):
    own = pysam_copy(tmp_path, plugin="own", folder="own")
    script = "#!/bin/sh\nset -e\npython3 -m pip install --user -r requirements.txt\necho mine\n"
    write(os.path.join(own, "install.sh"), script)
    proc = cli("package", own, "-o", tmp_path / "own.zip", "--kuiper-pool-wheel", kuiper_pool_wheel)
    assert proc.returncode == 0, proc.stderr
    wheel = "wheels/" + os.path.basename(kuiper_pool_wheel)
    assert f"note     install.sh: the folder's own is kept; it must install {wheel} (or pass " \
           f"--no-kuiper-pool)" in proc.stdout.splitlines(), proc.stdout
    with zipfile.ZipFile(tmp_path / "own.zip") as zf:
        assert zf.read("install.sh").decode() == script
        assert zf.namelist().count("install.sh") == 1
    bare = pysam_copy(tmp_path, plugin="bare", folder="bare")
    os.unlink(os.path.join(bare, "requirements.txt"))
    proc = cli("package", bare, "-o", tmp_path / "bare.zip", "--no-kuiper-pool")
    assert proc.returncode == 0, proc.stderr
    assert "note     requirements.txt: does not list kuiper-pool, and --no-kuiper-pool: eKuiper's Python " \
           "must already have it" in proc.stdout.splitlines(), proc.stdout
    with zipfile.ZipFile(tmp_path / "bare.zip") as zf:
        assert "install.sh" not in zf.namelist()
    # carrying kuiper-pool, the bare plugin gets an install.sh that installs just that
    proc = cli("package", bare, "-o", tmp_path / "bare.zip", "--kuiper-pool-wheel", kuiper_pool_wheel)
    assert proc.returncode == 0, proc.stderr
    assert f"  kuiper-pool: {wheel} (given, which requirements.txt does not list: install.sh installs " \
           f"it)" in proc.stdout.splitlines(), proc.stdout
    with zipfile.ZipFile(tmp_path / "bare.zip") as zf:
        assert zf.read("install.sh").decode().endswith(f'"$PY" -m pip install {wheel}\n')


def test_package_does_not_pack_its_own_output_or_an_earlier_zip(tmp_path):
    src = pysam_copy(tmp_path)
    first = cli("package", src, "--no-kuiper-pool", cwd=src)  # default output: inside the folder
    assert first.returncode == 0, first.stderr
    second = cli("package", src, "--no-kuiper-pool", cwd=src)
    assert second.returncode == 0, second.stderr
    with zipfile.ZipFile(os.path.join(src, "pysam.zip")) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".zip")], zf.namelist()
    assert not [n for n in os.listdir(src) if n.startswith(".kuiper-pool")]  # no temporary left


def _json(path: str) -> str:
    return os.path.join(path, "pysam.json")


REFUSALS = {
    "no plugin json": (lambda d: os.unlink(_json(d)), "no plugin json"),
    "invalid json": (lambda d: write(_json(d), '{"language": "python",'), "pysam.json is not valid JSON"),
    "name differs": (lambda d: update_json(_json(d), name="other"), "name is 'other' but the file is pysam.json"),
    "missing executable": (lambda d: os.unlink(os.path.join(d, "pysam.py")), "missing executable pysam.py"),
    "language go": (lambda d: update_json(_json(d), language="go"), "language is 'go'"),
    "no language": (lambda d: update_json(_json(d), language=""), "missing language"),
    "no symbols": (lambda d: update_json(_json(d), sources=[], sinks=[], functions=[]),
                   "declares no source, sink or function"),
    "missing source yaml": (lambda d: os.unlink(os.path.join(d, "sources", "pyjson.yaml")),
                            "sources/pyjson.yaml: missing"),
    "bad metadata json": (lambda d: write(os.path.join(d, "sinks", "print.json"), "{\"about\": "),
                          "sinks/print.json: is not valid JSON"),
    "bad function metadata": (lambda d: write(os.path.join(d, "functions", "revert.json"), "[1, 2"),
                              "functions/revert.json: is not valid JSON"),
    "executable escapes": (lambda d: update_json(_json(d), executable="../pysam.py"),
                           "'../pysam.py' is outside the plugin folder"),
    "executable not clean": (lambda d: update_json(_json(d), executable="./pysam.py"),
                             "write './pysam.py' as 'pysam.py'"),
    "symbols not a list": (lambda d: update_json(_json(d), sinks="print"), "sinks must be a list"),
    "bad settings file": (lambda d: write(os.path.join(d, "kuiper_pool.yaml"), "heartbeat_intervall: 1\n"),
                          "unknown setting heartbeat_intervall"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_package_refuses_what_ekuiper_would_reject_in_one_line(tmp_path, case):
    src = pysam_copy(tmp_path)
    breakage, message = REFUSALS[case]
    breakage(src)
    out = tmp_path / "out.zip"
    proc = cli("package", src, "-o", out)
    problems = lines_of(proc.stderr, "problem")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(problems) == 1 and message in problems[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["pysam"]  # nothing written, no temporary


def test_package_lists_every_problem(tmp_path):
    src = pysam_copy(tmp_path)
    for case in ("language go", "missing source yaml", "bad metadata json", "bad settings file"):
        REFUSALS[case][0](src)
    proc = cli("package", src, "-o", tmp_path / "out.zip")
    problems = lines_of(proc.stderr, "problem")
    assert proc.returncode == 1
    for case in ("language go", "missing source yaml", "bad metadata json", "bad settings file"):
        assert [p for p in problems if REFUSALS[case][1] in p], (case, proc.stderr)
    assert len(problems) == 4, proc.stderr


def test_package_and_validate_report_the_same_folder_problems(tmp_path):
    """One set of folder checks: what package refuses on, validate reports word for word."""
    src = pysam_copy(tmp_path)
    for case in ("missing source yaml", "bad metadata json", "executable not clean"):
        REFUSALS[case][0](src)
    package = cli("package", src, "-o", tmp_path / "out.zip")
    validate = cli("validate", src)
    assert package.returncode == validate.returncode == 1
    assert lines_of(package.stderr, "problem") == lines_of(validate.stdout, "problem")


@pytest.mark.parametrize("args, message", [
    (["package", "{tmp}/nowhere"], "is not a folder"),
    (["package", "{pysam}", "-o", "{tmp}/plugin.tar"], "ends in .zip"),
    (["package"], "the following arguments are required"),
    (["package", "{pysam}", "--platform", "manylinux_2_28_aarch64"], "add --offline"),
    (["package", "{pysam}", "--offline", "--python-version", "3"], "give a Python 3 version as 3.11"),
    (["package", "{pysam}", "--kuiper-pool-wheel", "{tmp}/k.whl"], "{tmp}/k.whl: no such file"),
    (["package", "{pysam}", "--kuiper-pool-wheel", "{pysam}/pysam.py", "--no-kuiper-pool"], "exclude each other"),
    (["package", "{pysam}", "--timeout", "-1"], "--timeout must be a positive number"),
    (["validate", "{tmp}/nowhere"], "is not a folder"),
    (["validate", "{pysam}", "--timeout", "0"], "--timeout"),
    (["validate", "{pysam}", "--timeout", "soon"], "invalid float value"),
    (["serve", "{tmp}/nowhere"], "is not a folder"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    proc = cli(*[a.format(tmp=tmp_path, pysam=PYSAM) for a in args])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr and "usage: kuiper-pool" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [[], ["try"], ["status"], ["package"], ["validate"], ["serve"]])
def test_every_command_has_help(command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: kuiper-pool " + " ".join(command)), proc.stdout
    if not command:
        for sub in ("try", "status", "package", "validate", "serve"):
            assert re.search(rf"^\s+{sub}\s+\S", proc.stdout, re.M), proc.stdout


def test_package_refuses_a_symlink_that_leaves_the_folder(tmp_path):
    """A link to a private file elsewhere would be packed, readable by all: refused in one line
    each. A link to a file inside the folder is stored as that file."""
    src = pysam_copy(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("key\n")
    secret.chmod(0o600)
    os.symlink(secret, os.path.join(src, "secret.txt"))
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", os.path.join(src, "data"))
    os.symlink("rule.json", os.path.join(src, "rule-copy.json"))
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines_of(proc.stderr, "problem") == [
        f"problem  data/: symbolic link to {tmp_path / 'elsewhere'}, outside the plugin folder: not "
        "packaged (copy what it names into the folder, or remove it)",
        f"problem  secret.txt: symbolic link to {secret}, outside the plugin folder: not packaged (copy "
        "what it names into the folder, or remove it)"], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.zip").exists()
    for link in ("secret.txt", "data"):
        os.unlink(os.path.join(src, link))
    assert cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool").returncode == 0
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert zf.read("rule-copy.json") == zf.read("rule.json")


@pytest.mark.parametrize("case", ["raises at import", "unknown symbol in kuiper_pool.yaml"])
def test_package_runs_validates_checks_first(tmp_path, case):
    """What would fail after install fails the package, with validate's own words."""
    src = pysam_copy(tmp_path)
    if case == "raises at import":
        edit(os.path.join(src, "revert.py"), "class", "raise RuntimeError('no model file')\n\n\nclass")
    else:
        write(os.path.join(src, "kuiper_pool.yaml"), "symbols:\n  revrt: {call_deadline: 2}\n")
    package = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool")
    validate = cli("validate", src)
    assert package.returncode == validate.returncode == 1, package.stdout + package.stderr
    problems = lines_of(package.stderr, "problem")
    assert problems == lines_of(validate.stdout, "problem") and len(problems) == 1, package.stderr
    assert problems[0] == ("problem  main: pysam.py fails under " + sys.executable + " (exit 1): "
                           "RuntimeError: no model file" if case == "raises at import" else
                           f"problem  settings: kuiper_pool config: symbols.revrt names no symbol of the plugin "
                           f"(from {src}/kuiper_pool.yaml; it has print, pyjson, revert); did you mean "
                           f"revert?"), problems
    assert "Traceback" not in package.stderr and not (tmp_path / "out.zip").exists()


def test_package_without_running_says_how_to_check(tmp_path):
    """A plugin whose requirements are not installed here: package names --no-run, which builds it."""
    src = pysam_copy(tmp_path)
    edit(os.path.join(src, "revert.py"), "class", "import kpnosuchlib\n\n\nclass")
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool", "-q")
    assert proc.returncode == 1
    assert f"note     main: install its requirements for {sys.executable} (or name one that has them with " \
           f"--python), or package it without running it here: --no-run" in proc.stdout.splitlines(), proc.stdout
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool", "--no-run")
    assert proc.returncode == 0, proc.stderr
    assert f"note     main: not run (--no-run): kuiper-pool validate {src} --python <eKuiper's pythonBin> " \
           f"checks it" in proc.stdout.splitlines(), proc.stdout


def test_package_warns_of_imports_nothing_installs(tmp_path):
    src = pysam_copy(tmp_path)
    write(os.path.join(src, "helpers", "__init__.py"), "")
    write(os.path.join(src, "model.py"), "import os, json\nimport numpy as np\nfrom sklearn.linear_model "
                                         "import Ridge\nfrom helpers import x\nimport revert\nimport ekuiper\n"
                                         "import yaml\ntry:\n    import orjson\nexcept ImportError:\n"
                                         "    orjson = None\nfrom . import sibling\n")
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool", "-q")
    assert proc.returncode == 0, proc.stderr
    # stdlib, the folder's own modules, optional imports and kuiper-pool's own dependencies
    # (yaml) are fine; numpy and scikit-learn are named, with the distribution to add
    assert lines_of(proc.stderr) == [
        "warning  imports: numpy, sklearn (scikit-learn): neither standard library, nor in the plugin "
        "folder, nor in requirements.txt: the installed plugin fails to import them unless eKuiper's "
        "Python has them (add to requirements.txt)"], proc.stderr
    write(os.path.join(src, "requirements.txt"), "kuiper-pool\nnumpy>=1.20  # arrays\nscikit_learn==1.5.0\n")
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool", "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_requirements_are_read_by_project_name(tmp_path):
    """Whether requirements.txt lists kuiper-pool (or numpy...) whatever the spelling pip accepts."""
    from kuiper_pool.tools.requirements import requirement_names

    write(str(tmp_path / "r.txt"), "# comment\nkuiper_pool[fast]>=0.2 ; python_version >= '3.9'\n"
                                   "Scikit.Learn==1.5  # ml\n./w/Numpy-2.0-cp311-cp311-linux_x86_64.whl\n"
                                   "https://example.org/Other_Pkg-1.0.tar.gz\nfoo @ https://example.org/f.whl\n"
                                   "-r other.txt\n--index-url https://example.org\n"
                                   "git+https://example.org/b.git#egg=bee\n")
    assert requirement_names(str(tmp_path / "r.txt")) == {
        "kuiper-pool", "scikit-learn", "numpy", "other-pkg", "foo", "bee"}


@pytest.mark.parametrize("listed", [True, False])
def test_generated_install_sh_says_truly_whether_it_installs_kuiper_pool(tmp_path, listed):
    src = pysam_copy(tmp_path)
    write(os.path.join(src, "requirements.txt"), "kuiper-pool\n" if listed else "six\n")
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        script = zf.read("install.sh").decode()
    said = [ln for ln in script.splitlines() if ln.startswith("#   ")]
    assert said == (["#   requirements.txt (kuiper-pool included)."] if listed else
                    ["#   requirements.txt (not kuiper-pool: the plugin's Python must already have it)."]), script
    assert script.endswith('"$PY" -m pip install -r requirements.txt\n')
    notes = [ln for ln in lines_of(cli("validate", src).stdout, "note") if "requirements.txt" in ln]
    assert notes == ([] if listed else ["note     requirements.txt: does not list kuiper-pool, which the plugin "
                                        "imports (kuiper-pool package makes the zip install it)"]), notes


@pytest.mark.parametrize("make, message", [
    (lambda d: write(os.path.join(d, "other-1.0-py3-none-any.whl"), "x"),
     "wheels: --kuiper-pool-wheel {path}: not a kuiper-pool wheel (kuiper_pool-<version>-<tag>.whl)"),
    (lambda d: write(os.path.join(d, "kuiper_pool-0.2.0-py3-none-any.whl"), "not a zip"),
     "wheels: --kuiper-pool-wheel {path}: not a readable wheel"),
])
def test_package_refuses_a_wheel_that_is_not_kuiper_pools(tmp_path, make, message):
    src = pysam_copy(tmp_path)
    make(str(tmp_path))
    path = next(str(p) for p in tmp_path.glob("*.whl"))
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--kuiper-pool-wheel", path)
    assert proc.returncode == 1
    assert lines_of(proc.stderr, "problem") == ["problem  " + message.format(path=path)], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.zip").exists()


def test_package_refuses_a_wheels_folder_of_its_own(tmp_path, kuiper_pool_wheel):
    src = pysam_copy(tmp_path)
    write(os.path.join(src, "wheels", "x.txt"), "")
    proc = cli("package", src, "-o", tmp_path / "out.zip", "--kuiper-pool-wheel", kuiper_pool_wheel)
    assert proc.returncode == 1
    assert lines_of(proc.stderr, "problem") == [
        "problem  wheels/: the folder has its own; the zip's wheels/ holds the wheels install.sh installs "
        "(rename yours, or pass --no-kuiper-pool)"], proc.stderr
    assert cli("package", src, "-o", tmp_path / "out.zip", "--no-kuiper-pool").returncode == 0


# --- validate -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("example, symbols", [
    ("pysam", ["source pyjson", "sink print", "function revert"]),
    ("cpuheavy", ["source ticker", "sink stats", "function burn", "function primes"]),
])
def test_validate_accepts_the_examples_and_leaves_them_untouched(example, symbols):
    folder = os.path.join(EXAMPLES, example)
    before = tree(folder)
    proc = cli("validate", folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = lines_of(proc.stdout)
    assert not lines_of(proc.stdout, "problem"), proc.stdout
    for subject in symbols + ["main", "PluginConfig", "settings", "python", f"{example}.json", "metadata"]:
        assert [ln for ln in lines_of(proc.stdout, "ok") if ln.split(None, 1)[1].startswith(subject + ":")], (
            subject, proc.stdout)
    assert out[-1] == f"{example}: ok, eKuiper would install and run it"
    assert tree(folder) == before  # no __pycache__, nothing written


def _plugin(tmp_path, unique, **kw) -> str:
    """A generated plugin: source s<u>, sink k<u>, function f<u> (override with kw)."""
    kw.setdefault("sources", {"s" + unique: COUNTING_SOURCE})
    kw.setdefault("sinks", {"k" + unique: RECORDING_SINK})
    kw.setdefault("functions", {"f" + unique: MODE_FUNCTION})
    return make_plugin(str(tmp_path), "kp" + unique, **kw)


NO_COLLECT = '''
class NoCollect:
    def configure(self, conf): pass
    def open(self, ctx): pass
    def close(self, ctx): pass
'''

ABSTRACT_COLLECT = '''
class AbstractCollect(Sink):
    def configure(self, conf): pass
    def open(self, ctx): pass
    def close(self, ctx): pass
'''

WRONG_EXEC = '''
class WrongExec(Function):
    def validate(self, args): return ""
    def exec(self, args): return 1
    def is_aggregate(self): return False
'''


def _json_of(d: str) -> str:
    return os.path.join(d, os.path.basename(d) + ".json")


BROKEN = {
    # case: (make_plugin arguments, change after generation, expected problem)
    "missing symbol": ({}, lambda d, u: update_json(_json_of(d), functions=["f" + u, "ghost" + u]),
                       "function ghost{u}: missing: kp{u}.json lists it under functions but "
                       "PluginConfig.functions has no 'ghost{u}'"),
    "extra symbol": ({}, lambda d, u: update_json(_json_of(d), functions=[]),
                     "function f{u}: extra: PluginConfig.functions has it but kp{u}.json does not list it"),
    "wrong type": ({}, lambda d, u: (update_json(_json_of(d), sinks=[], sources=["s" + u, "k" + u]),
                                     write(os.path.join(d, "sources", f"k{u}.yaml"), "default: {}\n")),
                   "source k{u}: wrong type: kp{u}.json lists it under sources but PluginConfig has it "
                   "under sinks"),
    "sink without collect": ({"sinks": {"k{u}": NO_COLLECT}}, None,
                             "sink k{u}: kp_symbols.NoCollect has no collect"),
    "abstract collect": ({"sinks": {"k{u}": ABSTRACT_COLLECT}}, None,
                         "sink k{u}: kp_symbols.AbstractCollect does not implement collect"),
    "exec signature": ({"functions": {"f{u}": WRONG_EXEC}}, None,
                       "function f{u}: kp_symbols.WrongExec: exec(args) cannot take 2 argument(s)"),
    "factory raises": ({"factories": {"s{u}": "lambda: 1 / 0"}}, None,
                       "source s{u}: the factory raised ZeroDivisionError"),
    "bad metadata json": ({}, lambda d, u: write(os.path.join(d, "sinks", f"k{u}.json"), '{"about": {'),
                          "sinks/k{u}.json: is not valid JSON"),
    "metadata without about": ({}, lambda d, u: write(os.path.join(d, "sources", f"s{u}.json"), "{}"),
                               "sources/s{u}.json: has no \"about\" object"),
    "bad settings key": ({"yaml_settings": {"heartbeat_intervall": 0.1}}, None,
                         "kuiper_pool.yaml: kuiper_pool config: unknown setting heartbeat_intervall"),
    "bad settings in code": ({"settings": {"call_deadline": -1}}, None,
                             "settings: kuiper_pool config: call_deadline must be a number >= 0.01"),
    "config name differs": ({}, lambda d, u: edit(os.path.join(d, "main.py"), f"PluginConfig('kp{u}'",
                                                  f"PluginConfig('other{u}'"),
                            "PluginConfig: name 'other{u}' differs from kp{u}.json"),
    "import fails": ({"main_code": "import no_such_module_{u}"}, None,
                     "main: main.py fails under {py} (exit 1): ModuleNotFoundError: "
                     "No module named 'no_such_module_{u}'"),
    "never starts": ({}, lambda d, u: edit(os.path.join(d, "main.py"), "    plugin.start(config)",
                                           "    pass"),
                     "main: main.py exits without calling kuiper_pool's plugin.start"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validate_names_the_problem_of_a_broken_plugin(tmp_path, unique, case):
    kw, change, expected = BROKEN[case]
    kw = json.loads(json.dumps(kw).replace("{u}", unique))
    d = _plugin(tmp_path, unique, **kw)
    if change:
        change(d, unique)
    proc = cli("validate", d, "--python", sys.executable)
    problems = lines_of(proc.stdout, "problem")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    want = "problem  " + expected.format(u=unique, py=sys.executable)
    assert [p for p in problems if p.startswith(want)], f"{want!r} not in:\n{proc.stdout}"
    assert len(problems) == 1, proc.stdout
    assert lines_of(proc.stdout)[-1] == f"kp{unique}: 1 problem(s); eKuiper would refuse or fail to run it"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("base, config_class", [("kuiper_pool", "kuiper_pool"), ("ekuiper", "kuiper_pool"),
                                                ("ekuiper", "ekuiper")])
def test_validate_of_a_good_generated_plugin_passes(tmp_path, unique, base, config_class):
    """The counterpart of the broken cases: the same generator without a fault validates, also
    with classes and PluginConfig from the official SDK under kuiper_pool's plugin.start."""
    proc = cli("validate", _plugin(tmp_path, unique, base=base, config_class=config_class))
    assert proc.returncode == 0, proc.stdout
    for subject in (f"source s{unique}", f"sink k{unique}", f"function f{unique}"):
        assert f"ok       {subject}: the factory builds kp_symbols." in proc.stdout, proc.stdout


def test_validate_reports_an_official_sdk_plugin_and_still_checks_its_metadata(tmp_path, unique):
    d = _plugin(tmp_path, unique, base="ekuiper", config_class="ekuiper", runner="ekuiper")
    proc = cli("validate", d)
    assert proc.returncode == 0, proc.stdout
    sdk = [ln for ln in lines_of(proc.stdout, "note") if ln.split(None, 1)[1].startswith("sdk:")]
    assert len(sdk) == 1 and "official SDK" in sdk[0] and "kuiper_pool" in sdk[0], proc.stdout
    assert "main:" not in proc.stdout  # not run: it would dial eKuiper
    write(os.path.join(d, "functions", f"f{unique}.json"), "{")
    proc = cli("validate", d)
    assert proc.returncode == 1
    assert lines_of(proc.stdout, "problem") == [f"problem  functions/f{unique}.json: is not valid JSON: "
                                                f"Expecting property name enclosed in double quotes: "
                                                f"line 1 column 2 (char 1)"]


def test_validate_prints_each_check_as_it_goes(tmp_path, unique):
    """The folder checks are on stdout while the executable is still loading."""
    gate = tmp_path / "gate"
    d = _plugin(tmp_path, unique, main_code=(
        f"import time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)"))
    proc = subprocess.Popen(kuiper_pool_command() + ["validate", d], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: List[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(ln.startswith("...      running") for ln in seen), timeout=30,
                   message="the progress line before the run")
        assert proc.poll() is None  # still waiting for the plugin to load
        assert [ln for ln in seen if ln.startswith(f"ok       kp{unique}.json:")], seen
        gate.write_text("go")
        assert proc.wait(timeout=60) == 0, "".join(seen)
    finally:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
    assert seen[-1].strip() == f"kp{unique}: ok, eKuiper would install and run it"


def test_validate_does_not_wait_for_threads_the_plugin_started(tmp_path, unique):
    """A module that starts a non-daemon thread on import still reports at once, and the
    process is gone afterwards."""
    pid_file = tmp_path / "pid"
    d = _plugin(tmp_path, unique, main_code=(
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\nimport threading\n"
        "threading.Thread(target=threading.Event().wait).start()"))
    proc = cli("validate", d, "--timeout", "30", timeout=20)
    assert proc.returncode == 0, proc.stdout
    assert is_dead(int(pid_file.read_text()))


def test_validate_stops_a_plugin_that_never_reaches_start(tmp_path, unique):
    pid_file = tmp_path / "pid"
    d = _plugin(tmp_path, unique, main_code=(
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\nimport threading\n"
        "threading.Event().wait()"))
    proc = cli("validate", d, "--timeout", "2")
    assert proc.returncode == 1, proc.stdout
    assert lines_of(proc.stdout, "problem")[0].startswith(
        "problem  main: main.py did not reach kuiper_pool's plugin.start within 2 s (stopped it)"), proc.stdout
    assert is_dead(int(pid_file.read_text()))


def test_validate_checks_the_interpreter(tmp_path, unique):
    d = _plugin(tmp_path, unique)
    proc = cli("validate", d, "--python", str(tmp_path / "no-python"))
    assert proc.returncode == 1
    assert lines_of(proc.stdout, "problem") == [
        f"problem  python: cannot run {tmp_path / 'no-python'}: No such file or directory"], proc.stdout
    # the README's --python kuiper-pool-python, with the venv's bin not on PATH: where it is
    installed = os.path.join(os.path.dirname(kuiper_pool_command()[0]), "kuiper-pool-python")
    assert os.access(installed, os.X_OK)
    proc = cli("validate", d, "--python", "kuiper-pool-python", env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert lines_of(proc.stdout, "problem") == [
        f"problem  python: cannot run kuiper-pool-python: No such file or directory (not on PATH; it is "
        f"installed at {installed}: pass --python {installed}, and name that path as eKuiper's "
        f"portable.pythonBin)"], proc.stdout
    old = next(iter(sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
                    + [p for p in ["/usr/bin/python3.8"] if os.path.exists(p)]), None)
    if old is None:
        pytest.skip("no Python 3.8 on this machine for the version check")
    proc = cli("validate", d, "--python", old)
    assert proc.returncode == 1
    problems = lines_of(proc.stdout, "problem")
    assert len(problems) == 1 and re.match(r"problem  python: .* is Python 3\.8\.\d+; kuiper_pool needs "
                                           r"3\.9 or later$", problems[0]), proc.stdout
