"""What a plugin imports against what its ``requirements.txt`` installs.

:func:`unlisted_imports` names the modules the plugin's code imports that are neither
standard library, nor in the plugin folder, nor provided by a listed requirement (or by
kuiper-pool, which every zip installs): a zip built without them installs, then fails at
import on the edge node. Imports inside ``try`` blocks that catch ``ImportError`` are
optional and not counted. Import names are mapped to distributions with this machine's
installed metadata (``importlib.metadata``) and a few well-known names (``sklearn`` is
``scikit-learn``), so the warning can say what to add.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from typing import Dict, Iterable, List, Set

KUIPER_POOL = "kuiper-pool"
# import name -> distribution, for names that differ and may not be installed here
KNOWN = {"sklearn": "scikit-learn", "cv2": "opencv-python", "PIL": "Pillow", "yaml": "PyYAML",
         "skimage": "scikit-image", "bs4": "beautifulsoup4", "dateutil": "python-dateutil",
         "serial": "pyserial", "usb": "pyusb", "paho": "paho-mqtt", "zmq": "pyzmq",
         "Crypto": "pycryptodome", "jwt": "PyJWT", "google": "protobuf", "attr": "attrs"}
# always importable under eKuiper: kuiper-pool-python provides ekuiper
PROVIDED = {"kuiper_pool", "ekuiper"}
# sys.stdlib_module_names arrived in 3.10; on 3.9 the top-level modules Python 3.9 ships
STDLIB_39 = set("""__future__ _thread abc aifc argparse array ast asynchat asyncio asyncore atexit
audioop base64 bdb binascii binhex bisect builtins bz2 cProfile calendar cgi cgitb chunk cmath cmd
code codecs codeop collections colorsys compileall concurrent configparser contextlib contextvars
copy copyreg crypt csv ctypes curses dataclasses datetime dbm decimal difflib dis distutils doctest
email encodings ensurepip enum errno faulthandler fcntl filecmp fileinput fnmatch formatter
fractions ftplib functools gc getopt getpass gettext glob graphlib grp gzip hashlib heapq hmac html
http idlelib imaplib imghdr imp importlib inspect io ipaddress itertools json keyword lib2to3
linecache locale logging lzma mailbox mailcap marshal math mimetypes mmap modulefinder msilib
msvcrt multiprocessing netrc nis nntplib numbers operator optparse os ossaudiodev parser pathlib pdb
pickle pickletools pipes pkgutil platform plistlib poplib posix posixpath pprint profile pstats pty
pwd py_compile pyclbr pydoc queue quopri random re readline reprlib resource rlcompleter runpy
sched secrets select selectors shelve shlex shutil signal site smtpd smtplib sndhdr socket
socketserver spwd sqlite3 sre_compile sre_constants sre_parse ssl stat statistics string
stringprep struct subprocess sunau symbol symtable sys sysconfig syslog tabnanny tarfile telnetlib
tempfile termios textwrap threading time timeit tkinter token tokenize trace traceback tracemalloc
tty turtle turtledemo types typing unicodedata unittest urllib uu uuid venv warnings wave weakref
webbrowser winreg winsound wsgiref xdrlib xml xmlrpc zipapp zipfile zipimport zlib zoneinfo""".split())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def stdlib_modules() -> Set[str]:
    return set(getattr(sys, "stdlib_module_names", STDLIB_39))


def requirement_names(path: str) -> Set[str]:
    """The normalized project names ``requirements.txt`` lists (options and URLs without a
    ``#egg=``/``name @`` are skipped)."""
    names = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return names
    for line in lines:
        line = line.split(" #")[0].strip()
        egg = re.search(r"#egg=([A-Za-z0-9._-]+)", line)
        token = line.split(";")[0].split()[0] if line else ""
        if egg:
            names.add(normalize(egg.group(1)))
        elif token.endswith((".whl", ".tar.gz", ".zip")):  # a wheel or sdist by path or URL
            names.add(normalize(token.rsplit("/", 1)[-1].split("-")[0]))
        elif line and not line.startswith(("#", "-")):
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
            if match and "://" not in line.split("@")[0] and "/" not in match.group(0):
                names.add(normalize(match.group(0)))
    return names


def _distributions_of_imports() -> Dict[str, List[str]]:
    """Import name -> distributions that provide it, from this machine's installed metadata."""
    try:
        return dict(importlib.metadata.packages_distributions())  # type: ignore[attr-defined]
    except AttributeError:  # Python 3.9: top_level.txt only
        found: Dict[str, List[str]] = {}
        for dist in importlib.metadata.distributions():
            for top in (dist.read_text("top_level.txt") or "").split():
                found.setdefault(top, []).append(dist.metadata["Name"])
        return found


def _requires(names: Iterable[str]) -> Set[str]:
    """``names`` and what they need, transitively, as far as this machine's metadata tells."""
    seen: Set[str] = set()
    todo = list(names)
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [m.group(0) for r in needs if "extra ==" not in r
                 for m in [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r)] if m]
    return seen


def _optional(tree: ast.AST) -> Set[int]:
    """ids of the import nodes inside ``try`` bodies whose handlers catch ImportError."""
    ids: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                          "Exception", "BaseException")
                                      for n in ast.walk(h.type)) for h in node.handlers):
            ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def imported_modules(files: Iterable[str]) -> Set[str]:
    """Top-level names of the absolute imports in ``files`` (unparsable files are skipped)."""
    found: Set[str] = set()
    for path in files:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
        except (OSError, SyntaxError, ValueError, RecursionError):
            continue
        optional = _optional(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def unlisted_imports(py_files: List[str], local: Set[str], requirements: Set[str]) -> List[str]:
    """The modules ``py_files`` import that nothing provides, each as ``name`` or
    ``name (distribution)``; ``local``: module names the plugin folder holds."""
    provided = _requires(requirements | {KUIPER_POOL})
    by_import = _distributions_of_imports()
    missing = []
    for module in sorted(imported_modules(py_files) - stdlib_modules() - local - PROVIDED):
        dists = by_import.get(module) or [KNOWN.get(module, module)]
        if not any(normalize(d) in provided for d in dists):
            missing.append(module if normalize(dists[0]) == normalize(module) else f"{module} ({dists[0]})")
    return missing
