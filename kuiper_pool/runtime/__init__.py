"""The runtime: the supervisor loop, the instance state machine, routes to eKuiper, the
supervisor<->worker link, the zygote, the worker main, health and status.

Imports point down only: the runtime uses ``transport``, ``wire``, ``config``, ``api`` and
``logs``, never ``tools``.
"""
