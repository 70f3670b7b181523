"""What the supervisor keeps per eKuiper channel, stable across worker restarts; the
sockets themselves are transport endpoints (``transport/``) handed in.

Per symbol type (README, "Data paths"):

* source: the worker dials eKuiper's PULL socket itself, no hop; no route.
* sink: the supervisor listens on the data path and dials the ack path; items get
  sequence numbers and stay in ``inflight`` until the worker reports them finished
  (or acks them), so a restarted worker gets exactly the unfinished ones again.
* function: the supervisor dials eKuiper's REP socket; a ready worker is lent the
  connection (native transport) or gets each call relayed (nng).
"""
from __future__ import annotations

import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from .. import wire
from ..transport import TransportError

MAX_BATCH = 256     # sink items moved per wake-up


@dataclass
class Item:
    data: bytes
    deliveries: int = 0
    acked: bool = False


class SinkRoute:
    """eKuiper's sink data and ack channels for one sink instance, plus its in-flight items.

    ``pull`` listens on the data path (opened before eKuiper is answered ``ok``), ``ack``
    is dialed to eKuiper's ack path; both are transport endpoints."""

    def __init__(self, ctrl: wire.Control, window: int, max_deliveries: int, pull: Any, ack: Any) -> None:
        self.data_url = wire.data_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
        self.require_ack = wire.require_ack(ctrl.config)
        self.window = window
        self.max_deliveries = max_deliveries
        self.inflight: "OrderedDict[int, Item]" = OrderedDict()
        self.next_seq = 1
        self.pull = pull
        self.ack = ack
        self.fd = pull.fileno()

    def full(self) -> bool:
        return len(self.inflight) >= self.window

    def take(self, delivering: bool = True) -> List[Tuple[int, bytes]]:
        """Move what eKuiper sent into ``inflight``; return the new items
        (``delivering``: they go to a worker now and count as a delivery)."""
        room = min(MAX_BATCH, self.window - len(self.inflight))
        out = []
        for data in self.pull.recv_many(room) if room > 0 else ():
            seq = self.next_seq
            self.next_seq += 1
            self.inflight[seq] = Item(data, deliveries=int(delivering))
            out.append((seq, data))
        return out

    def done(self, upto: int) -> None:
        while self.inflight:
            seq = next(iter(self.inflight))
            if seq > upto:
                break
            del self.inflight[seq]

    def finish(self, seq: int) -> None:
        """Item ``seq`` is finished (acked), whatever came before it."""
        self.inflight.pop(seq, None)

    def acked(self, seq: int, data: bytes) -> None:
        """Forward the worker's ack for ``seq`` unless that item was acked already."""
        item = self.inflight.get(seq)
        if item is None or item.acked or not self.require_ack:
            return
        item.acked = True
        self._send_ack(data)

    def _send_ack(self, data: bytes) -> None:
        try:
            self.ack.send(data)
        except TransportError:
            pass  # eKuiper closed the rule: nobody waits for this ack any more

    def redeliver(self) -> Tuple[List[Tuple[int, bytes]], List[int]]:
        """Items to hand to a replacement worker, and the seqs dropped as poison."""
        again, poison = [], []
        for seq, item in list(self.inflight.items()):
            if item.deliveries >= self.max_deliveries:
                poison.append(seq)
                del self.inflight[seq]
                if self.require_ack and not item.acked:
                    self._send_ack(wire.sink_ack_error(
                        f"item dropped after {item.deliveries} deliveries, each of which "
                        f"ended its worker"))
                continue
            item.deliveries += 1
            again.append((seq, item.data))
        return again, poison

    def fail_all(self, reason: str) -> int:
        """A sink that has failed: error-ack every unfinished item not acked yet, forget them
        all (nothing will finish them); return how many were not acked."""
        n = 0
        for item in self.inflight.values():
            if not item.acked:
                n += 1
                if self.require_ack:
                    self._send_ack(wire.sink_ack_error(reason))
        self.inflight.clear()
        return n

    def refuse(self, reason: str) -> int:
        """A failed sink: answer what eKuiper sends with error acks, or hold it back."""
        if not self.require_ack:
            return 0
        n = 0
        for seq, _data in self.take(False):
            del self.inflight[seq]
            self._send_ack(wire.sink_ack_error(reason))
            n += 1
        return n

    def close(self) -> None:
        for endpoint in (self.pull, self.ack):
            endpoint.close()


@dataclass
class Handoff:
    """eKuiper's function connection as it is lent to a worker (zero-hop functions)."""

    sock: socket.socket
    request_id: int                  # our outstanding request: eKuiper's next call echoes it
    buffered: bytes = b""            # bytes read from the socket and not yet a whole frame
    call: Optional[bytes] = None     # a call that arrived while no worker was ready
    owed: Optional[Tuple[int, str]] = None  # (crc, error): the first call, if it is this one


class FunctionRoute:
    """eKuiper's channel of one function symbol (a REQ endpoint used the inverted way) and
    the call being served on it.

    Relayed (``lendable`` False: the nng transport): the supervisor reads every call and
    forwards it to the worker. Lent (native transport): while a worker is ready, the worker
    owns the connection and answers eKuiper itself; the supervisor holds the channel only
    between workers, and ``owed`` remembers a call a dead worker had begun, so that eKuiper's
    re-sent copy is answered with an error instead of being run twice.
    """

    def __init__(self, channel: Any, lendable: bool = False) -> None:
        self.channel = channel
        self.fd = channel.fileno()
        self.lendable = lendable
        self.lent = False
        self.owed: Optional[Tuple[int, str]] = None
        self.call: Optional[bytes] = None       # eKuiper's request being served
        self.call_id = 0
        self.arrived = 0.0
        self.forwarded = False                  # handed to the current worker

    def take(self, now: float) -> Optional[bytes]:
        """A new call from eKuiper; eKuiper never sends another before the reply."""
        msg = self.channel.recv()
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
        self.channel.send(data)

    def lend(self) -> Handoff:
        """Give the connection, a waiting call and what is owed to a worker."""
        sock, request_id, buffered = self.channel.detach()
        handoff = Handoff(sock, request_id, buffered, self.call, self.owed)
        self.call, self.forwarded, self.owed = None, False, None
        self.lent, self.fd = True, -1
        return handoff

    def close(self) -> None:
        if not self.lent:
            self.channel.close()
