"""Two CPU-bound functions written in pure Python (they hold the GIL while they run)."""
import time
from typing import Any, List

from kuiper_pool import Function, Context


def _positive_int(args: List[Any], name: str) -> str:
    if len(args) != 1:
        return f"{name} takes exactly 1 argument, got {len(args)}"
    return ""


class BurnFunc(Function):
    """``burn(loops)``: a tight arithmetic loop; returns ``{"loops", "ms"}``."""

    def validate(self, args: List[Any]):
        return _positive_int(args, "burn")

    def exec(self, args: List[Any], ctx: Context):
        loops = int(args[0])
        start = time.perf_counter()
        acc = 0
        for i in range(loops):
            acc = (acc + i * i) % 1000003
        return {"loops": loops, "ms": round((time.perf_counter() - start) * 1000, 1)}

    def is_aggregate(self):
        return False


class PrimesFunc(Function):
    """``primes(n)``: counts the primes below ``n`` by trial division."""

    def validate(self, args: List[Any]):
        return _positive_int(args, "primes")

    def exec(self, args: List[Any], ctx: Context):
        n = int(args[0])
        count = 0
        for k in range(2, n):
            d = 2
            while d * d <= k:
                if k % d == 0:
                    break
                d += 1
            else:
                count += 1
        return count

    def is_aggregate(self):
        return False
