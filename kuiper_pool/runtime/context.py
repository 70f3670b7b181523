"""The ``Context`` a worker hands to plugin code."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from .. import logs, wire
from ..api import Context

if TYPE_CHECKING:
    from .state import LocalState


class WorkerContext(Context):
    """Context of one source, sink or function instance inside its worker.

    A source emits straight to eKuiper's socket (``send``); a sink's acks go to
    the supervisor over the worker link, which forwards exactly one per item, or, while
    an acked sink holds eKuiper's lent connections (native transport), straight to eKuiper.
    ``emit_error`` sends nothing: eKuiper 2.x would decode ``{"error": ...}`` as an empty
    row and ingest it; the error is logged and counted (``errors``) instead.
    State lives in the worker's ``LocalState`` (shared by the contexts of one rule), every
    change also goes to the supervisor (``state.py``).
    """

    def __init__(self, symbol: str, rule_id: str, op_id: str, instance_id: int, state: LocalState,
                 send: Optional[Callable[[bytes], None]] = None,
                 ack: Optional[Callable[[bytes], None]] = None) -> None:
        self._rule_id, self._op_id, self._instance_id = rule_id, op_id, instance_id
        self._state = state
        self._logger = logs.instance_logger(symbol, rule_id, op_id, instance_id)
        self._send = send
        self._ack = ack
        self.closing = False
        self.errors = 0

    def get_rule_id(self) -> str:
        return self._rule_id

    def get_op_id(self) -> str:
        return self._op_id

    def get_instance_id(self) -> int:
        return self._instance_id

    def get_logger(self) -> logging.Logger:
        return self._logger

    def emit(self, message: dict, meta: Optional[dict] = None) -> None:
        if self._send is None:
            raise RuntimeError("emit is only available to sources")
        if not self.closing:  # after stop eKuiper no longer reads: drop instead of blocking
            self._send(wire.source_message(message, meta))

    def emit_error(self, error: str) -> None:
        if self._send is None:
            raise RuntimeError("emit_error is only available to sources")
        self.errors += 1
        self._logger.error("emit_error: %s (not sent: eKuiper 2.x would ingest it as an empty row)",
                           " ".join(str(error).split()))

    def ack_ok(self) -> None:
        if self._ack is not None:
            self._ack(wire.SINK_ACK_OK)

    def ack_error(self, error: str) -> None:
        if self._ack is not None:
            self._ack(wire.sink_ack_error(error))

    def put_state(self, key: str, value: Any) -> None:
        self._state.put(self._rule_id, key, value)

    def get_state(self, key: str, default: Any = None) -> Any:
        return self._state.get(self._rule_id, key, default)

    def delete_state(self, key: str) -> None:
        self._state.delete(self._rule_id, key)
