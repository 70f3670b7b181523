"""print: a sink that prints every item it receives."""
from typing import Any

from kuiper_pool import Sink, Context


class PrintSink(Sink):
    """Prints each item. Acks only when the rule sets ``requireAck`` (eKuiper reads
    no acks otherwise, so unread acks would pile up)."""

    def __init__(self):
        self.require_ack = False

    def configure(self, conf: dict):
        self.require_ack = bool(conf.get("requireAck", False))
        print(f"print: configured requireAck={self.require_ack}", flush=True)

    def open(self, ctx: Context):
        print(f"print: open for rule {ctx.get_rule_id()}", flush=True)

    def collect(self, ctx: Context, data: Any):
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        print(f"print: receive {data}", flush=True)
        if self.require_ack:
            ctx.ack_ok()

    def close(self, ctx: Context):
        print("print: closing", flush=True)
