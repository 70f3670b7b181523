"""``kuiper-pool validate <plugin-dir>``: would eKuiper install this plugin folder, and would it run?

Two kinds of checks, printed one line each as they are made (``ok``, ``note`` or ``problem``):

* **Folder checks** (:func:`inspect_folder`, no code runs): what eKuiper's installer
  (``internal/plugin/portable/manager.go``, ``model.go``) and its metadata readers require
  of the plugin json, the executable, ``sources/<symbol>.yaml`` and the ``sources/``,
  ``sinks/``, ``functions/`` metadata, plus the settings file ``kuiper_pool.yaml`` next to
  the executable. ``kuiper-pool package`` (:mod:`kuiper_pool.tools.packaging`) runs exactly these,
  then the runtime checks, and refuses to build a zip while any of them is a problem. How
  kuiper-pool itself gets installed (:func:`check_install`) is validate's alone: ``package``
  makes its zip carry kuiper-pool and says so itself.
* **Runtime checks** (:func:`runtime_checks`): the interpreter (``--python``, like eKuiper's
  ``portable.pythonBin``) runs and is Python 3.9 or later; then the executable is run the
  way eKuiper runs it (``<python> -u <executable> '{"sendTimeout":1000}'`` in the
  executable's folder) with the environment variable ``KUIPERPOOL_DESCRIBE=1``
  (:data:`kuiper_pool.describe.DESCRIBE_ENV`; not ``KUIPER_POOL_*``, which the settings
  loader reserves for settings). With it, ``kuiper_pool.plugin.start`` calls
  :func:`describe` instead of serving: it builds every symbol with its factory, checks the
  object's methods, loads the settings, prints one marked JSON line and exits. Nothing
  connects to eKuiper, no socket is made, and no bytecode is written into the folder.
  The JSON's symbol lists are then compared with the PluginConfig's.

Plugins written for the official SDK (``from ekuiper import plugin``) are recognised from
the executable's imports. Under ``kuiper-pool-python`` (:mod:`kuiper_pool.interpreter`, which the
interpreter probe recognises) they run on kuiper_pool and are checked like any other; under
another interpreter they are not run: one note says how to switch; the folder checks apply.
"""
from __future__ import annotations

import ast
import json
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from ..config import FILE_NAME, ConfigError, load_settings
from ..describe import DESCRIBE_ENV, DESCRIBE_MARK, KINDS, METHODS
from .requirements import KUIPER_POOL, requirement_names

OK, NOTE, PROBLEM = "ok", "note", "problem"
SINGULAR = {"sources": "source", "sinks": "sink", "functions": "function"}
JSON_KEYS = ("name", "version", "language", "executable", "sources", "sinks", "functions",
             "virtualEnvType", "env")  # eKuiper's PluginInfo; it ignores anything else
MIN_PYTHON = (3, 9)


# --- findings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    level: str  # OK, NOTE or PROBLEM
    subject: str
    text: str

    def line(self) -> str:
        return f"{self.level:<8} {self.subject}: {self.text}"


class Checks:
    """Collects findings; ``echo`` (e.g. ``print``) shows each one as it is made."""

    def __init__(self, echo: Optional[Callable[[str], None]] = None) -> None:
        self.findings: List[Finding] = []
        self.echo = echo

    def add(self, level: str, subject: str, text: str) -> None:
        finding = Finding(level, subject, text)
        self.findings.append(finding)
        if self.echo is not None:
            self.echo(finding.line())

    @property
    def problems(self) -> List[Finding]:
        return [f for f in self.findings if f.level == PROBLEM]


# --- the folder: plugin json, executable, metadata -------------------------------------------------

