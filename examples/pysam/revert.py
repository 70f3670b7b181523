"""revert: a function that reverses a string."""
from typing import Any, List

from kuiper_pool import Function, Context


class RevertFunc(Function):
    """``revert(col)`` returns the string ``col`` reversed."""

    def validate(self, args: List[Any]):
        if len(args) != 1:
            return f"revert takes exactly 1 argument, got {len(args)}"
        return ""

    def exec(self, args: List[Any], ctx: Context):
        value = args[0]
        if not isinstance(value, str):
            raise TypeError(f"revert needs a string, got {type(value).__name__}")
        return value[::-1]

    def is_aggregate(self):
        return False
