"""Instance state that outlives workers: ``ctx.put_state``/``get_state``/``delete_state``.

The supervisor keeps each instance's state (a source or sink instance: one bucket; a
function symbol: one bucket per rule) and sends all of it to every new worker right after
START (a ``STATE`` frame). A worker serves ``get_state`` from its own copy and sends each
``put_state``/``delete_state`` to the supervisor as one ``PUT`` frame on its link before
the call returns: no round trip, and the link keeps the order of puts, sink progress and
acks. Once ``put_state`` has returned, the put survives the worker's crash, recycle or
reload (the frame is in the socket; the supervisor reads it before the exit report).

With ``state_dir`` set, a changed store is written there at most every
``state_flush_interval`` seconds and when the supervisor exits (tmp file + rename, mode 0600,
directory 0700 and ours, every directory on its path closed to others as the settings
file's), and read back when the instance starts in a new supervisor. Files are opened
without following links or waiting on a FIFO; one that is not a whole state file is moved
aside (``<name>.corrupt-<time>``, one WARNING) and the instance starts with empty state.

Values are JSON text or raw bytes, encoded the same way in frames and files; nothing is
ever unpickled.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import stat
import struct
import sys
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from ..config import ConfigError, check_trusted

HEAD = struct.Struct("!HHBI")     # rule length, key length, kind, value length
LIMIT = struct.Struct("!Q")       # a STATE frame starts with the per-bucket byte limit
JSON, RAW, DELETE = ord("j"), ord("b"), ord("d")
FILE_SUFFIX = ".state"
NAME_MAX = 200                    # longer file names are hashed

Value = Tuple[int, bytes]         # (JSON or RAW, the encoded value)
Bucket = Dict[str, Value]


def encode_entry(rule: str, key: str, kind: int, value: bytes) -> bytes:
    r, k = rule.encode(), key.encode()
    return HEAD.pack(len(r), len(k), kind, len(value)) + r + k + value


def decode_entries(data: bytes, pos: int = 0) -> Iterator[Tuple[str, str, int, bytes]]:
    """(rule, key, kind, value) of every entry from ``pos`` on (ValueError on garbage)."""
    end = len(data)
    while pos < end:
        if end - pos < HEAD.size:
            raise ValueError("truncated state entry")
        nr, nk, kind, nv = HEAD.unpack_from(data, pos)
        pos += HEAD.size
        if pos + nr + nk + nv > end or kind not in (JSON, RAW, DELETE):
            raise ValueError("malformed state entry")
        rule = data[pos:pos + nr].decode()
        key = data[pos + nr:pos + nr + nk].decode()
        pos += nr + nk
        yield rule, key, kind, bytes(data[pos:pos + nv])
        pos += nv


def encode_value(value: Any) -> Value:
    """JSON text of ``value``, or the bytes themselves (TypeError if neither)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return RAW, bytes(value)
    return JSON, json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def decode_value(entry: Value) -> Any:
    kind, data = entry
    return data if kind == RAW else json.loads(data)


class Buckets:
    """State as both ends hold it: rule -> key -> encoded value, with byte sizes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data: Dict[str, Bucket] = {}
        self.sizes: Dict[str, int] = {}

    def change(self, rule: str, key: str, kind: int, value: bytes) -> bool:
        """Apply one put or delete; False (nothing changed) when it would exceed the limit."""
        bucket = self.data.setdefault(rule, {})
        old = bucket.get(key)
        size = self.sizes.get(rule, 0) - (len(key) + len(old[1]) if old else 0)
        if kind == DELETE:
            if old is not None:
                del bucket[key]
                self.sizes[rule] = size
            return True
        size += len(key) + len(value)
        if size > self.limit:
            return False
        bucket[key] = (kind, value)
        self.sizes[rule] = size
        return True

    def encode(self) -> bytes:
        return b"".join(encode_entry(rule, key, kind, value)
                        for rule, bucket in self.data.items() for key, (kind, value) in bucket.items())

    def load(self, data: bytes, pos: int = 0) -> None:
        for rule, key, kind, value in decode_entries(data, pos):
            self.change(rule, key, kind, value)


# --- the worker's side ----------------------------------------------------------------------

class LocalState(Buckets):
    """A worker's copy; ``send`` writes a PUT frame to the supervisor (blocking, in order)."""

    def __init__(self, frame: bytes, send: Callable[[bytes], None], where: str,
                 per_rule: bool) -> None:
        """``where`` names the instance; ``per_rule``: a function's, whose errors name the rule."""
        (limit,) = LIMIT.unpack_from(frame)
        super().__init__(limit)
        self.load(frame, LIMIT.size)
        self.send = send
        self.where = where
        self.per_rule = per_rule

    def put(self, rule: str, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"state keys are strings, got {type(key).__name__}")
        try:
            kind, data = encode_value(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"state values are JSON or bytes: {e}") from None
        if not self.change(rule, key, kind, data):
            where = f"{self.where} rule {rule}" if self.per_rule else self.where
            raise ValueError(f"{where}: state of {self.sizes.get(rule, 0)} bytes "
                             f"plus {key!r} ({len(data)} bytes) exceeds state_max_bytes {self.limit}")
        self.send(encode_entry(rule, key, kind, data))

    def get(self, rule: str, key: str, default: Any = None) -> Any:
        entry = self.data.get(rule, {}).get(key)
        return default if entry is None else decode_value(entry)

    def delete(self, rule: str, key: str) -> None:
        if key in self.data.get(rule, {}):
            self.change(rule, key, DELETE, b"")
            self.send(encode_entry(rule, key, DELETE, b""))


