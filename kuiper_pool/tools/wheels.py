"""The wheels a plugin zip carries: kuiper-pool's own, and (``--offline``) every requirement's.

kuiper-pool is on no package index, so ``kuiper-pool package`` takes its wheel from the
installation that runs it (:func:`kuiper_pool_wheel`):

* a wheel the user names (``--kuiper-pool-wheel``);
* an installed wheel (``pip install kuiper_pool-*.whl``): rebuilt from the installed
  distribution, as listed in its ``*.dist-info/RECORD`` (package files, ``METADATA``,
  ``WHEEL``, ``entry_points.txt``; not the console scripts, which the installer makes from
  ``entry_points.txt``, nor ``.pyc``, ``INSTALLER``, ``REQUESTED``, ``direct_url.json``), each
  file checked against its recorded hash, with a fresh ``RECORD``;
* an editable install or a source checkout: ``pip wheel --no-deps <source dir>``.

Either way the wheel's ``kuiper_pool/`` modules must be those of the running package: a wheel
that lacks one (or holds one the source does not) is refused, naming it.

:func:`download` runs ``pip download --only-binary=:all:`` for a target Python version and
platforms (:class:`Target`) into the zip's wheel folder.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import kuiper_pool

DIST = "kuiper-pool"
# dist-info files the installer writes (or RECORD, which a wheel gets afresh)
INSTALLER_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD", "RECORD.jws", "RECORD.p7s"}


class WheelError(Exception):
    """Why no wheel could be had; one line."""


def canonical(name: str) -> str:
    """A distribution name as wheel file names spell it (``kuiper-pool`` -> ``kuiper_pool``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _package_dir() -> str:
    return os.path.dirname(os.path.realpath(kuiper_pool.__file__))


def _modules_of_package() -> Set[str]:
    """``kuiper_pool/...py`` of the running package."""
    base = os.path.dirname(_package_dir())
    found = set()
    for top, dirs, names in os.walk(_package_dir()):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(os.path.relpath(os.path.join(top, n), base).replace(os.sep, "/")
                     for n in names if n.endswith(".py"))
    return found


def check_modules(path: str) -> None:
    """The wheel at ``path`` must hold exactly the running package's modules."""
    with zipfile.ZipFile(path) as zf:
        inside = {n for n in zf.namelist() if n.startswith("kuiper_pool/") and n.endswith(".py")}
    missing, extra = sorted(_modules_of_package() - inside), sorted(inside - _modules_of_package())
    if missing or extra:
        what = "; ".join(filter(None, [missing and "lacks " + ", ".join(missing[:5]),
                                       extra and "has " + ", ".join(extra[:5]) + " which the running "
                                                                                  "kuiper_pool lacks"]))
        raise WheelError(f"{os.path.basename(path)} {what} (a stale build/ folder, or an incomplete install?)")


def _wheel_tag(wheel_text: str) -> str:
    """The file-name tag from a WHEEL file's ``Tag:`` lines (``py3-none-any``)."""
    tags = [ln.split(":", 1)[1].strip() for ln in wheel_text.splitlines() if ln.startswith("Tag:")]
    if not tags:
        raise WheelError("the installed kuiper-pool's WHEEL file names no Tag; reinstall it")
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def rebuild_installed(dist: importlib.metadata.Distribution, dest: str) -> str:
    """A wheel of the installed ``dist``, from its RECORD; returns its path."""
    record = dist.read_text("RECORD")
    if record is None:
        raise WheelError("the installed kuiper-pool has no RECORD (not installed by pip?)")
    files: Dict[str, bytes] = {}
    for row in csv.reader(io.StringIO(record)):
        if not row:
            continue
        name, recorded = row[0], row[1] if len(row) > 1 else ""
        parts = name.split("/")
        if (name.startswith("/") or ".." in parts or "__pycache__" in parts or name.endswith(".pyc")
                or (parts[0].endswith(".dist-info") and parts[-1] in INSTALLER_FILES)):
            continue
        try:
            with open(dist.locate_file(name), "rb") as f:
                data = f.read()
        except OSError as e:
            raise WheelError(f"the installed kuiper-pool lacks {name} (listed in its RECORD: "
                             f"{e.strerror or e}); reinstall it") from None
        if recorded and recorded != _hash(data):
            raise WheelError(f"the installed kuiper-pool's {name} changed since it was installed "
                             f"(its hash differs from RECORD); reinstall it")
        files[name] = data
    info = f"{canonical(dist.metadata['Name'])}-{dist.version}.dist-info"
    if f"{info}/WHEEL" not in files or f"{info}/METADATA" not in files:
        raise WheelError(f"the installed kuiper-pool lacks {info}/WHEEL or METADATA; reinstall it")
    path = os.path.join(dest, f"{canonical(DIST)}-{dist.version}-{_wheel_tag(files[f'{info}/WHEEL'].decode())}.whl")
    rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        # package files first, the dist-info after them, RECORD last (as wheel builders order it)
        for name in sorted(files, key=lambda n: (n.startswith(info + "/"), n)):
            _add(zf, name, files[name])
            rows.append([name, _hash(files[name]), str(len(files[name]))])
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows + [[f"{info}/RECORD", "", ""]])
        _add(zf, f"{info}/RECORD", out.getvalue().encode())
    return path


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A regular file, mode 0644, with a fixed date (the same files make the same wheel)."""
    entry = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
    entry.external_attr = 0o100644 << 16
    entry.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(entry, data)


def build_from_source(source: str, dest: str, python: str = sys.executable) -> str:
    """``pip wheel --no-deps <source>`` into ``dest``; returns the wheel's path."""
    proc = subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                           "-q", "-w", dest, source], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True)
    built = [n for n in os.listdir(dest) if n.startswith(canonical(DIST) + "-") and n.endswith(".whl")]
    if proc.returncode != 0 or len(built) != 1:
        raise WheelError(f"pip wheel {source} failed (exit {proc.returncode}): {last_error(proc.stdout)}")
    return os.path.join(dest, built[0])


