"""The kinds of instance, one package each: ``source``, ``sink``, ``function``. A kind's
package holds both halves of its protocol: ``route.py`` (the supervisor's half, behind
``base.Route``), ``serve.py`` (the worker's half) and what only they share (its frames,
pages, and ``channel.py``: its I/O on eKuiper's sockets, over the effects' primitives).

A kind's modules are imported when the first instance of that kind starts, not before: a
kind whose code cannot be loaded (a module missing from an installed copy, a dependency
that fails) refuses only its own starts, and every other kind keeps serving. No kind
imports another.
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from ... import wire

if TYPE_CHECKING:
    from ..instances import Instance
    from ..worker import Worker
    from .base import Route

PACKAGES = {wire.TYPE_SOURCE: "source", wire.TYPE_SINK: "sink", wire.TYPE_FUNC: "function"}
ROUTES = {wire.TYPE_SOURCE: "SourceRoute", wire.TYPE_SINK: "SinkRoute", wire.TYPE_FUNC: "FunctionRoute"}


def module(kind: str, half: str) -> Any:
    """``kinds.<kind>.<half>`` (ImportError, or whatever the module raises, when the kind's
    code cannot be loaded)."""
    return importlib.import_module(f"{__name__}.{PACKAGES[kind]}.{half}")


def route_for(inst: "Instance") -> "Route":
    """The supervisor's half of ``inst``'s kind, for ``inst``."""
    return getattr(module(inst.kind, "route"), ROUTES[inst.kind])(inst)


_serve: "Dict[str, Callable[[Worker, Any], int]]" = {}


def serve_for(kind: str) -> "Callable[[Worker, Any], int]":
    """The worker's half of ``kind``: ``run(worker, plugin object)`` -> the exit code. Kept
    once loaded: a worker forked after the zygote's preload finds it without running the
    import machinery (whose objects it would copy from the zygote)."""
    run = _serve.get(kind)
    if run is None:
        run = _serve[kind] = module(kind, "serve").run
    return run


def preloads() -> "List[Callable[[], None]]":
    """For the zygote: one step per kind that imports its worker half, so that each worker
    forked after shares it instead of importing its own. A kind that cannot be loaded is
    left to its starts, which import it again and answer why (every other kind serves on)."""
    return [partial(_preload, kind) for kind in PACKAGES]


def _preload(kind: str) -> None:
    try:
        serve_for(kind)
    except Exception:  # noqa: BLE001 - said at each start of that kind (worker.run)
        pass
