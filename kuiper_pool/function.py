"""``ekuiper.function`` under kuiper_pool: the same names, kuiper_pool's classes."""
from .api import Context, Function

__all__ = ["Context", "Function"]