def last_error(output: str) -> str:
    """pip's first ERROR line, else its last line, for a one-line message."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[0][:400]


def _source_dir(dist: Optional[importlib.metadata.Distribution]) -> Optional[str]:
    """The source folder of an editable install, or the checkout the running package lives in."""
    if dist is not None:
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            url = {}
        if url.get("dir_info", {}).get("editable") and url.get("url", "").startswith("file://"):
            return url["url"][len("file://"):]
    parent = os.path.dirname(_package_dir())
    return parent if os.path.isfile(os.path.join(parent, "pyproject.toml")) else None


def _installed_here(dist: importlib.metadata.Distribution) -> bool:
    """Whether the running kuiper_pool is the one ``dist`` installed (not a checkout on PYTHONPATH)."""
    init = dist.locate_file("kuiper_pool/__init__.py")
    return os.path.exists(init) and os.path.samefile(init, kuiper_pool.__file__)


def kuiper_pool_wheel(dest: str, explicit: Optional[str] = None) -> Tuple[str, str]:
    """The kuiper-pool wheel for a zip, written into ``dest``: (its path, where it came from);
    raises :class:`WheelError` when there is none to be had."""
    if explicit:
        name = os.path.basename(explicit)
        if not (name.startswith(canonical(DIST) + "-") and name.endswith(".whl")):
            raise WheelError(f"--kuiper-pool-wheel {explicit}: not a kuiper-pool wheel "
                             f"(kuiper_pool-<version>-<tag>.whl)")
        if not zipfile.is_zipfile(explicit):
            raise WheelError(f"--kuiper-pool-wheel {explicit}: not a readable wheel")
        return shutil.copy(explicit, os.path.join(dest, name)), "given"
    try:
        dist: Optional[importlib.metadata.Distribution] = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    source = _source_dir(dist)
    if dist is not None and source is None and _installed_here(dist):
        path, how = rebuild_installed(dist, dest), "rebuilt from the installed copy"
    elif source is not None:
        with tempfile.TemporaryDirectory(prefix="kuiper-pool-wheel-") as tmp:
            path, how = shutil.move(build_from_source(source, tmp), dest), f"built from {source}"
    else:
        raise WheelError("the running kuiper_pool is neither an installed distribution nor a "
                         "source checkout; pass --kuiper-pool-wheel PATH")
    if not os.path.basename(path).startswith(f"{canonical(DIST)}-{kuiper_pool.__version__}-"):
        raise WheelError(f"{os.path.basename(path)} is not version {kuiper_pool.__version__}, "
                         f"which is running")
    check_modules(path)
    return path, how


@dataclass
class Target:
    """Where an offline zip installs: a Python version ("3.11") and pip platform tags
    (empty: this machine's)."""

    python_version: str = field(default_factory=lambda: "%d.%d" % sys.version_info[:2])
    platforms: List[str] = field(default_factory=list)

    def describe(self) -> str:
        where = ", ".join(self.platforms) or f"{sysconfig.get_platform()} (this machine's platform)"
        return f"Python {self.python_version} on {where}"


def download(requirements: List[str], target: Target, dest: str, python: str = sys.executable) -> None:
    """``pip download --only-binary=:all:`` of ``requirements`` (pip arguments: wheel paths,
    ``-r file``) and everything they need, for ``target``, into ``dest``."""
    cmd = [python, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", target.python_version, "-d", dest]
    for platform in target.platforms:
        cmd += ["--platform", platform]
    proc = subprocess.run(cmd + requirements, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True)
    if proc.returncode != 0:
        raise WheelError(f"pip download for {target.describe()} failed (exit {proc.returncode}): "
                         f"{last_error(proc.stdout)}")
