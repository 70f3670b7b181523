"""Where kuiper_pool keeps its own files, and how it removes only what it made.

* the private directory: ``<runtime_dir or tmp>/kuiper_pool-<uid>`` (mode 0700, ours),
  holding each supervisor's run directory and status socket;
* the status socket's name for a plugin;
* a file's identity (device, inode, ctime), so a cleanup removes a socket file only while it
  is still the one we created (``unlink_if_ours``): the zygote uses it after a killed
  supervisor, the SP listener when it closes.

eKuiper's own ipc paths are part of its protocol and live in ``wire.py``.

The supervisor imports this module before it forks the zygote: ``tempfile`` is not used
(it imports ``shutil`` and ``random``, and random's at-fork hook costs every forked worker a
private page), ``hashlib`` is imported where it is used.
"""
from __future__ import annotations

import os
import stat
from typing import Dict, List, Optional, Tuple

from . import logs

SOCKET_PATH_MAX = 100   # AF_UNIX paths hold 107 bytes; leave room

_fallback: Dict[str, str] = {}


def _private(path: str) -> bool:
    """A directory of ours that nobody else can enter (created 0700 if missing)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def system_tmp() -> str:
    """The system's directory for temporary files, as ``tempfile.gettempdir`` picks it first:
    ``$TMPDIR`` (or ``$TEMP``, ``$TMP``) if it is a directory we can write, else ``/tmp``."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        path = os.environ.get(var)
        if path and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
            return os.path.abspath(path)
    return "/tmp"


def fresh_dir(parent: str, prefix: str) -> str:
    """A new directory ``<parent>/<prefix><random>``, mode 0700, made by us (as ``mkdtemp``)."""
    while True:
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def private_base(runtime_dir: str = "") -> str:
    """``<runtime_dir or tmp>/kuiper_pool-<uid>``, mode 0700 and ours. If someone else made
    it first (or its mode is open), a fresh ``kuiper_pool-<uid>-*`` directory is used instead,
    with one warning: another local user must not be able to block or spy on plugins."""
    parent = runtime_dir or system_tmp()
    base = os.path.join(parent, f"kuiper_pool-{os.getuid()}")
    if _private(base):
        return base
    if parent not in _fallback:
        _fallback[parent] = fresh_dir(parent, f"kuiper_pool-{os.getuid()}-")
        logs.supervisor_logger().warning(
            "%s is not a private directory of uid %d (someone else's, or open to others); "
            "using %s", base, os.getuid(), _fallback[parent])
    return _fallback[parent]


def usual_base(runtime_dir: str = "") -> str:
    """The private directory as it is normally named (it may not exist)."""
    return os.path.join(runtime_dir or system_tmp(), f"kuiper_pool-{os.getuid()}")


def private_bases(runtime_dir: str = "") -> List[str]:
    """Where a supervisor's status socket may be: the usual directory, then fallbacks."""
    import glob  # the status tools' lookup; a supervisor never lists

    found = [usual_base(runtime_dir)]
    found += sorted(glob.glob(usual_base(runtime_dir) + "-*"))
    return [b for b in found if os.path.isdir(b) and _owned_private(b)]


def _owned_private(path: str) -> bool:
    st = os.lstat(path)
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


def status_socket(plugin: str, runtime_dir: str = "", base: Optional[str] = None) -> str:
    """The status socket of ``plugin``; a hash of the name when the name is too long for a
    Unix socket path (eKuiper allows names longer than AF_UNIX does)."""
    base = base if base is not None else private_base(runtime_dir)
    path = os.path.join(base, f"{plugin}.sock")
    if len(path.encode()) > SOCKET_PATH_MAX:
        import hashlib

        path = os.path.join(base, "p-" + hashlib.sha1(plugin.encode()).hexdigest()[:16] + ".sock")
    return path


def identity(path: str) -> Tuple[int, ...]:
    """Which file ``path`` is: device, inode and ctime (inode numbers are reused at once)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def unlink_if_ours(path: str, ident: Tuple[int, ...]) -> None:
    """Remove ``path`` only if it is still the file we created."""
    try:
        if identity(path) == tuple(ident):
            os.unlink(path)
    except OSError:
        pass
