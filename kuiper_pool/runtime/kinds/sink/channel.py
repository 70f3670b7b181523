"""A sink instance's I/O on eKuiper's sockets (the supervisor's side): listening on its
data path, dialing its ack path, and lending both connections to an acked sink's worker
under the native transport (docs/protocol.md, "Sinks"). Built on the effects' primitives;
:class:`SinkIO` is what a recorder replaces.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Tuple

from .... import wire
from . import frames
from .page import SinkPage

if TYPE_CHECKING:
    from ...effects import Effects, WorkerHandle
    from ...instances import Instance


class SinkIO:
    """Opening, closing, lending and taking back a sink's data and ack connections."""

    def __init__(self, fx: "Effects") -> None:
        self.fx = fx

    def open_sink(self, inst: "Instance") -> Tuple[Any, Any]:
        """(pull, ack): the data path listened on, the ack path dialed (OSError: cannot)."""
        ctrl = inst.ctrl
        transport = self.fx.transport
        data_url = wire.data_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
        pull = transport.PullEndpoint(data_url, spill=frames.SPILL, notice=inst.route.on_notice)
        ack_url = wire.ack_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
        try:
            # dialed and written without ever blocking the loop: native, the route watches
            # it; nng dials in its threads and the route's ticks hand it queued acks
            ack = transport.PushDialer(ack_url)
        except OSError:
            pull.close()
            raise
        self.fx.own_path(wire.ipc_path(data_url))
        return pull, ack

    def close_sink(self, inst: "Instance", pull: Any, ack: Any) -> None:
        for endpoint in (pull, ack):
            self.fx.watch(inst, endpoint, False)
        ctrl = inst.ctrl
        self.fx.disown_path(wire.ipc_path(wire.data_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)))
        for endpoint in (pull, ack):
            endpoint.close()

    def lend_sink(self, w: "WorkerHandle", pull: Any, ack: Any) -> bool:
        """Lend copies of eKuiper's sink data connection (when idle) and ack connection
        (when connected, past its greeting, with an empty outbox: the worker's acks must not
        overtake ours) to ``w``; we keep ours, to read the data connection again after the
        worker. False: not now."""
        if (not self.fx.lends or not isinstance(w.page, SinkPage)
                or ack.sock is None or ack.greeting is not None or ack.pending()):
            return False
        data = pull.lend()
        if data is None:
            return False
        if not self.fx.send(w, frames.conn(), [data.fileno(), ack.sock.fileno()]):
            pull.resume()   # it has exited: read here again
            return False
        return True

    def take_back_sink(self, pull: Any) -> None:
        """Read the data connection here again."""
        pull.resume()
