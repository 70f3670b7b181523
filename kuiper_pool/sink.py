"""``ekuiper.sink`` under kuiper_pool: the same names, kuiper_pool's classes."""
from .api import Context, Sink

__all__ = ["Context", "Sink"]
