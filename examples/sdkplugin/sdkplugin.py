"""A plugin written for the official eKuiper Python SDK, with its imports as they are.

It runs unchanged under kuiper_pool when eKuiper's ``portable.pythonBin`` is
``kuiper-pool-python``: ``import ekuiper`` resolves to kuiper_pool in this process only.
CI runs it through eKuiper's runtime stand-in that way, on the installed wheel.

- source ``readings``: emits ``{"seq": n, "ds": <datasource>, "celsius": ...}`` every
  ``interval`` seconds (default 0.05), with the rule id in its meta;
- sink ``tally``: counts items, acks each one when the rule asks for acks;
- function ``mirror``: returns its one string argument reversed.
"""
import threading
from typing import Any, List

from ekuiper import Context, Function, PluginConfig, Sink, Source, plugin


class Readings(Source):
    def configure(self, datasource: str, conf: dict):
        self.datasource = datasource
        self.interval = float(conf.get("interval", 0.05))
        self.stopped = threading.Event()

    def open(self, ctx: Context):
        seq = 0
        while not self.stopped.is_set():
            ctx.emit({"seq": seq, "ds": self.datasource, "celsius": 20 + seq % 7 * 0.5},
                     {"rule": ctx.get_rule_id()})
            seq += 1
            self.stopped.wait(self.interval)

    def close(self, ctx: Context):
        self.stopped.set()


class Tally(Sink):
    def configure(self, conf: dict):
        self.ack = conf.get("requireAck") is True
        self.count = 0

    def open(self, ctx: Context):
        ctx.get_logger().info("tally open for rule %s", ctx.get_rule_id())

    def collect(self, ctx: Context, data: Any):
        self.count += 1
        if self.ack:
            ctx.ack_ok()

    def close(self, ctx: Context):
        ctx.get_logger().info("tally closed after %d items", self.count)


class Mirror(Function):
    def validate(self, args: List[Any]):
        return "" if len(args) == 1 else f"mirror takes 1 argument, got {len(args)}"

    def exec(self, args: List[Any], ctx: Context):
        return str(args[0])[::-1]

    def is_aggregate(self):
        return False


if __name__ == "__main__":
    plugin.start(PluginConfig("sdkplugin", {"readings": lambda: Readings()},
                              {"tally": lambda: Tally()}, {"mirror": lambda: Mirror()}))
