"""ticker: emits fast and reports how late each emission was."""
import threading
import time

from kuiper_pool import Source, Context


class Ticker(Source):
    """Emits ``{"seq": n, "ts": <epoch s>, "gap_ms": <ms since the previous emit>}``
    every ``interval`` seconds (default 0.001). A starved ticker shows large gaps."""

    def __init__(self):
        self.stopped = threading.Event()
        self.interval = 0.001

    def configure(self, datasource: str, conf: dict):
        self.interval = float(conf.get("interval", self.interval))
        if self.interval < 0:
            raise ValueError(f"interval must not be negative, got {self.interval}")

    def open(self, ctx: Context):
        seq, last = 0, time.perf_counter()
        while not self.stopped.is_set():
            now = time.perf_counter()
            seq += 1
            ctx.emit({"seq": seq, "ts": time.time(), "gap_ms": round((now - last) * 1000, 2)}, None)
            last = now
            self.stopped.wait(self.interval)

    def close(self, ctx: Context):
        self.stopped.set()
