"""eKuiper's sockets: SP over ipc spoken natively (``sp``) and the pynng fallback (``nng``).
Nothing here imports the runtime."""
import importlib
from types import ModuleType


class TransportError(OSError):
    """eKuiper's channel cannot be opened or used (one line)."""


class TransportTimeout(TransportError):
    """A send did not complete within its timeout."""


def load(name: str) -> ModuleType:
    """The transport module by its setting's name (``sp`` or ``nng``); pynng is imported
    only for ``nng``."""
    return importlib.import_module(f"{__name__}.{name}")
