"""SP over ipc spoken natively: nng's and mangos's ipc framing on a Unix stream socket,
with no nng in the process (docs/transport.md: ~1.5 µs per message instead of ~30 µs).

On connect each side sends ``00 'S' 'P' 00 <protocol id, 16-bit BE> 00 00`` once and checks
the peer's; then every message is ``01`` + 8-byte BE length + payload. REQ puts a 4-byte BE
request id with the high bit set before the body; REP echoes it.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import resource
import select
import socket
import struct
import threading
import time
from typing import Callable, List, Optional, Tuple, Union

from ..paths import identity, unlink_if_ours
from . import TransportError, TransportTimeout
from .outbox import Outbox

PUSH, PULL, REQ, REP = 0x50, 0x51, 0x30, 0x31
_HEADER = struct.Struct(">4sH2s")
_FRAME = struct.Struct(">BQ")
_ID = struct.Struct(">I")
READ_SIZE = 1 << 18


def header(proto: int) -> bytes:
    return _HEADER.pack(b"\x00SP\x00", proto, b"\x00\x00")


def check_header(data: bytes, peer: int, where: str) -> None:
    magic, proto, rest = _HEADER.unpack(data)
    if magic != b"\x00SP\x00" or rest != b"\x00\x00":
        raise TransportError(f"{where}: not an SP peer (header {data.hex()})")
    if proto != peer:
        raise TransportError(f"{where}: peer speaks protocol 0x{proto:x}, expected 0x{peer:x}")


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(1, len(payload)) + payload


def frame_header(head: bytes) -> Tuple[int, int]:
    """A message's type (1) and payload length, from its first 9 bytes."""
    kind, length = _FRAME.unpack(head)
    return kind, length


def path_of(url: str) -> str:
    return url[len("ipc://"):] if url.startswith("ipc://") else url


Notice = Callable[[bool, str], None]   # (an item was lost, one line): the owner logs and counts


def no_notice(_lost: bool, _text: str) -> None:
    """For an endpoint nobody reports for."""


