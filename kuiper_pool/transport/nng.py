"""eKuiper's sockets through pynng: the fallback transport (``transport: nng``).

The same endpoint interface as :mod:`.sp`; every message crosses nng's threads (about
25-35 µs of hand-offs each, docs/transport.md), and a connection cannot be lent to a worker,
so function calls are relayed by the supervisor.
"""
from __future__ import annotations

import os
import select
import time
from collections import deque
from typing import Any, Deque, List, Optional

import pynng

from .. import wire
from . import TransportError, TransportTimeout

KEEPALIVE = 5.0     # seconds idle before re-sending b"handshake", as eKuiper expects
SEND_BUFFER = 1024  # acks nng's threads hold for eKuiper (NNG_OPT_SENDBUF; nng allows up to 8192)


def dial(sock: pynng.Socket, url: str, timeout: float) -> None:
    """Dial synchronously, retrying until ``timeout`` (eKuiper may listen a moment later);
    0: start nng's dialer in the background and return at once (nng connects and redials by
    itself), for a selector loop that must never wait."""
    if timeout <= 0:
        sock.dial(url, block=False)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.dial(url, block=True)
            return
        except pynng.NNGException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class ReqEndpoint:
    """A REQ socket used the eKuiper way: its requests are our answers, its replies are
    eKuiper's commands (control channel) or function calls (function channels). With
    ``dial_timeout`` 0 (function channels, dialed in the loop) nothing waits: the handshake
    goes out in ``tick`` once nng has connected."""

    def __init__(self, url: str, dial_timeout: float) -> None:
        self.url = url
        self.sock = pynng.Req0(resend_time=0)
        try:
            dial(self.sock, url, dial_timeout)
        except pynng.NNGException as e:
            self.sock.close()
            raise TransportError(f"cannot dial {url}: {e}") from None
        self.unsent: Optional[bytes] = None
        self.waiting = False        # a request from eKuiper is being served
        self.last_sent = 0.0
        self.send(wire.HANDSHAKE)

    def fileno(self) -> int:
        return self.sock.recv_fd

    def connected(self) -> bool:
        return bool(self.sock.pipes)

    def recv(self) -> Optional[bytes]:
        """eKuiper's next message, or None if there is none yet."""
        try:
            msg = self.sock.recv(block=False)
        except (pynng.TryAgain, pynng.ConnectionReset):  # reset: eKuiper's pipe closed; redialed
            return None
        except RuntimeError:  # pynng 0.8 cannot unpack a 0-byte message
            msg = b""
        self.waiting = True
        return msg

    def send(self, data: bytes) -> None:
        """Answer (or handshake); kept and retried by ``tick`` while eKuiper is unreachable."""
        self.waiting = False
        self.unsent = data
        self._flush()

    def _flush(self) -> None:
        try:
            self.sock.send(self.unsent, block=False)
        except pynng.TryAgain:
            return
        self.unsent = None
        self.last_sent = time.monotonic()

    def tick(self, now: float) -> None:
        if self.unsent is not None:
            self._flush()
        elif not self.waiting and now - self.last_sent > KEEPALIVE:
            self.send(wire.HANDSHAKE)

    def close(self) -> None:
        self.sock.close()


class PullEndpoint:
    """Sink data over pynng: listens; ``recv_many`` returns what is there now, always as
    bytes (pynng has received a message whole before we see it: ``spill`` is not used, and
    nng tells of no message it drops, so ``notice`` is never called)."""

    def __init__(self, url: str, spill: int = 0, notice: Any = None) -> None:
        self.sock = pynng.Pull0(recv_max_size=0)  # nng's 1 MiB default drops bigger items silently
        try:
            self.sock.listen(url)
            os.chmod(wire.ipc_path(url), 0o600)
        except (pynng.NNGException, OSError) as e:
            self.sock.close()
            raise TransportError(f"cannot listen on {url}: {e}") from None
        self._readable = select.poll()
        self._readable.register(self.sock.recv_fd, select.POLLIN)

    def fileno(self) -> int:
        return self.sock.recv_fd

    def recv_many(self, n: int) -> List[bytes]:
        out: List[bytes] = []
        while len(out) < n:
            if out and not self._readable.poll(0):
                break  # drained: asking the fd is cheaper than a TryAgain from nng
            try:
                out.append(self.sock.recv(block=False))
            except pynng.TryAgain:
                break
            except RuntimeError:  # pynng 0.8 cannot unpack a 0-byte message
                out.append(b"")
        return out

    def close(self) -> None:
        self.sock.close()


class PushDialer:
    """Sink acks over pynng for a selector loop (the supervisor): never blocks. ``send``
    hands nng what it takes now and queues the rest, in order; ``tick`` retries (the loop
    ticks every few ms); ``pending`` says how much waits, for the owner's back-pressure, as
    the native transport's PushDialer. nng dials and redials in its own threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        # without a buffer a non-blocking send succeeds only while no write is under way:
        # nng's threads write this many acks on their own, the queue here holds the rest
        self.sock = pynng.Push0(send_buffer_size=SEND_BUFFER)
        self.queue: Deque[bytes] = deque()
        self.queued = 0
        try:
            dial(self.sock, url, 0)
        except pynng.NNGException as e:
            self.sock.close()
            raise TransportError(f"cannot dial {url}: {e}") from None

    def send(self, data: bytes) -> None:
        self.queue.append(data)
        self.queued += len(data)
        self.pump(0.0)

    def pump(self, now: float) -> None:
        """Hand nng what it takes now."""
        while self.queue:
            try:
                self.sock.send(self.queue[0], block=False)
            except pynng.TryAgain:
                return
            except pynng.NNGException as e:
                raise TransportError(f"{self.url}: {e}") from None
            self.queued -= len(self.queue.popleft())

    def fileno(self) -> int:
        """Nothing for a loop to watch: ``tick`` retries."""
        return -1

    def tick(self, now: float) -> None:
        self.pump(now)

    def pending(self) -> int:
        return self.queued

    def close(self) -> None:
        self.sock.close()


class PushEndpoint:
    """A source's items over pynng (in its worker): dials eKuiper's data path; a send
    waits up to ``send_timeout``."""

    def __init__(self, url: str, dial_timeout: float, send_timeout: float) -> None:
        self.url = url
        self.sock = pynng.Push0(send_timeout=int(send_timeout * 1000))
        try:
            dial(self.sock, url, dial_timeout)
        except pynng.NNGException as e:
            self.sock.close()
            raise TransportError(f"cannot dial {url}: {e}") from None

    def send(self, data: bytes) -> None:
        """Send one message; TransportTimeout when the peer takes nothing within send_timeout."""
        try:
            self.sock.send(data)
        except pynng.Timeout:
            raise TransportTimeout(f"{self.url}: the peer took nothing in time") from None
        except pynng.NNGException as e:
            raise TransportError(f"{self.url}: {e}") from None

    def close(self) -> None:
        self.sock.close()
