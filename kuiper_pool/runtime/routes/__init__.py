"""Each route kind owns its instance's data path behind one interface (``base.Route``):

* ``source``: none; the worker dials eKuiper itself;
* ``sink``: read, window, in-flight table, redelivery, poison, one ack per item;
* ``function``: calls, lending the connection, taking it back, call_deadline, owed calls.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ... import wire
from .base import Counts, Route
from .function import FunctionChannel, FunctionRoute, Handoff
from .sink import SinkRoute
from .source import SourceRoute

if TYPE_CHECKING:
    from ..instances import Instance

KINDS = {wire.TYPE_SOURCE: SourceRoute, wire.TYPE_SINK: SinkRoute, wire.TYPE_FUNC: FunctionRoute}


def route_for(inst: "Instance") -> Route:
    """The route of ``inst``'s kind."""
    return KINDS[inst.kind](inst)


__all__ = ["Counts", "FunctionChannel", "FunctionRoute", "Handoff", "Route", "SinkRoute",
           "SourceRoute", "route_for"]