# --- the supervisor's side --------------------------------------------------------------------

def check_dir(path: str) -> None:
    """``state_dir`` must be a directory of ours closed to others (made 0700 if missing),
    reached through directories nobody else can change (as the settings file): otherwise
    another local user could swap it, or plant files where ours go."""
    if not path:
        return
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise ConfigError(f"kuiper_pool config: state_dir {path!r}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"kuiper_pool config: state_dir {path!r} must be a directory owned by "
                          f"uid {os.getuid()} with mode 0700 (no access for group or others)")
    check_trusted(path, "state_dir")


# a state file is opened without following a link or waiting for a FIFO's writer
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_file(path: str) -> Optional[bytes]:
    """The bytes of the state file ``path``; None when there is none. OSError (ELOOP: a
    link, EINVAL: not a regular file, ...) when what is there cannot be a state file."""
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return f.read()


def move_aside(path: str) -> str:
    """Rename the unreadable state file ``path`` to ``<path>.corrupt-<UTC time>``; returns
    the new name ("" if it could not be moved: the next flush replaces it)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    aside = f"{path}.corrupt-{stamp}"
    try:
        os.rename(path, aside)
    except OSError:
        return ""
    return aside


class Store(Buckets):
    """One instance's state in the supervisor, and its file when persisted."""

    def __init__(self, limit: int, path: str = "") -> None:
        super().__init__(limit)
        self.path = path
        self.dirty = False
        self.serial = 0     # of its temporary files

    def load_file(self) -> Optional[str]:
        """Read the file, if any; a file that is not a whole state file (cut short, a key
        that is not UTF-8, a link, a FIFO) is moved aside and the state starts empty.
        Returns what was wrong and where the file went, or None."""
        try:
            data = read_file(self.path)
            if data is not None:
                self.load(data)
            return None
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            self.data, self.sizes = {}, {}
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            aside = move_aside(self.path)
            return f"state file {self.path} is unreadable ({why}): " + (
                f"moved to {aside}" if aside else "could not move it aside") + "; starting with empty state"

    def apply(self, payload: bytes) -> Optional[str]:
        """A worker's PUT frame; the text of what was refused, if anything."""
        for rule, key, kind, value in decode_entries(payload):
            if not self.change(rule, key, kind, value):
                return f"rule {rule}: put_state {key!r} refused: over state_max_bytes {self.limit}"
            self.dirty = True
        return None

    def frame_payload(self) -> bytes:
        return LIMIT.pack(self.limit) + self.encode()

    def flush(self, syncer: Optional["Syncer"] = None) -> None:
        """Write the file if anything changed (atomically: a crash leaves the old one): made
        durable and renamed into place by ``syncer`` when it takes the name now, else here."""
        if not self.path or not self.dirty:
            return
        self.serial += 1
        tmp = f"{self.path}.{os.getpid()}.{self.serial}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # left by a killed supervisor of the same pid: never reused
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o600)
        try:
            with open(fd, "wb") as f:
                f.write(self.encode())
                if syncer is None:
                    f.flush()
                    os.fsync(f.fileno())
            if syncer is None:
                os.replace(tmp, self.path)
            elif not syncer.hand(tmp, self.path):
                os.unlink(tmp)  # the syncer is behind (a slow disk): next time
                return
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.dirty = False


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's value; Python < 3.10 lacks the name