class SpillBudget:
    """How many big messages this process holds in memfds at once, whatever the endpoint:
    at most SHARE of RLIMIT_NOFILE's soft limit, PER_MESSAGE descriptors each (the memfd
    and the duplicate Python's mmap keeps). Past it a big message is held in memory like
    a small one (relayed by copy) instead of failing to get a descriptor: under ``ulimit
    -n 256``, 200 items of 300 KiB would otherwise take every descriptor the process has."""

    SHARE = 0.5
    PER_MESSAGE = 2

    def __init__(self) -> None:
        self.held = 0

    def limit(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(1, int(soft * self.SHARE) // self.PER_MESSAGE)

    def take(self) -> bool:
        if self.held >= self.limit():
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1

    def roomy(self) -> bool:
        """Under half the budget in use: a shortage has passed."""
        return self.held < self.limit() // 2


SPILL_BUDGET = SpillBudget()


class Spilled:
    """A message too big to relay, held in a memfd as it is received: whoever needs its
    bytes gets the descriptor (a sink worker, with SCM_RIGHTS) and reads the first
    ``len()`` of them; nobody but this process can write it. Released when the last
    reference goes."""

    fd: int
    size: int
    got: int   # bytes of the message written so far

    def __len__(self) -> int:
        return self.size

    def fileno(self) -> int:
        return self.fd

    def full(self) -> bool:
        return self.got == self.size

    def take(self, data: memoryview) -> int:
        """Write the start of ``data`` (what the body still lacks); return how much."""
        raise NotImplementedError

    def recv(self, sock: socket.socket) -> Tuple[int, int]:
        """Receive part of the rest from non-blocking ``sock``: bytes received (0 at EOF)
        and asked for; BlockingIOError when nothing waits."""
        raise NotImplementedError

    def seal(self) -> "Spilled":
        """Whole: from now on nobody can change it (a redelivered item is the same)."""
        return self


class SealedSpill(Spilled):
    """A fresh memfd per message, written with ``pwrite`` from a reused buffer and sealed
    read-only once whole (F_SEAL_WRITE). The path when the kernel has no
    F_SEAL_FUTURE_WRITE, and for a message too big for a :class:`MemfdPool`. (``pwrite``
    rather than receiving into a mapping of it: a page fault per 4 KiB of a fresh memfd
    costs more than the second copy.)"""

    SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

    def __init__(self, size: int) -> None:
        self.fd = -1
        self.fd = os.memfd_create("kuiper_pool-item", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.size = size
        self.got = 0

    def take(self, data: memoryview) -> int:
        n = left = min(len(data), self.size - self.got)
        while left:
            k = os.pwrite(self.fd, data[n - left:n], self.got)
            self.got += k
            left -= k
        return n

    def recv(self, sock: socket.socket) -> Tuple[int, int]:
        buf = scratch()
        ask = min(len(buf), self.size - self.got)
        n = sock.recv_into(buf, ask)
        if n:
            self.take(buf[:n])
        return n, ask

    def seal(self) -> "Spilled":
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, self.SEALS)
        return self

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            SPILL_BUDGET.give()


F_SEAL_FUTURE_WRITE = 0x0010   # Linux >= 5.1; Python's fcntl module has no name for it


class _Slot:
    """One memfd of a :class:`MemfdPool`, mapped writable here, then sealed: no write(),
    no new writable mapping (reopening /proc/<pid>/fd/N included), no resize, no further
    seals; this process's mapping stays writable."""

    SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE

    def __init__(self, capacity: int) -> None:
        fd = os.memfd_create("kuiper_pool-item", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, capacity)
            self.map = mmap.mmap(fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, self.SEALS)
            except BaseException:
                self.map.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.view = memoryview(self.map)
        self.capacity = capacity

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


class PooledSpill(Spilled):
    """A message received straight into a :class:`MemfdPool` memfd's mapping (one copy,
    its pages already there after the first use); the memfd goes back to the pool when
    the last reference goes."""

    def __init__(self, size: int, slot: _Slot, pool: "MemfdPool") -> None:
        self.fd = slot.fd
        self.size = size
        self.got = 0
        self.slot: Optional[_Slot] = slot
        self.pool = pool

    def take(self, data: memoryview) -> int:
        n = min(len(data), self.size - self.got)
        self.slot.view[self.got:self.got + n] = data[:n]
        self.got += n
        return n

    def recv(self, sock: socket.socket) -> Tuple[int, int]:
        ask = self.size - self.got
        with self.slot.view[self.got:self.size] as rest:
            n = sock.recv_into(rest)
        self.got += n
        return n, ask

    def __del__(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            self.pool.give_back(slot)
            SPILL_BUDGET.give()


class MemfdPool:
    """Reusable memfds for the big messages of one endpoint (``FrameReader``'s ``spill``).
    A fresh memfd costs the kernel a page allocation and zeroing per 4 KiB on first write
    (~380 µs per MiB, against ~170 µs into pages already there), so a memfd whose message
    is finished is kept, mapped, for the next one. Capacities are powers of two from
    ``SMALLEST``; a message above ``LARGEST`` gets a :class:`SealedSpill` of its own.

    Memory: at most ``KEEP`` free memfds (the bigger ones are kept), so beyond the
    messages in use at most 2 x 16 MiB, and as much as the biggest messages written into
    them in practice (two 1 MiB images: ~2 MiB); all released by :meth:`close`. Each
    pooled memfd takes two descriptors here (Python's mmap keeps a duplicate).

    A memfd is written again only after its message's last reference went: for a sink,
    once its item left the in-flight table, i.e. the worker it was passed to reported it
    done or acked (after reading it) or died. A worker only ever reads items of its own
    sink from it. Without F_SEAL_FUTURE_WRITE (EINVAL: Linux < 5.1) every message gets a
    :class:`SealedSpill`."""

    KEEP = 2
    SMALLEST = 1 << 18
    LARGEST = 16 << 20

    def __init__(self) -> None:
        self.free: List[_Slot] = []
        self.pooling = True   # False once closed, or when the kernel refuses the seals

    def spill(self, size: int) -> Spilled:
        """A memfd to receive a message of ``size`` bytes into. OSError when none can be made."""
        slot = self._slot(size) if self.pooling and size <= self.LARGEST else None
        return PooledSpill(size, slot, self) if slot is not None else SealedSpill(size)

    def _slot(self, size: int) -> Optional[_Slot]:
        fits = [s for s in self.free if s.capacity >= size]
        if fits:
            slot = min(fits, key=lambda s: s.capacity)
            self.free.remove(slot)
            return slot
        try:
            return _Slot(max(self.SMALLEST, 1 << (size - 1).bit_length()))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.pooling = False
            return None

    def give_back(self, slot: _Slot) -> None:
        if self.pooling and len(self.free) < self.KEEP:
            self.free.append(slot)
            return
        if self.pooling:  # full: keep the bigger ones (a big memfd holds small messages too)
            smallest = min(self.free, key=lambda s: s.capacity)
            if smallest.capacity < slot.capacity:
                self.free.remove(smallest)
                self.free.append(slot)
                slot = smallest
        slot.close()

    def close(self) -> None:
        """Release the free memfds; those still in use are released when their messages go."""
        self.pooling = False
        for slot in self.free:
            slot.close()
        self.free.clear()


Message = Union[bytes, Spilled]


class FrameReader:
    """Whole messages out of a byte stream (the 8-byte header already consumed). With
    ``spill``, a message of at least that many bytes goes into a :class:`Spilled` memfd
    instead (from ``pool``, or a :class:`SealedSpill` of its own): ``body`` while it is
    incomplete (read the socket into it with :meth:`recv_body`), then a message of its own."""

    def __init__(self, max_size: int = 0, spill: int = 0, pool: Optional[MemfdPool] = None,
                 notice: Notice = no_notice) -> None:
        self.buf = bytearray()
        self.max_size = max_size
        self.spill = spill
        self.pool = pool
        self.notice = notice
        self.copying = False   # big messages are held in memory now (no descriptor for them)
        self.body: Optional[Spilled] = None

    def feed(self, data: Union[bytes, memoryview]) -> List[Message]:
        """The messages ``data`` completes. It may be a view of a buffer the caller reuses:
        what is kept of it is copied."""
        out: List[Message] = []
        if self.body is not None:
            with memoryview(data) as view:
                try:
                    used = self.body.take(view)
                except OSError as e:
                    raise TransportError(f"cannot hold an SP message of {self.body.size} bytes: {e}") from None
            if not self.body.full():
                return out
            out.append(self._sealed())
            data = data[used:]
        if self.buf:
            self.buf += data
            buf: Union[bytes, bytearray, memoryview] = self.buf
        else:  # parsed where it is: only a partial message at its end is copied (into buf)
            buf = data
        pos = 0
        while len(buf) - pos >= _FRAME.size:
            kind, n = _FRAME.unpack_from(buf, pos)
            if kind != 1:
                raise TransportError(f"bad SP message type {kind}")
            if self.max_size and n > self.max_size:
                raise TransportError(f"SP message of {n} bytes over the limit {self.max_size}")
            pos += _FRAME.size
            body = self._spill(n) if self.spill and n >= self.spill else None
            if body is not None:
                try:
                    with memoryview(buf) as view:
                        pos += body.take(view[pos:])
                except OSError as e:  # out of memory: as a bad frame, this peer goes
                    raise TransportError(f"cannot hold an SP message of {n} bytes: {e}") from None
                if not body.full():
                    self.body = body
                    break
                out.append(body.seal())
                continue
            end = pos + n
            if len(buf) < end:
                pos -= _FRAME.size
                break
            out.append(bytes(buf[pos:end]))
            pos = end
        if buf is not self.buf:
            self.buf += buf[pos:]
        elif pos:
            del buf[:pos]
        return out

    def _spill(self, size: int) -> Optional[Spilled]:
        """A memfd for a message of ``size`` bytes, or None: it is held in memory instead
        (the process's descriptor budget is in use, or no memfd can be made now)."""
        why = ""
        if SPILL_BUDGET.take():
            try:
                body = self.pool.spill(size) if self.pool is not None else SealedSpill(size)
            except OSError as e:
                SPILL_BUDGET.give()
                why = f"cannot make a memfd: {e.strerror or e}"
            else:
                if self.copying and SPILL_BUDGET.roomy():  # one line per shortage, not per item
                    self.copying = False
                return body
        if not self.copying:
            self.copying = True
            why = why or f"the {SPILL_BUDGET.limit()} memfds of the descriptor budget are in use"
            self.notice(False, f"big items are held in memory and relayed by copy: {why} "
                               f"(RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")
        return None

    def recv_body(self, sock: socket.socket) -> Optional[List[Message]]:
        """Read what non-blocking ``sock`` has of the incomplete ``body`` into it: the
        message once whole, [] meanwhile, None when the peer closed in it (its send failed:
        eKuiper's to report); TransportError when it cannot be read."""
        body = self.body
        assert body is not None
        while not body.full():
            try:
                n, asked = body.recv(sock)
            except (BlockingIOError, InterruptedError):
                return []
            except OSError as e:  # reset, or no memory to hold the message
                if isinstance(e, ConnectionError):
                    return None
                raise TransportError(f"cannot receive an item of {body.size} bytes: {e}") from None
            if not n:
                return None
            if n < asked:  # drained for now (the loop's selector wakes us for more)
                return []
        return [self._sealed()]

    def _sealed(self) -> Spilled:
        body, self.body = self.body, None
        assert body is not None
        return body.seal()


_local = threading.local()


def scratch() -> memoryview:
    """This thread's reused receive buffer of READ_SIZE bytes. A fresh ``recv(READ_SIZE)``
    per read is an mmap/mremap/munmap per message wherever malloc's mmap threshold is below
    it (measured: +12-16 us of worker CPU per function call). An anonymous mapping, so a
    thread touches only the pages its reads fill. What is read into it must be consumed
    (copied) before the thread's next read."""
    view = getattr(_local, "view", None)
    if view is None:
        # private: a forked child (the zygote, every worker) must get its own copy on write
        view = _local.view = memoryview(mmap.mmap(-1, READ_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
    return view


def recv_view(sock: socket.socket) -> memoryview:
    """Up to READ_SIZE bytes into :func:`scratch` (empty at EOF); raises as ``recv`` does."""
    view = scratch()
    return view[:sock.recv_into(view)]


def recv_some(sock: socket.socket, size: int = READ_SIZE) -> Optional[bytes]:
    """Up to ``size`` bytes; b"" when the peer is gone (EOF or reset), None when there is
    nothing to read now."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def next_id(request_id: int) -> int:
    """The request id after ``request_id``: 31 bits, high bit set."""
    return 0x80000000 | ((request_id + 1) & 0x7FFFFFFF)


class ReqConnection:
    """The REQ side of one connected, handshaken ipc connection, used the eKuiper way
    (its requests are our answers, its replies are eKuiper's calls), blocking: a function
    worker owns one after the supervisor lends it.

    ``request_id`` is our outstanding request: a reply with another id is dropped, as REQ
    does. ``buffered`` are bytes already read off the socket by the previous owner."""

    def __init__(self, sock: socket.socket, request_id: int, buffered: bytes = b"") -> None:
        sock.setblocking(True)
        self.sock = sock
        self.request_id = request_id
        self.reader = FrameReader()
        self.pending = self.reader.feed(buffered) if buffered else []

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_ready(self) -> List[bytes]:
        """eKuiper's calls that arrived (reads once; call when readable). TransportError at EOF."""
        msgs, self.pending = self.pending, []
        if not msgs:
            data = recv_view(self.sock)
            if not data:
                raise TransportError("eKuiper closed the connection")
            msgs = self.reader.feed(data)
        return [m[4:] for m in msgs if len(m) >= 4 and _ID.unpack_from(m)[0] == self.request_id]

    def send(self, data: bytes) -> None:
        self.request_id = next_id(self.request_id)
        self.sock.sendall(frame(_ID.pack(self.request_id) + data))

    def close(self) -> None:
        self.sock.close()


def connect(path: str, proto: int, peer: int, timeout: float) -> socket.socket:
    """Connect to a listener at ``path`` and exchange SP headers; a blocking socket.
    OSError (ENOENT, ECONNREFUSED, ...) when nobody listens; TransportError for a bad peer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(header(proto))
        got = b""
        while len(got) < _HEADER.size:
            chunk = sock.recv(_HEADER.size - len(got))
            if not chunk:
                raise TransportError(f"{path}: closed during the SP handshake")
            got += chunk
        check_header(got, peer, path)
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def dial(url: str, proto: int, peer: int, timeout: float) -> socket.socket:
    """``connect``, retrying until ``timeout`` (eKuiper may listen a moment later)."""
    path = path_of(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(path, proto, peer, max(0.1, min(1.0, deadline - time.monotonic())))
        except (OSError, TransportError) as e:
            if time.monotonic() >= deadline:
                raise TransportError(f"cannot dial {url}: {e}") from None
            time.sleep(0.02)


REDIAL_MIN, REDIAL_MAX = 0.1, 5.0   # as mangos dialers with eKuiper's options
HEADER_TIMEOUT = 0.5   # a peer that accepted but has not sent its SP header by then is redialed


class _Dialer:
    """What every dialing endpoint shares, without ever blocking: one connection, an
    :class:`Outbox` of what it has not taken yet, and (re)dials as a state machine --
    connect and send our header at once (a Unix connect answers at once), read the
    peer's header when it comes (``greeting``), give up on a silent peer after
    HEADER_TIMEOUT and try again with backoff. ``fileno`` is an epoll fd holding the
    connection, the same across redials: readable when the connection has input, or is
    writable while bytes wait. Call ``pump`` when it is readable and on ticks."""

    proto = peer = 0

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_of(url)
        self.sock: Optional[socket.socket] = None
        self.greeting: Optional[bytearray] = None   # the peer's header while it is awaited
        self.greet_by = 0.0
        self.poll = select.epoll()
        self.outbox = Outbox(None, self._want_write)
        self.redial_at = 0.0
        self.backoff = REDIAL_MIN

    def fileno(self) -> int:
        return self.poll.fileno()

    def connected(self) -> bool:
        return self.sock is not None and self.greeting is None

    def _want_write(self, on: bool) -> None:
        if self.connected():
            assert self.sock is not None
            self.poll.modify(self.sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if on else 0))

    def _adopt(self, sock: socket.socket) -> None:
        """A connection whose headers were exchanged (by ``dial``) or are being exchanged."""
        sock.setblocking(False)
        self.sock = sock
        self.poll.register(sock.fileno(), select.EPOLLIN)

    def _dial_now(self, timeout: float) -> None:
        """Dial within ``timeout``, blocking (TransportError after, the endpoint closed)."""
        try:
            self._adopt(dial(self.url, self.proto, self.peer, timeout))
        except TransportError:
            self.poll.close()
            raise
        self._connected()

    def _redial(self, now: float) -> None:
        """Start a connection if none is up and one is due."""
        if self.sock is not None or now < self.redial_at:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
            sock.send(header(self.proto))   # 8 bytes into an empty socket buffer
        except OSError:  # nobody listens (yet), or its backlog is full
            sock.close()
            self._retry_later(now)
            return
        self.greeting, self.greet_by = bytearray(), now + HEADER_TIMEOUT
        self._adopt(sock)

    def _greet(self, now: float) -> None:
        """Read what came of the peer's header; connected once it is whole and right."""
        assert self.sock is not None and self.greeting is not None
        data = recv_some(self.sock, _HEADER.size - len(self.greeting))
        if data == b"":
            self._lost()
            return
        self.greeting += data or b""
        if len(self.greeting) < _HEADER.size:
            if now >= self.greet_by:  # accepted, and silent: as if nobody listened
                self._lost()
            return
        try:
            check_header(bytes(self.greeting), self.peer, self.url)
        except TransportError:
            self._lost()
            return
        self.greeting, self.backoff = None, REDIAL_MIN
        self._connected()

    def _connected(self) -> None:
        self.outbox.sock = self.sock
        if self.outbox.queue:
            self._want_write(True)
        self._flush()

    def _flush(self) -> None:
        """Write what the socket takes now."""
        try:
            self.outbox.flush()
        except OSError:
            self._lost()

    def pump(self, now: float) -> None:
        """Advance whatever is under way: a due redial, the peer's header, queued bytes."""
        if self.sock is None:
            self._redial(now)
        if self.greeting is not None:
            self._greet(now)
        elif self.sock is not None:
            self._flush()

    def _lost(self) -> None:
        """The peer went away. What was queued for a connection that was up is lost with it
        (at most once: part of it may have been written); what waited for a connection that
        never came up waits for the next one."""
        was_up = self.connected()
        if self.sock is not None:
            self.poll.unregister(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.greeting = None
        self.outbox.sock = None
        if was_up:
            self.outbox.clear()
        self._retry_later(time.monotonic())

    def _retry_later(self, now: float) -> None:
        self.redial_at = now + self.backoff
        self.backoff = min(REDIAL_MAX, self.backoff * 2)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.outbox.sock = None
        self.outbox.clear()
        self.poll.close()


class ReqEndpoint(_Dialer):
    """A REQ dialer used the eKuiper way, non-blocking, for the supervisor's selector: the
    control channel and the function channels. No keepalive handshakes: unlike nng's REQ,
    nothing here times out while idle."""

    proto, peer = REQ, REP

    def __init__(self, url: str, dial_timeout: float) -> None:
        """Dial within ``dial_timeout`` (blocking; TransportError after); with 0, start
        unconnected and dial as ``pump`` and ``recv`` are called, never blocking."""
        super().__init__(url)
        self.request_id = 0x80000000 | (int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF)
        self.reader = FrameReader()
        self.inbox: List[bytes] = []
        self.unsent: Optional[bytes] = b"handshake"   # an answer waiting for a connection
        if dial_timeout > 0:
            self._dial_now(dial_timeout)
        else:
            self.pump(time.monotonic())

    def _connected(self) -> None:
        self.outbox.sock = self.sock
        # eKuiper re-sends the command or call it waits on when a new pipe handshakes
        self.send(self.unsent if self.unsent is not None else b"handshake")

    def recv(self) -> Optional[bytes]:
        """eKuiper's next message (a reply to our outstanding request), or None."""
        if self.greeting is not None or self.outbox.queue:
            self.pump(time.monotonic())
        if self.sock is not None and self.greeting is None and not self.inbox:
            self._read()
        while self.inbox:
            msg = self.inbox.pop(0)
            if len(msg) >= 4 and _ID.unpack_from(msg)[0] == self.request_id:
                return msg[4:]
        return None

    def _read(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = recv_view(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = memoryview(b"")
            if not data:
                self._lost()
                return
            try:
                self.inbox += self.reader.feed(data)
            except TransportError:
                self._lost()
                return
            if len(data) < READ_SIZE:
                return

    def send(self, data: bytes) -> None:
        """Our answer (or a handshake) as the next request; kept until a connection takes it."""
        self.request_id = next_id(self.request_id)
        self.unsent = data
        if self.connected():
            try:
                if self.outbox.write(frame(_ID.pack(self.request_id) + data)):
                    self.unsent = None
            except OSError:
                self._lost()

    def _flush(self) -> None:
        super()._flush()
        if not self.outbox.queue and self.connected():
            self.unsent = None

    def _lost(self) -> None:
        super()._lost()
        self.reader = FrameReader()
        self.inbox.clear()

    def tick(self, now: float) -> None:
        """Redial a lost connection (sending the kept answer or a handshake on it), give
        up on a silent peer, flush what waits."""
        self.pump(now)

    def detach(self) -> Tuple[socket.socket, int, bytes]:
        """Hand the connection over (zero-hop functions): the socket, our outstanding request
        id and bytes read but not yet a whole message. The endpoint is closed after."""
        if not self.connected() or self.outbox.queue:
            raise TransportError(f"{self.url}: no idle connection to hand over")
        sock, self.sock = self.sock, None
        assert sock is not None
        self.outbox.sock = None
        self.poll.unregister(sock.fileno())
        self.poll.close()
        sock.setblocking(True)
        return sock, self.request_id, bytes(self.reader.buf)


def listen(path: str) -> Tuple[socket.socket, Tuple[int, ...]]:
    """A listening socket at ``path``, mode 0600 whatever the umask, and its file's
    :func:`identity`. A stale file is removed only if nobody listens on it."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a killed owner
        except OSError:
            pass
        else:
            raise TransportError(f"cannot listen on ipc://{path}: address in use")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on ipc://{path}: {e}") from None
    finally:
        os.umask(old)
    sock.listen(16)
    sock.setblocking(False)
    return sock, identity(path)


class _Pipe:
    """One accepted connection of a PullEndpoint."""

    def __init__(self, sock: socket.socket, spill: int, pool: Optional[MemfdPool],
                 notice: Notice) -> None:
        self.sock = sock
        self.header = b""
        self.reader = FrameReader(spill=spill, pool=pool, notice=notice)


class PullEndpoint:
    """A PULL listener (sink data): any number of PUSH peers (eKuiper reconnects), read in
    batches of up to 256 KiB; with ``spill``, messages of that many bytes or more arrive as
    :class:`Spilled` memfds, received straight into them (from one :class:`MemfdPool` of
    the endpoint's, released by :meth:`close`). ``fileno`` is one epoll fd for the outer
    selector; messages read and not yet taken keep it readable (a pipe inside the epoll
    set), so none waits for new traffic to be noticed. ``notice`` hears of every message
    lost here (a peer dropped with part of one) and of big ones held in memory."""

    def __init__(self, url: str, max_size: int = 0, spill: int = 0, notice: Notice = no_notice) -> None:
        self.url = url
        self.notice = notice
        self.accept_failed = False
        self.path = path_of(url)
        self.max_size = max_size
        self.spill = spill
        self.pool = MemfdPool() if spill else None
        self.listener, self.ident = listen(self.path)
        self.poll = select.epoll()
        self.poll.register(self.listener.fileno(), select.EPOLLIN)
        self.pipes: dict = {}
        self.queue: List[Message] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.poll.register(self.wake_r, select.EPOLLIN)
        self.woken = False
        self.lent: Optional[_Pipe] = None   # a connection another process reads meanwhile

    def fileno(self) -> int:
        return self.poll.fileno()

    def recv_many(self, n: int) -> List[Message]:
        """Up to ``n`` whole messages available now (non-blocking)."""
        if len(self.queue) < n:
            for fd, _ev in self.poll.poll(0):
                if fd == self.listener.fileno():
                    self._accept()
                elif fd in self.pipes:
                    self._read(self.pipes[fd])
                if len(self.queue) >= n:
                    break
        out, self.queue = self.queue[:n], self.queue[n:]
        self._wake(bool(self.queue))
        return out

    def lend(self) -> Optional[socket.socket]:
        """The one connection, when nothing of it is held here (header taken, no part of a
        message read, nothing queued), so another process may read it; reading it stops
        until :meth:`resume`. None when it is not idle."""
        if self.lent is not None or len(self.pipes) != 1 or self.queue:
            return None
        pipe = next(iter(self.pipes.values()))
        if len(pipe.header) < _HEADER.size or pipe.reader.buf:
            return None
        self.poll.unregister(pipe.sock.fileno())
        self.lent = pipe
        return pipe.sock

    def resume(self) -> None:
        """Read the lent connection again (its borrower is done with it)."""
        pipe, self.lent = self.lent, None
        if pipe is not None and self.pipes.get(pipe.sock.fileno()) is pipe:
            self.poll.register(pipe.sock.fileno(), select.EPOLLIN)

    def _wake(self, on: bool) -> None:
        if on and not self.woken:
            os.write(self.wake_w, b"x")
        elif not on and self.woken:
            try:
                os.read(self.wake_r, 64)
            except BlockingIOError:
                pass
        self.woken = on

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: that peer waits, others go on
                if not self.accept_failed:
                    self.accept_failed = True
                    self.notice(False, f"cannot accept eKuiper's connection to {self.url} now "
                                       f"({e.strerror or e}): it waits until a descriptor is free")
                return
            self.accept_failed = False
            sock.setblocking(False)
            try:
                sock.send(header(PULL))
            except OSError:
                sock.close()
                continue
            self.pipes[sock.fileno()] = _Pipe(sock, self.spill, self.pool, self.notice)
            self.poll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, pipe: _Pipe) -> None:
        if pipe.reader.body is not None:   # a big message: its rest straight into its memfd
            try:
                got = pipe.reader.recv_body(pipe.sock)
            except TransportError as e:
                self._drop(pipe, str(e))
                return
            if got is None:
                self._drop(pipe)
            else:
                self.queue += got
            return
        try:
            data = recv_view(pipe.sock)   # feed copies what it keeps
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset: as EOF
            data = memoryview(b"")
        if not data:  # a frame cut by the close is dropped; whole ones were delivered
            self._drop(pipe)
            return
        if len(pipe.header) < _HEADER.size:
            need = _HEADER.size - len(pipe.header)
            pipe.header += data[:need]
            data = data[need:]
            if len(pipe.header) < _HEADER.size:
                return
            try:
                check_header(pipe.header, PUSH, self.url)
            except TransportError as e:
                self._drop(pipe, str(e))
                return
        try:
            self.queue += pipe.reader.feed(data) if data else []
        except TransportError as e:  # a bad frame: drop this peer, as nng does
            self._drop(pipe, str(e))

    def _drop(self, pipe: _Pipe, why: str = "") -> None:
        """Forget a connection; ``why``: not an orderly close, what it held is lost."""
        if why:
            self.notice(True, f"dropped eKuiper's connection to {self.url} with what it had "
                              f"sent: {why}")
        fd = pipe.sock.fileno()
        self.pipes.pop(fd, None)
        if self.lent is pipe:
            self.lent = None
        try:
            self.poll.unregister(fd)
        except (OSError, ValueError):
            pass
        pipe.sock.close()

    def close(self) -> None:
        for pipe in list(self.pipes.values()):
            self._drop(pipe)
        self.listener.close()
        self.poll.close()
        if self.pool is not None:
            self.pool.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        unlink_if_ours(self.path, self.ident)


class PushDialer(_Dialer):
    """A PUSH dialer for a selector loop (sink acks in the supervisor): ``send`` writes at
    once what the socket takes and queues the rest, in order, never blocking and never
    dropping while the connection lives (eKuiper waits for every ack, matched by order
    alone); ``pending`` says how much waits, for the owner's back-pressure. Until a
    connection is up, sends wait for it; what was queued for a connection that died is
    dropped with it (eKuiper closed that rule). The peer never sends: input is EOF."""

    proto, peer = PUSH, PULL

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.pump(time.monotonic())

    def send(self, data: bytes) -> None:
        try:
            self.outbox.write(frame(data))   # queued while no connection is up
        except OSError:
            self._lost()
        if self.sock is None or self.greeting is not None:
            self.pump(time.monotonic())

    def send_rest(self, data: bytes) -> None:
        """Queue the end of a frame someone else began writing on this connection."""
        try:
            self.outbox.write(data)
        except OSError:
            self._lost()

    def pending(self) -> int:
        return len(self.outbox)

    def tick(self, now: float) -> None:
        """A due redial, or a peer silent past HEADER_TIMEOUT; nothing while all is well."""
        if self.sock is None or self.greeting is not None or self.outbox.queue:
            self.pump(now)

    def pump(self, now: float) -> None:
        if self.sock is not None and self.greeting is None and recv_some(self.sock, 4096) == b"":
            self._lost()
        super().pump(now)


HIGH_WATER = 1 << 20   # queued bytes beyond which a source's send waits for the peer


class PushEndpoint(PushDialer):
    """A PUSH dialer for a source's items (in its worker, from a plugin thread) and the
    emulator's data side: thread-safe. A send writes at once when the socket takes it;
    otherwise frames queue and go out together in one write (coalescing), pushed by a
    short-lived thread so nothing waits for the next send; past HIGH_WATER a send waits up
    to ``send_timeout`` and raises TransportTimeout. A peer that went away is redialed on
    the next send (eKuiper re-listens after a restart); with ``dial_timeout`` 0 the first
    dial is one attempt, never a wait."""

    def __init__(self, url: str, dial_timeout: float, send_timeout: float) -> None:
        self.send_timeout = send_timeout
        self.lock = threading.Lock()
        self.draining = False   # a thread pushes out what the socket did not take yet
        self.closed = False
        if dial_timeout > 0:
            _Dialer.__init__(self, url)
            self._dial_now(dial_timeout)
        else:  # one attempt now (a Unix connect answers at once); otherwise at the first send
            super().__init__(url)

    def send(self, data: bytes) -> None:
        with self.lock:
            super().send(data)
            if len(self.outbox) > HIGH_WATER:
                self._wait(self.send_timeout)
            if self.outbox.queue and not self.draining:  # what is queued must not wait for the next send
                self.draining = True
                threading.Thread(target=self._drain, daemon=True, name="kuiper_pool-push").start()

    def _drain(self) -> None:
        while True:
            with self.lock:
                if not self.outbox.queue or self.closed:
                    self.draining = False
                    return
            self._ready(0.1)
            with self.lock:
                if not self.closed:
                    self.pump(time.monotonic())

    def _ready(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the connection to need attention (or a redial to be due)."""
        if self.sock is None:
            time.sleep(min(timeout, max(0.01, self.redial_at - time.monotonic())))
            return
        try:
            self.poll.poll(timeout)
        except (OSError, ValueError):  # closed meanwhile
            pass

    def flush(self) -> None:
        with self.lock:
            self.pump(time.monotonic())

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outbox) > HIGH_WATER:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(f"{self.url}: the peer took nothing for {timeout:g}s")
            self._ready(min(left, 0.1))
            self.pump(time.monotonic())

    def close(self) -> None:
        with self.lock:
            self.closed = True
            super().close()
