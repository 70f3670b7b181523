"""``ekuiper.source`` under kuiper_pool: the same names, kuiper_pool's classes."""
from .api import Context, Source

__all__ = ["Context", "Source"]
