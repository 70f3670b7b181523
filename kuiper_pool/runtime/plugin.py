"""``ekuiper.runtime.plugin`` under kuiper_pool: ``PluginConfig`` and ``start`` (and the
classes the official module imports), re-exported. Importing it loads no supervisor or
worker code; ``start`` does that when it runs."""
from ..api import Function, PluginConfig, Sink, Source
from ..plugin import start

__all__ = ["Function", "PluginConfig", "Sink", "Source", "start"]
