"""The benchmark plugin, written once for both runtimes.

``BENCH_RUNTIME=official`` imports the official SDK (``ekuiper``); anything else imports
kuiper_pool. The driver (bench/run.py) copies this file into a fresh plugin folder per run
and passes, through the emulator's ``Host(env=...)``:

* ``BENCH_PLUGIN``  the plugin name (unique per run: ipc paths in /tmp are global);
* ``BENCH_PREFIX``  prefix of every function symbol (``/tmp/func_<symbol>.ipc`` is global too);
* ``BENCH_PID_SYMBOLS`` how many ``<prefix>pid<i>`` functions to declare (restart timing).

Symbols: sources ``flood`` (emits as fast as it can), ``idle`` (emits nothing) and ``clock``
(emits once the wall-clock time it emitted at: bench/startup.py's first item);
sink ``count`` (counts items, acks with requireAck, touches a marker file at the
expected count); functions ``<prefix>noop`` (returns its argument), ``<prefix>nbytes``
(returns its argument's length: a big payload in, a small result out), ``<prefix>burna`` and
``<prefix>burnb`` (a CPU-bound pure-Python loop) and ``<prefix>pid<i>`` (returns the pid
of the process that serves it).
"""
import os
import threading
import time

if os.environ.get("BENCH_RUNTIME") == "official":
    from ekuiper import Function, PluginConfig, Sink, Source, plugin
else:
    from kuiper_pool import Function, PluginConfig, Sink, Source, plugin


class Flood(Source):
    """Emits ``{"i": n, "pad": "x" * size}`` back to back until closed."""

    def __init__(self):
        self.stopped = False
        self.size = 0

    def configure(self, datasource, conf):
        self.size = int(conf.get("size", 0))

    def open(self, ctx):
        pad = "x" * self.size
        emit = ctx.emit
        i = 0
        while not self.stopped:
            emit({"i": i, "pad": pad}, None)
            i += 1

    def close(self, ctx):
        self.stopped = True


class Idle(Source):
    """Emits nothing; what one running source instance costs in memory."""

    def __init__(self):
        self.stopped = threading.Event()

    def configure(self, datasource, conf):
        pass

    def open(self, ctx):
        self.stopped.wait()

    def close(self, ctx):
        self.stopped.set()


class Clock(Idle):
    """Emits ``{"t": time.time()}`` once, then nothing until closed."""

    def open(self, ctx):
        ctx.emit({"t": time.time()}, None)
        super().open(ctx)


class Count(Sink):
    """Counts items; with requireAck acks each; creates ``conf["marker"]`` when the
    ``conf["expect"]``-th item has been collected."""

    def __init__(self):
        self.n = 0
        self.expect = 0
        self.marker = ""
        self.ack = False

    def configure(self, conf):
        self.expect = int(conf.get("expect", 0))
        self.marker = str(conf.get("marker", ""))
        self.ack = bool(conf.get("requireAck", False))

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        self.n += 1
        if self.ack:  # never without requireAck: the official SDK's unread acks kill the sink
            ctx.ack_ok()
        if self.n == self.expect and self.marker:
            os.close(os.open(self.marker, os.O_WRONLY | os.O_CREAT, 0o644))

    def close(self, ctx):
        pass


class Noop(Function):
    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return args[0]

    def is_aggregate(self):
        return False


class NBytes(Function):
    """An image in, a small result out: returns the length of its first argument."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return len(args[0])

    def is_aggregate(self):
        return False


class Burn(Function):
    """``burn(loops)``: pure-Python arithmetic, holds the GIL for the whole call."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        t0 = time.perf_counter()
        acc = 0
        for i in range(int(args[0])):
            acc = (acc + i * i) % 1000003
        return {"acc": acc, "ms": (time.perf_counter() - t0) * 1000}

    def is_aggregate(self):
        return False


class Pid(Function):
    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        return os.getpid()

    def is_aggregate(self):
        return False


def config():
    name = os.environ["BENCH_PLUGIN"]
    prefix = os.environ.get("BENCH_PREFIX", name)
    functions = {prefix + "noop": lambda: Noop(), prefix + "nbytes": lambda: NBytes(),
                 prefix + "burna": lambda: Burn(),
                 prefix + "burnb": lambda: Burn()}
    for i in range(int(os.environ.get("BENCH_PID_SYMBOLS", "0"))):
        functions[f"{prefix}pid{i}"] = lambda: Pid()
    return PluginConfig(name, {"flood": lambda: Flood(), "idle": lambda: Idle(),
                                "clock": lambda: Clock()},
                        {"count": lambda: Count()}, functions)


if __name__ == "__main__":
    plugin.start(config())
