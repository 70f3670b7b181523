"""eKuiper's sockets: SP over ipc spoken natively (``sp``) and the pynng fallback (``nng``).
Nothing here imports the runtime."""
import importlib
from types import ModuleType
from typing import Any


class TransportError(OSError):
    """eKuiper's channel cannot be opened or used (one line)."""


class TransportTimeout(TransportError):
    """A send did not complete within its timeout."""


def load(name: str) -> ModuleType:
    """The transport module by its setting's name (``sp`` or ``nng``); pynng is imported
    only for ``nng``."""
    return importlib.import_module(f"{__name__}.{name}")


def req_endpoint(name: str, url: str, dial_timeout: float) -> Any:
    """A REQ endpoint used the inverted way (control and function channels); it sends the
    handshake as soon as it connects. ``dial_timeout`` 0 means "start unconnected, never
    wait" (the loop's function channels): both transports then connect in the background."""
    return load(name).ReqEndpoint(url, dial_timeout)
