"""cpuheavy: why kuiper_pool exists.

A chatty source (``ticker``) next to two CPU-bound functions (``burn``, ``primes``)
and a small sink (``stats``). Under the official SDK all of them are threads of
one process: while a function computes, the GIL starves the ticker and its
``gap_ms`` jumps from ~1 ms to tens or hundreds of ms. Under kuiper_pool every
symbol instance runs in its own worker process and the ticker keeps its pace.
"""
from kuiper_pool import plugin, PluginConfig

from heavy import BurnFunc, PrimesFunc
from stats import StatsSink
from ticker import Ticker

if __name__ == "__main__":
    plugin.start(PluginConfig("cpuheavy",
                              sources={"ticker": lambda: Ticker()},
                              sinks={"stats": lambda: StatsSink()},
                              functions={"burn": lambda: BurnFunc(), "primes": lambda: PrimesFunc()}))
