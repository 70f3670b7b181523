"""A function symbol's I/O on eKuiper's function socket (the supervisor's side): the
channel (a REQ endpoint used the inverted way: eKuiper's call is the reply to our request)
and, under the native transport, its connection lent to a worker (docs/protocol.md,
"Functions"). Built on the effects' primitives; :class:`FunctionIO` is what a recorder or
another front end (``serve``) replaces.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any, Optional

from .... import wire
from ....transport import req_endpoint
from .frames import Conn, Owed

if TYPE_CHECKING:
    from ...effects import Effects, WorkerHandle
    from ...instances import Instance

class Handoff:
    """eKuiper's function connection as it is lent to a worker (zero-hop functions)."""

    __slots__ = ("sock", "request_id", "buffered", "call", "owed")

    def __init__(self, sock: socket.socket, request_id: int, buffered: bytes = b"",
                 call: Optional[bytes] = None, owed: Optional[Owed] = None) -> None:
        self.sock = sock
        self.request_id = request_id  # our outstanding request: eKuiper's next call echoes it
        self.buffered = buffered      # bytes read from the socket and not yet a whole frame
        self.call = call              # a call that arrived while no worker was ready
        self.owed = owed              # the first call, if it is this one

    def conn(self) -> Conn:
        return Conn(self.request_id, self.owed, self.buffered, self.call)


class FunctionChannel:
    """One connection to eKuiper's function socket (``req``, a transport REQ endpoint)
    and the call being served on it."""

    def __init__(self, req: Any, lendable: bool = False) -> None:
        self.req = req
        self.fd = req.fileno()
        self.lendable = lendable
        self.lent = False
        self.owed: Optional[Owed] = None
        self.call: Optional[bytes] = None       # eKuiper's request being served
        self.call_id = 0
        self.arrived = 0.0
        self.forwarded = False                  # handed to the current worker

    def take(self, now: float) -> Optional[bytes]:
        """A new call from eKuiper; eKuiper never sends another before the reply."""
        msg = self.req.recv()
        if msg is None:
            return None
        self.call_id += 1
        self.call = msg
        self.arrived = now
        self.forwarded = False
        return msg

    def reply(self, data: bytes) -> None:
        self.call = None
        self.forwarded = False
        self.req.send(data)

    def lend(self) -> Handoff:
        """Give the connection, a waiting call and what is owed to a worker."""
        sock, request_id, buffered = self.req.detach()
        handoff = Handoff(sock, request_id, buffered, self.call, self.owed)
        self.call, self.forwarded, self.owed = None, False, None
        self.lent, self.fd = True, -1
        return handoff

    def close(self) -> None:
        if not self.lent:
            self.req.close()


class FunctionIO:
    """Opening, closing and lending a function's channel, through the effects."""

    def __init__(self, fx: "Effects") -> None:
        self.fx = fx

    def open_function(self, inst: "Instance") -> FunctionChannel:
        """A new channel, dialed in the loop, never waited for: the route answers the first
        start once it is up, or refuses it after dial_timeout (OSError: no socket)."""
        return FunctionChannel(req_endpoint(self.fx.transport_name, wire.function_url(inst.ctrl.symbol), 0.0),
                               self.fx.lends)

    def close_function(self, inst: "Instance", channel: FunctionChannel) -> None:
        if channel.fd >= 0:
            self.fx.watch(inst, channel.req, False)
        channel.close()

    def hand_over(self, w: "WorkerHandle", handoff: Handoff) -> None:
        """Lend the connection to ``w`` (CONN with its fd)."""
        try:
            self.fx.send(w, handoff.conn().encode(), [handoff.sock.fileno()])
        finally:
            handoff.sock.close()  # the worker holds it now; its death closes the connection
