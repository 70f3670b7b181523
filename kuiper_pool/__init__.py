"""kuiper_pool: run eKuiper Python plugins with one supervised worker process per symbol.

Drop-in replacement for the official SDK: change ``from ekuiper import ...`` to
``from kuiper_pool import ...``.
"""
from . import plugin
from .api import Context, Function, PluginConfig, Sink, Source
from .version import __version__

__all__ = ["plugin", "PluginConfig", "Source", "Sink", "Function", "Context"]
