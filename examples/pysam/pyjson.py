"""pyjson: a source that emits a small JSON record with a counter at a fixed interval."""
import threading

from kuiper_pool import Source, Context


NAMES = ["pyjson", "ekuiper", "stream", "rule", "sink"]


class PyJson(Source):
    """Emits ``{"name": <a word>, "value": <counter>}`` every ``interval`` seconds; the word
    cycles through NAMES, so every row differs and ``revert`` shows something new each time.

    Config (``sources/pyjson.yaml``, overridable per stream): ``interval``
    (seconds, default 0.2) and ``start`` (first counter value, default 1).
    """

    def __init__(self):
        self.stopped = threading.Event()
        self.interval = 0.2
        self.first = 1
        self.datasource = ""

    def configure(self, datasource: str, conf: dict):
        self.datasource = datasource
        self.interval = float(conf.get("interval", self.interval))
        self.first = int(conf.get("start", self.first))
        if self.interval < 0:
            raise ValueError(f"interval must not be negative, got {self.interval}")
        print(f"pyjson: configured datasource={datasource!r} interval={self.interval}", flush=True)

    def open(self, ctx: Context):
        print(f"pyjson: opening for rule {ctx.get_rule_id()}", flush=True)
        value = self.first
        # wait() instead of sleep(): close() sets the event and open returns at once
        while not self.stopped.is_set():
            ctx.emit({"name": NAMES[(value - 1) % len(NAMES)], "value": value}, None)
            value += 1
            self.stopped.wait(self.interval)
        print("pyjson: closed", flush=True)

    def close(self, ctx: Context):
        print("pyjson: closing", flush=True)
        self.stopped.set()
