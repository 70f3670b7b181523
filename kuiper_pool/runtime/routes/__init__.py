"""Each route kind owns its instance's data path behind one interface (``base.Route``):

* ``source``: none; the worker dials eKuiper itself;
* ``sink``: read, window, in-flight table, redelivery, poison, one ack per item;
* ``function``: calls, lending the connection, taking it back, call_deadline, owed calls.

A kind's module is imported when the first instance of that kind starts, not before: a
kind whose code cannot be loaded (a module missing from an installed copy, a dependency
that fails) refuses only its own starts, and every other kind keeps serving.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ... import wire

if TYPE_CHECKING:
    from ..instances import Instance
    from .base import Route

MODULES = {wire.TYPE_SOURCE: ("source", "SourceRoute"), wire.TYPE_SINK: ("sink", "SinkRoute"),
           wire.TYPE_FUNC: ("function", "FunctionRoute")}


def route_for(inst: "Instance") -> "Route":
    """The route of ``inst``'s kind (ImportError, or whatever the module raises, when the
    kind's code cannot be loaded)."""
    module, name = MODULES[inst.kind]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(inst)
