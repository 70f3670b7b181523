"""A generator of throwaway kuiper_pool plugins that fail on request, for supervision tests.

``write_faulty_plugin(root, unique, settings)`` writes ``<name>.json``, ``main.py`` and
``sources/src.yaml`` into ``root``. Every name that reaches a global path (plugin name,
function symbols) contains ``unique``; rules are chosen by the test.

The plugin records what it does, one JSON line per event, to ``<root>/events.jsonl``
(each line one ``os.write`` on an ``O_APPEND`` file, so several workers can append at
once). Every event carries ``event``, ``pid`` and ``t`` (``time.time()``).

Faults (``how``): ``raise`` (RuntimeError), ``memory`` (MemoryError), ``exit``
(``os._exit(13)``; ``exit5``: ``os._exit(5)``), ``segv`` (``ctypes.string_at(0)``), ``sigkill`` (the worker
SIGKILLs itself), ``hang`` (a busy loop that never returns).

* source ``src``, conf: ``interval`` (s between items, default 0.01), ``open_fault``
  (how ``open`` fails before emitting), ``once`` (a marker name: fail only while
  ``<root>/<once>`` is absent; it is created just before failing), ``quiet`` (seconds
  ``open`` emits nothing first), ``configure_fault`` (``configure`` raises ValueError),
  ``alloc_mb`` (``open`` keeps that many MiB of touched memory, the first time for its rule),
  ``ignore_close`` (``close`` returns without stopping ``open``, which then never returns),
  ``stay_in_open`` (``open`` records ``blocked`` at ``open`` and blocks in ``stay`` for good).
  Items: ``{"n": 1, 2, ..., "pid", "rule"}``. Events: ``configure`` (symbol, conf),
  ``open`` (rule), ``fault``.
* sink ``snk``, conf: ``open_fault`` (how ``open`` fails, every time),
  ``restart_open_fault`` (how ``open`` fails on every start of a rule but its first), ``tag_acks``
  (items whose ``i`` is a multiple of 3 are acked with ``ack_error("tag <i>")``, others
  with ``ack_ok``), ``late_ack`` (seconds: ``ack_ok`` comes from a timer thread after
  ``collect`` returned, as the official SDK allows). Items are JSON objects ``{"i": n}``; ``{"i": n, "die": how, "mode":
  "once"|"always"}`` fails in ``collect`` (``once``: only the first time that rule sees
  that ``i``); ``slow`` (seconds each collect sleeps while ``<root>/fast`` is absent, after
  a ``slow`` event); ``{"i": n, "block": "collect"|"before_ack"|"after_ack"}`` records
  ``blocked`` (at, rule, i) and blocks there the first time (in ``collect``; in a thread
  after ``collect`` returned without acking; after ``ack_ok``), for a test to SIGKILL.; ``digest`` (``collect`` events carry ``sha``, the item's sha256 hex).
  ``{"i": n, "tamper": pid}``: ``collect`` runs ``tamper_memfds`` on process ``pid`` and
  records ``tamper`` (i, ``tried``: memfds found, ``done``: attempts that succeeded).
  Events: ``configure`` (symbol, conf), ``collect`` (rule, i), ``fault``.
* function ``fn_<unique>``: ``exec(["pid"])`` returns the worker pid;
  ``exec(["die", how])`` records ``exec`` then fails; ``exec(["hang"])`` loops;
  ``exec(["hang_once", marker])`` loops the first time for that marker, then returns the pid;
  ``exec(["alloc", mb])`` keeps ``mb`` MiB of touched memory and returns the pid.
* function ``flaky_<unique>``: same as ``fn_``, but its factory raises whenever
  ``<root>/flaky_started`` exists (it creates it on the first start).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

MAIN = r'''
import ctypes, hashlib, json, os, signal, sys, threading, time
from kuiper_pool import plugin, PluginConfig, Source, Sink, Function

HERE = os.path.dirname(os.path.abspath(__file__))
EVENTS = os.path.join(HERE, "events.jsonl")
KEEP = []


def record(event, **fields):
    line = json.dumps(dict(event=event, pid=os.getpid(), t=time.time(), **fields)) + "\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def first_time(marker):
    """True exactly once per marker name (across worker processes)."""
    try:
        os.close(os.open(os.path.join(HERE, marker), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return True
    except FileExistsError:
        return False


def fault(how, where, **fields):
    record("fault", how=how, where=where, **fields)
    if how == "raise":
        raise RuntimeError("injected fault in " + where)
    if how == "memory":
        raise MemoryError("injected MemoryError in " + where)
    if how.startswith("exit"):
        sys.stdout.flush()
        os._exit(int(how[4:] or 13))
    if how == "segv":
        ctypes.string_at(0)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        while True:
            pass
    raise ValueError("unknown fault " + repr(how))


def stay(where, **fields):
    """Say where this worker is (event ``blocked``), then block until it is killed."""
    record("blocked", at=where, **fields)
    threading.Event().wait()


class Src(Source):
    def __init__(self):
        self.stopped = threading.Event()

    def configure(self, datasource, conf):
        self.conf = conf
        record("configure", symbol="src", conf=conf)
        if conf.get("configure_fault"):
            raise ValueError("injected configure fault")

    def open(self, ctx):
        rule = ctx.get_rule_id()
        record("open", rule=rule)
        how = self.conf.get("open_fault")
        once = self.conf.get("once")
        if how and (not once or first_time(once)):
            fault(how, "open of rule " + rule, rule=rule)
        if self.conf.get("stay_in_open"):
            stay("open", rule=rule)
        if self.conf.get("alloc_mb") and first_time("alloc_" + rule):
            KEEP.append(b"\x01" * (int(self.conf["alloc_mb"]) << 20))
        if self.conf.get("quiet") and self.stopped.wait(float(self.conf["quiet"])):
            return
        n = 0
        interval = float(self.conf.get("interval", 0.01))
        while not self.stopped.is_set():
            n += 1
            ctx.emit({"n": n, "pid": os.getpid(), "rule": rule}, None)
            self.stopped.wait(interval)

    def close(self, ctx):
        if not self.conf.get("ignore_close"):
            self.stopped.set()


class Snk(Sink):
    def configure(self, conf):
        self.conf = conf
        record("configure", symbol="snk", conf=conf)

    def open(self, ctx):
        how = self.conf.get("open_fault")
        again = self.conf.get("restart_open_fault")
        if again and not first_time("opened_" + ctx.get_rule_id()):
            how = again
        if how:
            fault(how, "open of sink rule " + ctx.get_rule_id(), rule=ctx.get_rule_id())

    def collect(self, ctx, data):
        item = json.loads(data)
        rule = ctx.get_rule_id()
        how = item.get("die")
        if how and (item.get("mode") == "always" or first_time("died_%s_%s" % (rule, item["i"]))):
            fault(how, "collect of item %s" % item["i"], rule=rule, i=item["i"])
        if self.conf.get("slow") and not os.path.exists(os.path.join(HERE, "fast")):
            record("slow", rule=rule, i=item["i"])
            time.sleep(float(self.conf["slow"]))
        if item.get("tamper"):
            found, done = tamper_memfds("/proc/%d/fd" % item["tamper"])
            record("tamper", rule=rule, i=item["i"], tried=found, done=done)
        block = item.get("block")  # blocks the first time, where the test SIGKILLs it
        if block == "collect" and first_time("blocked_%s_%s" % (rule, item["i"])):
            stay(block, rule=rule, i=item["i"])
        digest = {"sha": hashlib.sha256(data).hexdigest()} if self.conf.get("digest") else {}
        record("collect", rule=rule, i=item["i"], **digest)
        if block == "before_ack" and first_time("blocked_%s_%s" % (rule, item["i"])):
            threading.Thread(target=stay, args=(block,), kwargs=dict(rule=rule, i=item["i"])).start()
            return  # collect returned; its ack will not come from this worker
        if block == "after_ack" and first_time("blocked_%s_%s" % (rule, item["i"])):
            ctx.ack_ok()
            stay(block, rule=rule, i=item["i"])
        if self.conf.get("late_ack"):
            threading.Timer(float(self.conf["late_ack"]), ctx.ack_ok).start()
        elif self.conf.get("tag_acks") and item["i"] % 3 == 0:
            ctx.ack_error("tag %d" % item["i"])
        else:
            ctx.ack_ok()

    def close(self, ctx):
        pass


class Fn(Function):
    def validate(self, args):
        return ""

    def is_aggregate(self):
        return False

    def exec(self, args, ctx):
        what = args[0]
        if what == "pid":
            return os.getpid()
        if what == "die":
            record("exec", what="die", how=args[1])
            fault(args[1], "exec")
        if what == "hang":
            record("exec", what="hang")
            fault("hang", "exec")
        if what == "hang_once":
            record("exec", what="hang_once")
            if first_time("hang_" + args[1]):
                fault("hang", "exec")
            return os.getpid()
        if what == "alloc":
            block = b"\x01" * (int(args[1]) * 1048576)  # touched, so it is resident
            KEEP.append(block)
            return os.getpid()
        raise ValueError("unknown request " + repr(what))


def flaky():
    if not first_time("flaky_started"):
        raise RuntimeError("flaky factory refuses to start again")
    return Fn()


if __name__ == "__main__":
    plugin.start(PluginConfig(NAME, {"src": Src}, {"snk": Snk}, {FN: Fn, FLAKY: flaky},
                              settings=SETTINGS))
'''


def tamper_memfds(fd_dir: str) -> "Tuple[int, List[str]]":
    """Reopen for writing every big-item memfd in ``fd_dir`` (``/proc/<pid>/fd``), as plugin
    code can, and try every way to change it: write, shrink, grow, map writable, punch a
    hole, add a seal. The memfds reopened, and the attempts that succeeded. Written into
    the plugin too (``MAIN``)."""
    import ctypes
    import fcntl
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)

    def punch(fd: int) -> None:
        if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)):  # PUNCH_HOLE | KEEP_SIZE
            raise OSError(ctypes.get_errno(), "fallocate")
    attempts = {"write": lambda fd: os.pwrite(fd, b"x", 0), "shrink": lambda fd: os.ftruncate(fd, 0),
                "grow": lambda fd: os.posix_fallocate(fd, 0, 1 << 30),
                "mmap": lambda fd: mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
                "punch": punch, "seal": lambda fd: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)}
    found, done = 0, []
    for name in os.listdir(fd_dir):
        path = os.path.join(fd_dir, name)
        try:
            if not os.readlink(path).startswith("/memfd:kuiper_pool-item"):
                continue
            fd = os.open(path, os.O_RDWR)
        except OSError:  # closed meanwhile (or the descriptor listdir used), or refused
            continue
        found += 1
        try:
            for what, attempt in attempts.items():
                try:
                    attempt(fd)
                    done.append(what)
                except OSError:
                    pass
        finally:
            os.close(fd)
    return found, done


@dataclass
class FaultyPlugin:
    dir: str
    name: str
    fn: str
    flaky: str

    def events(self, kind: str = "", **match: Any) -> List[Dict[str, Any]]:
        """Recorded events of ``kind`` (all if empty) whose fields equal ``match``."""
        path = os.path.join(self.dir, "events.jsonl")
        try:
            with open(path) as f:
                lines = [line for line in f if line.endswith("\n")]
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            ev = json.loads(line)
            if (not kind or ev["event"] == kind) and all(ev.get(k) == v for k, v in match.items()):
                out.append(ev)
        return out

    def marker_exists(self, marker: str) -> bool:
        return os.path.exists(os.path.join(self.dir, marker))


def write_faulty_plugin(root: str, unique: str, settings: Optional[Dict[str, Any]] = None) -> FaultyPlugin:
    """Write the plugin into ``root`` (created if needed) with kuiper_pool ``settings``."""
    p = FaultyPlugin(dir=root, name=f"fp_{unique}", fn=f"fn_{unique}", flaky=f"flaky_{unique}")
    os.makedirs(os.path.join(root, "sources"), exist_ok=True)
    head = f"NAME = {p.name!r}\nFN = {p.fn!r}\nFLAKY = {p.flaky!r}\nSETTINGS = {dict(settings or {})!r}\n"
    with open(os.path.join(root, "main.py"), "w") as f:
        f.write(head + MAIN.replace("\nclass Src(Source):", "\n" + inspect.getsource(tamper_memfds)
                                    + "\n\nclass Src(Source):", 1))
    with open(os.path.join(root, p.name + ".json"), "w") as f:
        json.dump({"version": "v1.0.0", "language": "python", "executable": "main.py",
                   "sources": ["src"], "sinks": ["snk"], "functions": [p.fn, p.flaky]}, f)
    with open(os.path.join(root, "sources", "src.yaml"), "w") as f:
        f.write("default:\n  interval: 0.01\n")
    return p
