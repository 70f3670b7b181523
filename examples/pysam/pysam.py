"""The pysam example plugin (pyjson source, print sink, revert function) on kuiper_pool.

eKuiper runs this file as ``python -u pysam.py '{"sendTimeout":1000}'`` from this
folder; ``plugin.start`` never returns.
"""
from kuiper_pool import plugin, PluginConfig

from print import PrintSink
from pyjson import PyJson
from revert import RevertFunc

if __name__ == "__main__":
    config = PluginConfig("pysam",
                          sources={"pyjson": lambda: PyJson()},
                          sinks={"print": lambda: PrintSink()},
                          functions={"revert": lambda: RevertFunc()})
    plugin.start(config)
