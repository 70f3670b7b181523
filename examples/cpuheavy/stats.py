"""stats: a sink that prints a running summary of the ticker gaps it receives."""
import json
from typing import Any

from kuiper_pool import Sink, Context


class StatsSink(Sink):
    """Prints ``rows`` and the largest ``gap_ms`` seen so far; acks with requireAck."""

    def __init__(self):
        self.require_ack = False
        self.rows = 0
        self.max_gap = 0.0

    def configure(self, conf: dict):
        self.require_ack = bool(conf.get("requireAck", False))

    def open(self, ctx: Context):
        pass

    def collect(self, ctx: Context, data: Any):
        rows = json.loads(data)
        for row in rows if isinstance(rows, list) else [rows]:
            self.rows += 1
            self.max_gap = max(self.max_gap, float(row.get("gap_ms", 0)))
        print(f"stats: rows={self.rows} max_gap_ms={self.max_gap}", flush=True)
        if self.require_ack:
            ctx.ack_ok()

    def close(self, ctx: Context):
        print(f"stats: closing after {self.rows} rows, max_gap_ms={self.max_gap}", flush=True)
