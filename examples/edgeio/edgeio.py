"""The edgeio example: network and file sources and a plotting sink on kuiper_pool.

* source ``http_poll``: GETs ``url`` every ``interval`` seconds and emits the JSON it answers
  (a REST endpoint of a device or gateway); ``count`` > 0 stops after that many.
* source ``file_tail``: follows ``path`` like ``tail -F`` from its start and emits every
  complete line, parsed as JSON when it is JSON, else as ``{"line": text}``.
* sink ``plot``: draws ``y`` (``field``) of the items it collects with matplotlib's Agg
  backend (no display) and writes ``<dir>/plot-<n>.png`` every ``every`` items.

Each runs in its own worker: a hung HTTP call or a slow disk holds up only its own rule.
"""
import json
import os
import threading
import urllib.request

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on an edge box
import matplotlib.pyplot as plt  # noqa: E402

from kuiper_pool import PluginConfig, Sink, Source, plugin  # noqa: E402


class HttpPoll(Source):
    def __init__(self):
        self.stopped = threading.Event()
        self.conf = {}

    def configure(self, datasource, conf):
        if not str(conf.get("url", "")).startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got {conf.get('url')!r}")
        self.conf = conf

    def open(self, ctx):
        url, interval = self.conf["url"], float(self.conf.get("interval", 1.0))
        count, n = int(self.conf.get("count", 0)), 0
        while not self.stopped.is_set() and (not count or n < count):
            try:
                with urllib.request.urlopen(url, timeout=float(self.conf.get("timeout", 5.0))) as r:
                    ctx.emit(json.loads(r.read()), {"url": url, "status": r.status})
                n += 1
            except (OSError, ValueError) as e:  # the device is down or answers garbage: say so, go on
                ctx.get_logger().warning("GET %s failed: %s", url, e)
            self.stopped.wait(interval)

    def close(self, ctx):
        self.stopped.set()


class FileTail(Source):
    def __init__(self):
        self.stopped = threading.Event()
        self.conf = {}

    def configure(self, datasource, conf):
        # eKuiper 2.x passes the stream's DATASOURCE in conf["datasource"] (the official SDK
        # hands ``datasource`` over empty)
        self.conf = dict(conf, path=conf.get("path") or conf.get("datasource") or datasource)
        if not self.conf["path"]:
            raise ValueError("file_tail needs a path (config path or the stream's DATASOURCE)")

    def open(self, ctx):
        path, poll = self.conf["path"], float(self.conf.get("poll", 0.1))
        pending, pos = b"", 0
        while not self.stopped.is_set():
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size < pos:  # truncated or replaced: start over
                        pending, pos = b"", 0
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            pos += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace").rstrip("\r")
                try:
                    item = json.loads(text)
                except ValueError:
                    item = None
                ctx.emit(item if isinstance(item, dict) else {"line": text}, {"file": path})
            self.stopped.wait(poll)

    def close(self, ctx):
        self.stopped.set()


class Plot(Sink):
    def __init__(self):
        self.ys = []
        self.conf = {}
        self.written = 0

    def configure(self, conf):
        self.conf = conf
        os.makedirs(conf["dir"], exist_ok=True)

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        rows = json.loads(data)
        for row in rows if isinstance(rows, list) else [rows]:
            self.ys.append(float(row[self.conf.get("field", "y")]))
        if len(self.ys) >= int(self.conf.get("every", 10)):
            self.draw()
        ctx.ack_ok()

    def draw(self):
        fig, ax = plt.subplots(figsize=(4, 3), dpi=50)
        ax.plot(range(len(self.ys)), self.ys, marker="o")
        ax.set_xlabel("item")
        ax.set_ylabel(self.conf.get("field", "y"))
        fig.savefig(os.path.join(self.conf["dir"], f"plot-{self.written}.png"), metadata={"Software": None})
        plt.close(fig)
        self.written += 1
        self.ys = []

    def close(self, ctx):
        if self.ys:
            self.draw()


SOURCES = {"http_poll": HttpPoll, "file_tail": FileTail}
SINKS = {"plot": Plot}
FUNCTIONS = {}

if __name__ == "__main__":
    plugin.start(PluginConfig("edgeio", SOURCES, SINKS, FUNCTIONS))
