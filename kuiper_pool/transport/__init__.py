"""eKuiper's sockets: SP over ipc spoken natively (``sp``) and the pynng fallback (``nng``).
Nothing here imports the runtime."""
