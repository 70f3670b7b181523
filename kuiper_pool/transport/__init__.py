"""eKuiper's sockets: SP over ipc spoken natively (``sp``) and the pynng fallback (``nng``).
Nothing here imports the runtime."""


class TransportError(OSError):
    """eKuiper's channel cannot be opened or used (one line)."""


class TransportTimeout(TransportError):
    """A send did not complete within its timeout."""