@dataclass
class PluginFolder:
    """What the folder checks learned; ``name`` is "" when no usable plugin json was found."""

    path: str
    name: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)
    executable: str = ""  # as written in the json, "" unless it names a file in the folder
    symbols: Dict[str, List[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    sdk: str = ""  # "kuiper_pool", "ekuiper" or "" (unknown), from the executable's imports

    @property
    def json_file(self) -> str:
        return self.name + ".json"

    @property
    def executable_path(self) -> str:
        return os.path.join(self.path, *self.executable.split("/")) if self.executable else ""


def _go_field(obj: Dict[str, Any], key: str) -> Any:
    """A json field as Go's encoding/json finds it: exact key, else any case-insensitive match."""
    if key in obj:
        return obj[key]
    return next((v for k, v in obj.items() if k.lower() == key.lower()), None)


def _bad_name(name: str) -> bool:
    """Names that become file names and ipc paths (same rule as PluginConfig.adopt)."""
    return not name or any(c.isspace() or c in "/\\\0" for c in name)


def _read_json(path: str) -> Tuple[Any, str]:
    """(value, "") or (None, one-line reason)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), ""
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 text ({e.reason})"
    except ValueError as e:
        return None, f"is not valid JSON: {e}"
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"


def find_plugin_json(path: str, checks: Checks) -> Tuple[str, Optional[Dict[str, Any]]]:
    """The plugin json: ``<folder name>.json`` if it exists, else the single root ``*.json`` that
    declares an ``executable`` (as ``kuiper-pool try`` finds it). Returns (name, parsed json)."""
    own = os.path.basename(os.path.normpath(path)) + ".json"
    entries = sorted(e for e in os.listdir(path) if e.endswith(".json")
                     and os.path.isfile(os.path.join(path, e)))
    candidates, unreadable = [], []
    for entry in ([own] if own in entries else entries):
        value, why = _read_json(os.path.join(path, entry))
        if why:
            unreadable.append(f"{entry} {why}")
        elif isinstance(value, dict) and (entry == own or _go_field(value, "executable") is not None):
            candidates.append((entry[:-len(".json")], value))
        elif entry == own:
            unreadable.append(f"{entry} must be a JSON object (got {type(value).__name__})")
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        checks.add(PROBLEM, "plugin json", "several plugin jsons (" + ", ".join(
            n + ".json" for n, _ in candidates) + "); eKuiper installs the one named like the plugin")
    elif unreadable:
        for why in unreadable:
            checks.add(PROBLEM, "plugin json", why)
    else:
        checks.add(PROBLEM, "plugin json", f"no plugin json (<name>.json with language, executable "
                                           f"and symbol lists) in {path}")
    return "", None


def _check_json_fields(folder: PluginFolder, meta: Dict[str, Any], checks: Checks) -> None:
    """eKuiper's PluginInfo: Go unmarshal types, then PluginInfo.Validate, then what kuiper_pool needs."""
    jf = folder.json_file
    bad = []
    for key in ("name", "version", "language", "executable", "virtualEnvType", "env"):
        value = _go_field(meta, key)
        if value is not None and not isinstance(value, str):
            bad.append(f"{key} must be a string (got {json.dumps(value)})")
    for kind in KINDS:
        value = _go_field(meta, kind)
        if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            bad.append(f"{kind} must be a list of symbol names (got {json.dumps(value)})")
        elif value:
            folder.symbols[kind] = list(value)
    for why in bad:  # eKuiper's json.Unmarshal fails on the first of these
        checks.add(PROBLEM, jf, why)
    name = _go_field(meta, "name")
    if isinstance(name, str) and name != folder.name:
        checks.add(PROBLEM, jf, f"name is {name!r} but the file is {jf}: eKuiper installs the plugin "
                                f"as {folder.name!r} and refuses the mismatch (drop the name key)")
    if _bad_name(folder.name):
        checks.add(PROBLEM, jf, f"the plugin name {folder.name!r} (the json file's name) must not "
                                f"be empty or contain spaces, '/' or '\\'")
    language = _go_field(meta, "language")
    if not language:
        checks.add(PROBLEM, jf, "missing language (must be \"python\")")
    elif isinstance(language, str) and language != "python":
        checks.add(PROBLEM, jf, f"language is {language!r}; a kuiper_pool plugin is \"python\"")
    if not _go_field(meta, "executable"):
        checks.add(PROBLEM, jf, "missing executable (the main script, relative to the plugin folder)")
    venv = _go_field(meta, "virtualEnvType")
    if venv is not None and venv != "conda":
        checks.add(PROBLEM, jf, f"virtualEnvType {venv!r} is not supported (only \"conda\")")
    elif venv == "conda" and not _go_field(meta, "env"):
        checks.add(PROBLEM, jf, "virtualEnvType conda needs env (the conda environment's name)")
    total = sum(len(v) for v in folder.symbols.values())
    if not bad and total == 0:
        checks.add(PROBLEM, jf, "declares no source, sink or function (eKuiper needs at least one)")
    for kind in KINDS:
        names = folder.symbols[kind]
        for s in names:
            if _bad_name(s):
                checks.add(PROBLEM, jf, f"{kind} entry {s!r} is not a usable symbol name (empty, "
                                        f"spaces, '/' or '\\')")
        dups = sorted({s for s in names if names.count(s) > 1})
        if dups:
            checks.add(NOTE, jf, f"{kind} lists {', '.join(dups)} more than once")
    unknown = sorted(k for k in meta if k.lower() not in {j.lower() for j in JSON_KEYS})
    if unknown:
        checks.add(NOTE, jf, f"eKuiper ignores the key(s) {', '.join(unknown)}")
    if not any(f.subject == jf and f.level == PROBLEM for f in checks.findings):
        checks.add(OK, jf, f"language python, {total} symbol(s): " + "; ".join(
            f"{kind} {', '.join(folder.symbols[kind])}" for kind in KINDS if folder.symbols[kind]))


def _check_executable(folder: PluginFolder, meta: Dict[str, Any], checks: Checks) -> None:
    exe = _go_field(meta, "executable")
    if not isinstance(exe, str) or not exe:
        return  # already reported
    clean = posixpath.normpath(exe)
    if exe.startswith("/") or clean == ".." or clean.startswith("../"):
        checks.add(PROBLEM, "executable", f"{exe!r} is outside the plugin folder (it must be a path "
                                          f"inside it, such as \"main.py\")")
    elif clean != exe:
        checks.add(PROBLEM, "executable", f"write {exe!r} as {clean!r}: eKuiper looks the path up in "
                                          f"the zip literally and would fail with 'missing {exe}'")
    elif clean.split("/")[0] in KINDS:
        checks.add(PROBLEM, "executable", f"{exe!r} is under {clean.split('/')[0]}/, which eKuiper "
                                          f"copies into its etc folder, not the plugin folder")
    elif not os.path.isfile(os.path.join(folder.path, *exe.split("/"))):
        checks.add(PROBLEM, "executable", f"missing executable {exe} (named in {folder.json_file})")
    else:
        folder.executable = exe
        folder.sdk = sdk_of(folder.executable_path)
        checks.add(OK, "executable", f"{exe} exists")


def metadata_kept(relpath: str) -> bool:
    """Whether a file under sources/, sinks/ or functions/ is metadata eKuiper takes (and
    ``kuiper-pool package`` puts in the zip): source and sink .yaml/.json, function .json,
    directly in the folder."""
    parts = relpath.split("/")
    if len(parts) != 2 or parts[0] not in KINDS:
        return False
    return parts[1].endswith(".json") or (parts[0] != "functions" and parts[1].endswith(".yaml"))


def _check_metadata(folder: PluginFolder, checks: Checks) -> None:
    for s in folder.symbols["sources"]:
        if not os.path.isfile(os.path.join(folder.path, "sources", s + ".yaml")):
            checks.add(PROBLEM, f"sources/{s}.yaml", f"missing: eKuiper refuses to install a plugin "
                                                     f"without the default properties of source {s}")
    good = []
    for kind in KINDS:
        base = os.path.join(folder.path, kind)
        if not os.path.isdir(base):
            continue
        for entry in sorted(os.listdir(base)):
            rel, path = f"{kind}/{entry}", os.path.join(base, entry)
            if not metadata_kept(rel) or not os.path.isfile(path):
                checks.add(NOTE, rel, "not metadata eKuiper reads; kuiper-pool package leaves it out")
                continue
            symbol = entry.rsplit(".", 1)[0]
            if symbol not in folder.symbols[kind]:
                checks.add(NOTE, rel, f"describes no {SINGULAR[kind]} of {folder.name or 'the plugin'}; "
                                      f"eKuiper would still copy it into its etc/{kind}")
            why = _metadata_problem(kind, path)
            if why:
                checks.add(PROBLEM, rel, why)
            else:
                good.append(rel)
    for kind in KINDS:
        for s in folder.symbols[kind]:
            if not os.path.isfile(os.path.join(folder.path, kind, s + ".json")):
                checks.add(NOTE, f"{kind}/{s}.json", "missing: the eKuiper UI has no description "
                                                     f"of {SINGULAR[kind]} {s}")
    if good:
        checks.add(OK, "metadata", f"{len(good)} file(s) parse: {', '.join(good)}")


def _metadata_problem(kind: str, path: str) -> str:
    """Why eKuiper could not use this metadata file ("" if it can)."""
    if path.endswith(".yaml"):
        try:
            with open(path, encoding="utf-8") as f:
                value = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            return "is not valid YAML: " + " ".join(str(e).split())
        if value is not None and not isinstance(value, dict):
            return f"must map configuration keys to properties (got a {type(value).__name__})"
        return ""
    value, why = _read_json(path)
    if why:
        return why
    if not isinstance(value, dict):
        return f"must be a JSON object (got {type(value).__name__})"
    if kind != "functions" and not isinstance(value.get("about"), dict):
        return "has no \"about\" object; eKuiper does not load it (not found about)"
    return ""


def _check_settings_file(folder: PluginFolder, checks: Checks) -> None:
    """kuiper_pool.yaml next to the executable (file only: the run checks env and code too)."""
    script_dir = os.path.dirname(folder.executable_path)
    if os.path.isfile(os.path.join(script_dir, FILE_NAME)):
        rel = posixpath.join(posixpath.dirname(folder.executable), FILE_NAME)
        try:
            load_settings(script_dir, environ={})
            checks.add(OK, rel, "loads")
        except ConfigError as e:
            checks.add(PROBLEM, rel, str(e))


def lists_kuiper_pool(folder: PluginFolder) -> bool:
    return KUIPER_POOL in requirement_names(os.path.join(folder.path, "requirements.txt"))


def check_install(folder: PluginFolder, checks: Checks) -> None:
    """How kuiper-pool itself gets installed, when the folder is installed as it is
    (``kuiper-pool package`` makes its zip carry kuiper-pool and says so itself)."""
    if folder.sdk == "ekuiper" or not folder.executable:
        return
    if not os.path.isfile(os.path.join(folder.path, "requirements.txt")):
        checks.add(NOTE, "requirements.txt", "missing: eKuiper's python must already have kuiper-pool "
                                             "installed (kuiper-pool package makes the zip install it)")
        return
    if not lists_kuiper_pool(folder):
        checks.add(NOTE, "requirements.txt", "does not list kuiper-pool, which the plugin imports "
                                             "(kuiper-pool package makes the zip install it)")
    install = os.path.join(folder.path, "install.sh")
    if os.path.isfile(install):
        with open(install, encoding="utf-8", errors="replace") as f:
            if "requirements" not in f.read():
                checks.add(NOTE, "install.sh", "does not mention requirements.txt; eKuiper runs only "
                                               "install.sh, so its packages would not be installed")


def inspect_folder(path: str, checks: Checks) -> PluginFolder:
    """The folder checks shared by ``validate`` and ``package``; problems go to ``checks``."""
    folder = PluginFolder(os.path.abspath(path))
    folder.name, meta = find_plugin_json(folder.path, checks)
    if meta is None:
        return folder
    folder.meta = meta
    _check_json_fields(folder, meta, checks)
    _check_executable(folder, meta, checks)
    _check_metadata(folder, checks)
    if folder.executable:
        _check_settings_file(folder, checks)
    return folder


def sdk_of(script: str) -> str:
    """Whose ``plugin.start`` the script imports: "kuiper_pool", "ekuiper" or "" (unknown)."""
    try:
        with open(script, "rb") as f:
            tree = ast.parse(f.read(), script)
    except (OSError, SyntaxError, ValueError):
        return ""
    runners = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if node.module.endswith(".plugin") or names & {"plugin", "start", "*"}:
                runners.add(root)
        elif isinstance(node, ast.Import):
            runners.update(a.name.split(".")[0] for a in node.names)
    runners &= {"kuiper_pool", "ekuiper"}
    return runners.pop() if len(runners) == 1 else ""


# --- runtime checks (in the validate process) ---------------------------------------------------------

def _last_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[:300]


# Run as a script file, the way eKuiper runs a plugin: kuiper-pool-python aliases ekuiper only then.
_PROBE = """import sys
print('%d.%d.%d' % sys.version_info[:3])
try:
    import ekuiper
    print(ekuiper.__name__)
except ImportError:
    print('')
"""


def _where_installed(python: str) -> str:
    """For a bare command name not on PATH that this kuiper-pool installed next to its own
    interpreter (``kuiper-pool-python``): where it is and how to name it."""
    sibling = os.path.join(os.path.dirname(sys.executable), python)
    if os.sep in python or shutil.which(python) or not os.access(sibling, os.X_OK):
        return ""
    return (f" (not on PATH; it is installed at {sibling}: pass --python {sibling}, "
            f"and name that path as eKuiper's portable.pythonBin)")


def _python_version(python: str, checks: Checks, official: bool) -> Optional[bool]:
    """None when the interpreter is unusable; else whether ``import ekuiper`` is kuiper_pool
    under it (``kuiper-pool-python``)."""
    with tempfile.TemporaryDirectory(prefix="kuiper-pool-probe-") as tmp:
        script = os.path.join(tmp, "probe.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(_PROBE)
        try:
            proc = subprocess.run([python, "-u", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                  timeout=30, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        except OSError as e:
            checks.add(PROBLEM, "python", f"cannot run {python}: {e.strerror or e}{_where_installed(python)}")
            return None
        except subprocess.TimeoutExpired:
            checks.add(PROBLEM, "python", f"{python} did not answer within 30 s")
            return None
    lines = proc.stdout.splitlines()
    version = lines[0].strip() if lines else ""
    if proc.returncode != 0 or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        checks.add(PROBLEM, "python", f"{python} failed (exit {proc.returncode}): {_last_line(proc.stdout)}")
        return None
    aliased = lines[1:2] == ["kuiper_pool"]
    if tuple(int(p) for p in version.split(".")[:2]) < MIN_PYTHON and not (official and not aliased):
        checks.add(PROBLEM, "python", f"{python} is Python {version}; kuiper_pool needs "
                                      f"{'.'.join(map(str, MIN_PYTHON))} or later")
        return None
    checks.add(OK, "python", f"{python} is Python {version}"
                             + (" and runs ekuiper imports on kuiper_pool" if aliased else ""))
    return aliased


def _describe_run(folder: PluginFolder, python: str, timeout: float, checks: Checks,
                  say: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    from ..wire import PORTABLE_CONF

    exe = folder.executable
    say(f"...      running {python} -u {exe} as eKuiper would, with {DESCRIBE_ENV}=1 (up to {timeout:g} s)")
    env = dict(os.environ, **{DESCRIBE_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1"})
    started = time.monotonic()
    proc = subprocess.Popen([python, "-u", folder.executable_path, PORTABLE_CONF],
                            cwd=os.path.dirname(folder.executable_path), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:  # whatever the plugin code started in its session goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if timed_out:
        out, _ = proc.communicate()
    text = out.decode("utf-8", "replace")
    marked = [ln[len(DESCRIBE_MARK):] for ln in text.splitlines() if ln.startswith(DESCRIBE_MARK)]
    if marked:
        checks.add(OK, "main", f"{exe} runs and reaches kuiper_pool's plugin.start "
                               f"({time.monotonic() - started:.1f} s)")
        return json.loads(marked[-1])
    if timed_out:
        checks.add(PROBLEM, "main", f"{exe} did not reach kuiper_pool's plugin.start within "
                                    f"{timeout:g} s (stopped it); last output: {_last_line(text)}")
    elif proc.returncode != 0:
        hint = ("; install requirements.txt (with kuiper-pool) for that python"
                if "No module named 'kuiper_pool'" in text else "")
        checks.add(PROBLEM, "main", f"{exe} fails under {python} (exit {proc.returncode}): "
                                    f"{_last_line(text)}{hint}")
    else:
        checks.add(PROBLEM, "main", f"{exe} exits without calling kuiper_pool's plugin.start "
                                    f"(is the call under if __name__ == \"__main__\"?)")
    return None


def _compare_symbols(folder: PluginFolder, report: Dict[str, Any], checks: Checks) -> None:
    got: Dict[str, Dict[str, Any]] = report["symbols"]
    jf = folder.json_file
    for kind in KINDS:
        one = SINGULAR[kind]
        for symbol in folder.symbols[kind]:
            subject = f"{one} {symbol}"
            entry = got[kind].get(symbol)
            if entry is None:
                elsewhere = [k for k in KINDS if symbol in got[k] and symbol not in folder.symbols[k]]
                if elsewhere:
                    checks.add(PROBLEM, subject, f"wrong type: {jf} lists it under {kind} but "
                                                 f"PluginConfig has it under {elsewhere[0]}")
                else:
                    checks.add(PROBLEM, subject, f"missing: {jf} lists it under {kind} but "
                                                 f"PluginConfig.{kind} has no {symbol!r}")
                continue
            needs = ", ".join(METHODS[kind])
            if entry["error"]:
                checks.add(PROBLEM, subject, entry["error"])
            elif entry["missing"]:
                checks.add(PROBLEM, subject, f"{entry['class']} has no {', '.join(entry['missing'])} "
                                             f"(a {one} needs {needs})")
            elif entry["abstract"]:
                checks.add(PROBLEM, subject, f"{entry['class']} does not implement "
                                             f"{', '.join(entry['abstract'])} (a {one} needs {needs})")
            elif entry["signature"]:
                checks.add(PROBLEM, subject, f"{entry['class']}: {'; '.join(entry['signature'])}")
            else:
                checks.add(OK, subject, f"the factory builds {entry['class']} ({needs})")
        for symbol in got[kind]:
            listed_elsewhere = [k for k in KINDS if k != kind and symbol in folder.symbols[k]
                                and symbol not in got[k]]
            if symbol not in folder.symbols[kind] and not listed_elsewhere:
                checks.add(PROBLEM, f"{one} {symbol}", f"extra: PluginConfig.{kind} has it but {jf} "
                                                       f"does not list it, so eKuiper never starts it")


def runtime_checks(folder: PluginFolder, python: str, timeout: float, checks: Checks,
                   say: Callable[[str], None]) -> None:
    """Interpreter, then the describe run and what it reports (needs a found executable)."""
    official = folder.sdk == "ekuiper"
    aliased = _python_version(python, checks, official)
    if aliased is None:
        return
    if official and not aliased:
        checks.add(NOTE, "sdk", f"{folder.executable} runs under the official SDK (ekuiper), one "
                                f"thread per symbol; to switch, import from kuiper_pool instead, or without "
                                f"an edit name kuiper-pool-python as eKuiper's portable.pythonBin "
                                f"(and here as --python)")
        return
    report = _describe_run(folder, python, timeout, checks, say)
    if report is None:
        return
    if report["config_error"]:
        checks.add(PROBLEM, "PluginConfig", report["config_error"])
        return
    if report["name"] != folder.name:
        checks.add(PROBLEM, "PluginConfig", f"name {report['name']!r} differs from {folder.json_file}: "
                                            f"eKuiper listens on plugin_{folder.name}.ipc, the plugin "
                                            f"would dial plugin_{report['name']}.ipc")
    else:
        checks.add(OK, "PluginConfig", f"name {folder.name!r} matches {folder.json_file}")
    if report["settings_error"]:
        if not any(f.level == PROBLEM and f.text == report["settings_error"] for f in checks.findings):
            checks.add(PROBLEM, "settings", report["settings_error"])
    else:
        checks.add(OK, "settings", f"load (start_method {report['start_method']})")
    _compare_symbols(folder, report, checks)


def validate(plugin_dir: str, python: str = sys.executable, timeout: float = 60.0,
             say: Callable[[str], None] = print) -> int:
    """Run every check, printing each line as it is made; 0 when eKuiper would install and run it."""
    def echo(line: str) -> None:
        say(line)
        sys.stdout.flush()

    checks = Checks(echo)
    folder = inspect_folder(plugin_dir, checks)
    check_install(folder, checks)
    if folder.executable:
        runtime_checks(folder, python, timeout, checks, echo)
    label = folder.name or os.path.basename(os.path.abspath(plugin_dir))
    problems = len(checks.problems)
    if problems:
        echo(f"{label}: {problems} problem(s); eKuiper would refuse or fail to run it")
        return 1
    echo(f"{label}: ok, eKuiper would install and run it")
    return 0
