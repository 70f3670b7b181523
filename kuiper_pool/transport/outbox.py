"""The write side of every socket a selector loop owns: what the socket takes now goes out
at once, the rest waits, in order, until the socket is writable again. Nothing here blocks
or starts a thread.

``watch(True)`` is called when bytes start waiting and ``watch(False)`` when the last of
them went out (or were dropped), so the owner asks its selector for write readiness only
while something is queued. How much may wait is the owner's policy (the README's "Data
paths" says it per channel): the queue itself never drops bytes except with ``clear``.
"""
from __future__ import annotations

import os
import socket
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Union

Watch = Callable[[bool], None]
# a descriptor to pass: an int (the queue keeps a duplicate while it waits) or an object
# whose ``fileno()`` stays open while it is referenced (kept as is: no descriptor spent)
Passed = Union[int, Any]


def no_watch(_on: bool) -> None:
    """For an owner that flushes on its own schedule."""


class Outbox:
    """A non-blocking write queue for one socket (``sock`` may be set later: until then
    everything waits). ``packets``: a SOCK_SEQPACKET socket, each write one message that
    goes out whole or not at all. Descriptors passed with a write travel with its first
    byte; the queue keeps its own copies of ints, so the caller may close its own at once,
    and a reference to an owner object (a big sink item's memfd: under a low RLIMIT_NOFILE a
    copy per queued item is what runs out)."""

    def __init__(self, sock: Optional[socket.socket], watch: Watch = no_watch,
                 packets: bool = False) -> None:
        self.sock = sock
        self.watch = watch
        self.packets = packets
        self.queue: Deque[List] = deque()   # [bytearray, descriptors not sent yet, bytes of it sent]
        self.size = 0

    def __len__(self) -> int:
        """Bytes waiting."""
        return self.size

    def write(self, data: bytes, fds: Sequence[Passed] = ()) -> bool:
        """Send ``data`` now as far as the socket takes it; True when all of it went out.
        Raises the socket's OSError (the peer is gone) after dropping what waited."""
        if not self.queue and self.sock is not None:
            try:
                n = socket.send_fds(self.sock, [data], _numbers(fds)) if fds else self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.clear()
                raise
            if n == len(data):
                return True
            if n:
                data, fds = memoryview(data)[n:], ()   # the descriptors went with the first byte
        self._keep(data, fds)
        return False

    def _keep(self, data: bytes, fds: Sequence[Passed]) -> None:
        was_empty = not self.queue
        if fds or self.packets or was_empty or self.queue[-1][1]:
            self.queue.append([bytearray(data), [os.dup(fd) if isinstance(fd, int) else fd
                                                 for fd in fds], 0])
        else:  # coalesced: what waits goes out in as few writes as the socket allows
            self.queue[-1][0] += data
        self.size += len(data)
        if was_empty:
            self.watch(True)

    def flush(self) -> bool:
        """Write what the socket takes now; True when nothing waits any more. Raises like
        ``write``."""
        if not self.queue:
            return True
        while self.queue and self.sock is not None:
            head = self.queue[0]
            buf, fds, sent = head
            rest = memoryview(buf)[sent:]   # from an offset: deleting the head copies the rest
            try:
                n = socket.send_fds(self.sock, [rest], _numbers(fds)) if fds else self.sock.send(rest)
            except BlockingIOError:
                return False
            except OSError:
                self.clear()
                raise
            finally:
                rest.release()   # the buffer may grow again (coalescing) or be cut
            if fds:
                _close(fds)
                fds.clear()
            self.size -= n
            if sent + n == len(buf):
                self.queue.popleft()
            elif sent + n > len(buf) // 2:  # what was sent goes once it is most of it (coalescing appends)
                del buf[:sent + n]
                head[2] = 0
            else:
                head[2] = sent + n
        if self.queue:
            return False
        self.watch(False)
        return True

    def clear(self) -> None:
        """Drop what waits (the connection it was meant for is gone)."""
        if not self.queue:
            return
        for _buf, fds, _sent in self.queue:
            _close(fds)
        self.queue.clear()
        self.size = 0
        self.watch(False)


def _numbers(fds: Sequence[Passed]) -> List[int]:
    return [fd if isinstance(fd, int) else fd.fileno() for fd in fds]


def _close(fds: List[Passed]) -> None:
    """Close the duplicates the queue made; owners are only let go."""
    for fd in fds:
        if isinstance(fd, int):
            os.close(fd)