class Syncer:
    """The supervisor's end of the syncer process (``syncer.py``): ``hand`` never waits."""

    # names waiting in the pipe at most: bounds the temporary files a stalled disk leaves
    PIPE_SIZE = 4096

    def __init__(self) -> None:
        """OSError if the process cannot be started."""
        r, w = os.pipe()
        try:
            argv = [sys.executable, "-I", "-S", os.path.join(os.path.dirname(__file__), "syncer.py")]
            self.pid = os.posix_spawn(sys.executable, argv, dict(os.environ),
                                      file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)],
                                      setpgroup=0)  # a signal to our group leaves it its queue
        except OSError:
            os.close(w)
            raise
        finally:
            os.close(r)
        self.fd = w
        os.set_blocking(w, False)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.PIPE_SIZE)
        except OSError:
            pass

    def hand(self, tmp: str, final: str) -> bool:
        """Queue ``tmp`` to be synced and renamed to ``final``; False if the syncer is behind
        (its pipe is full). OSError if it is gone."""
        record = os.fsencode(tmp) + b"\0" + os.fsencode(final) + b"\0"
        if len(record) > select.PIPE_BUF:  # not written whole at once: synced in the loop
            return False
        try:
            return os.write(self.fd, record) == len(record)
        except BlockingIOError:
            return False

    def alive(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG)[0] == 0

    def close(self, timeout: float = 10.0) -> None:
        """Let it finish what it was handed (bounded by ``timeout``), then reap it."""
        os.close(self.fd)
        deadline = time.monotonic() + timeout
        while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
            if time.monotonic() >= deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)  # only at exit, with the loop over


class States:
    """Every instance's store, by instance identity (a function symbol: one store for all
    rules); flushed to ``state_dir`` on ticks and when the supervisor stops."""

    def __init__(self, state_dir: str, flush_interval: float) -> None:
        self.dir = state_dir
        self.flush_interval = flush_interval
        self.stores: Dict[str, Store] = {}
        self.next_flush = 0.0
        self.syncer: Optional[Syncer] = None

    def store(self, plugin: str, key: str, limit: int,
              warn: Callable[[str], None] = lambda _text: None) -> Store:
        """The store of the instance whose ``Control.key`` is ``key`` (read from its file
        the first time, when persisted; ``warn`` hears of a file moved aside)."""
        found = self.stores.get(key)
        if found is None:
            found = Store(limit, self.file_for(plugin, key) if self.dir else "")
            problem = found.load_file() if found.path else None
            if problem:
                warn(problem)
            self.stores[key] = found
        found.limit = limit
        return found

    def file_for(self, plugin: str, key: str) -> str:
        # imported here: plugin.start checks state_dir before its handshake, with this module
        import hashlib
        from urllib.parse import quote

        name = quote(plugin, safe="") + "--" + quote(key, safe="")
        if len(name) > NAME_MAX:
            name = "h-" + hashlib.sha256(name.encode()).hexdigest()
        return os.path.join(self.dir, name + FILE_SUFFIX)

    def tick(self, now: float, on_error: Callable[[Optional[Store], OSError], None]) -> None:
        """Hand changed stores to the syncer, every ``flush_interval``."""
        if not self.dir or now < self.next_flush:
            return
        self.next_flush = now + self.flush_interval
        if not any(store.dirty for store in self.stores.values()):
            return
        if self.syncer is None or not self.syncer.alive():
            if self.syncer is not None:  # it died (killed, a signal): its pipe goes with it
                os.close(self.syncer.fd)
            self.syncer = None
            try:
                self.syncer = Syncer()
            except OSError as e:
                on_error(None, e)  # synced here, in the loop, until it can be started
        self._flush(self.syncer, on_error)

    def flush(self, on_error: Callable[[Optional[Store], OSError], None]) -> None:
        """Everything, durably, now (the supervisor stops): after what the syncer was handed."""
        if self.syncer is not None:
            syncer, self.syncer = self.syncer, None
            syncer.close()
        self._flush(None, on_error)

    def _flush(self, syncer: Optional[Syncer],
               on_error: Callable[[Optional[Store], OSError], None]) -> None:
        for store in self.stores.values():
            try:
                store.flush(syncer)
            except OSError as e:
                on_error(store, e)
