"""Soak: many start/stop cycles and worker crashes; the supervisor must end where it began.

    python bench/soak.py                      # 1,000 start/stop cycles, 200 crashes
    python bench/soak.py --cycles 50 --crashes 10
    python bench/soak.py --chaos --minutes 3  # random faults and garbage against one supervisor
    python bench/soak.py --chaos --smoke      # the same for ~10 s

Prints the supervisor's open fds, threads, resident memory and this plugin's ipc files
before and after, and exits 1 if any of them grew (memory: by more than --mem-slack MiB).

Chaos: for the given time, at random (the seed is printed; --seed repeats a run), start and
stop sources and sinks, crash workers (SIGKILL, os._exit, segfault), hang them (SIGSTOP, an
endless exec), send garbage on every channel (bad commands, raw bytes on sink data paths,
bad function calls), reload the plugin (`kuiper-pool reload` or SIGHUP to the supervisor,
with the code unchanged or a new version.py), send SIGHUP to every process of the plugin
(as `pkill -HUP -f main.py` does; --no-tree-hup leaves it out), and start a source that keeps
state from a damaged state file (cut short, a key that is not UTF-8: it must start with empty
state and one WARNING; an intact one: it must go on from it), while one healthy source, sink
and function must keep flowing (checked every second). At the end every chaos instance is
stopped, one last reload must serve the last version, and the supervisor must be alive with
its fds, threads, RSS, workers and files back where they started.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from typing import Callable, Dict, List, Optional

import psutil

from kuiper_pool.paths import private_base
from kuiper_pool.runtime.state import HEAD, JSON, States, encode_entry
from kuiper_pool.runtime.status import StatusError, query
from kuiper_pool.tools.emulator import Host, HostError

PLUGIN = textwrap.dedent('''
    import os, threading
    import version
    from kuiper_pool import plugin, PluginConfig, Source, Sink, Function

    class Tick(Source):
        def configure(self, datasource, conf):
            self.stopped = threading.Event()
        def open(self, ctx):
            i = 0
            while not self.stopped.is_set():
                ctx.emit({"i": i}, None)
                i += 1
                self.stopped.wait(0.01)
        def close(self, ctx):
            self.stopped.set()

    class Count(Tick):
        """Counts on from the instance's state."""
        def open(self, ctx):
            n = ctx.get_state("n", 0)
            while not self.stopped.is_set():
                n += 1
                ctx.put_state("n", n)
                ctx.emit({"n": n}, None)
                self.stopped.wait(0.01)

    class Crash(Function):
        def validate(self, args): return ""
        def is_aggregate(self): return False
        def exec(self, args, ctx):
            if args and args[0] == "die":
                os._exit(9)
            if args and args[0] == "segv":
                import ctypes
                ctypes.string_at(0)
            if args and args[0] == "hang":
                while True:
                    pass
            if args and args[0] == "version":
                return version.VERSION
            return os.getpid()

    class Keep(Sink):
        def configure(self, conf): pass
        def open(self, ctx): pass
        def collect(self, ctx, data): ctx.ack_ok()
        def close(self, ctx): pass

    if __name__ == "__main__":
        plugin.start(PluginConfig(NAME, {"tick": Tick, "count": Count}, {"keep": Keep},
                                  {FUNC: Crash, FUNC + "ok": Crash},
                                  settings={"restart_backoff_min": 0.001, "restart_backoff_max": 0.01,
                                            "flap_max_restarts": 1000000, "call_deadline": 0.5,
                                            "heartbeat_interval": 0.1, "heartbeat_misses": 5,
                                            "stop_grace": 0.5, "state_dir": STATE_DIR}))
''')


def make_plugin(root: str, name: str, func: str) -> str:
    """The plugin in ``root``: main.py, version.py (``VERSION = 1``) and state in root/state."""
    with open(os.path.join(root, f"{name}.json"), "w") as f:
        json.dump({"version": "v1", "language": "python", "executable": "main.py",
                   "sources": ["tick", "count"], "sinks": ["keep"], "functions": [func, func + "ok"]}, f)
    state_dir = os.path.join(root, "state")
    os.mkdir(state_dir, 0o700)
    with open(os.path.join(root, "main.py"), "w") as f:
        f.write(f"NAME = {name!r}\nFUNC = {func!r}\nSTATE_DIR = {state_dir!r}\n" + PLUGIN)
    install_version(root, 1)
    return root


def install_version(root: str, version: int) -> None:
    """A new version.py, replaced whole as an installer would."""
    tmp = os.path.join(root, "version.py.tmp")
    with open(tmp, "w") as f:
        f.write(f"VERSION = {version}\n")
    os.replace(tmp, os.path.join(root, "version.py"))


def measure(pid: int, fragment: str) -> dict:
    p = psutil.Process(pid)
    live = [c for c in p.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    return {"fds": p.num_fds(), "threads": p.num_threads(),
            "rss_mib": round(p.memory_info().rss / 1048576, 1),
            "ipc_files": len(glob.glob(f"/tmp/*{fragment}*.ipc")),
            "private_files": len(glob.glob(os.path.join(private_base(), f"*{fragment}*"))),
            "workers": len(live) - 1}


def soak(cycles: int, crashes: int, out=sys.stdout) -> tuple:
    tag = "soak" + uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as root:
        host = Host(make_plugin(root, tag, f"{tag}f"), stdout=open(os.devnull, "w"))
        try:
            host.start()
            func = host.start_function(f"{tag}f")
            func.exec(["warm"])
            # one cycle first so lazily created objects exist in both measurements
            host.start_source("tick", f"{tag}r", op="warm").stop()
            before = measure(host.process.pid, tag)
            t0 = time.monotonic()
            for i in range(cycles):
                src = host.start_source("tick", f"{tag}r", op=f"o{i % 7}")
                src.recv()
                src.stop()
            t1 = time.monotonic()
            for _ in range(crashes):
                func.exec(["die"])           # answered with an error, worker restarted
                reply = func.exec(["alive"])
                while not reply["state"]:    # the replacement may still be starting
                    reply = func.exec(["alive"])
            t2 = time.monotonic()
            after = measure(host.process.pid, tag)
        finally:
            host.close()
    print(f"{cycles} start/stop cycles in {t1 - t0:.1f}s, {crashes} crashes in {t2 - t1:.1f}s",
          file=out)
    for key in before:
        print(f"  {key:10} before {before[key]:>8}  after {after[key]:>8}", file=out)
    return before, after


KUIPER_POOL = [sys.executable, "-m", "kuiper_pool.tools.cli"]
DAMAGE = ("cut short", "key not UTF-8", "intact")


class Chaos:
    """One supervisor, a healthy source/sink/function that must keep flowing, and random
    faults, garbage, reloads and damaged state files around them."""

    def __init__(self, host: Host, tag: str, rng: random.Random, root: str, log: str,
                 tree_hup: bool) -> None:
        self.host, self.tag, self.rng, self.root, self.log = host, tag, rng, root, log
        self.actions = ACTIONS if tree_hup else [a for a in ACTIONS if a != "sighup_tree"]
        self.counts: Dict[str, int] = {}
        self.sources: List = []
        self.sinks: List = []
        self.next = 0
        self.crash = host.start_function(f"{tag}f")
        self.failures: List[str] = []  # of the healthy instances
        self.wrong: List[str] = []     # reloads and state files that did not do what they must
        self.states = States(os.path.join(root, "state"), 1.0)
        self.version = 1
        self.reloading: Optional[subprocess.Popen] = None
        self.reloads: Dict[str, int] = {}  # outcomes of kuiper-pool reload
        self.healthy = re.compile(rf"rule {re.escape(tag)}h\b|function {re.escape(tag)}fok\b")

    def start_healthy(self) -> None:
        self.src = self.host.start_source("tick", f"{self.tag}h", op="src")
        self.snk = self.host.start_sink("keep", f"{self.tag}h", op="snk", require_ack=True)
        self.fn = self.host.start_function(f"{self.tag}fok")

    def check_healthy(self) -> None:
        try:
            self.src.recv(timeout=5)
            ack = self.snk.collect(b'{"ok": 1}', timeout=5)
            if ack != {}:
                raise RuntimeError(f"the healthy sink's ack was an error: {ack}")
            reply = self.fn.exec(["alive"])
            if reply["state"] is not True:
                raise RuntimeError(f"the healthy function failed: {reply['result']}")
        except Exception as e:  # noqa: BLE001 - every failure is reported at the end
            self.failures.append(f"{type(e).__name__}: {e}")

    def act(self) -> None:
        self.poll_reload()
        action = self.rng.choice(self.actions)
        try:
            action = getattr(self, action)() or action  # what was done, if not the action's name
        except HostError:  # a refused start or a dropped garbage connection is fine
            pass
        self.counts[action] = self.counts.get(action, 0) + 1

    def chaos_pids(self) -> List[int]:
        try:
            rows = query(self.tag)["instances"]
        except StatusError:  # the supervisor is gone: the end of the run says so
            return []
        return [r["pid"] for r in rows if r["pid"] and r["rule"].startswith(f"{self.tag}c")]

    def start_source(self) -> None:
        self.next += 1
        self.sources.append(self.host.start_source("tick", f"{self.tag}c{self.next}", op="s"))

    def start_sink(self) -> None:
        self.next += 1
        self.sinks.append(self.host.start_sink("keep", f"{self.tag}c{self.next}", op="k"))

    def stop_one(self) -> None:
        pool = self.sources + self.sinks
        if pool:
            handle = self.rng.choice(pool)
            (self.sources if handle in self.sources else self.sinks).remove(handle)
            handle.stop()

    def kill_worker(self) -> None:
        pids = self.chaos_pids()
        if pids:
            try:
                os.kill(self.rng.choice(pids), self.rng.choice([signal.SIGKILL, signal.SIGSTOP]))
            except ProcessLookupError:  # it ended between the status answer and now
                pass

    def crash_call(self) -> None:
        self.crash.exec([self.rng.choice(["die", "segv", "hang", "ok"])])

    def bad_call(self) -> None:
        self.crash.request(self.rng.choice([b"", b"\xff\xfe", b"[" * 3000, b'{"func": 3}',
                                            os.urandom(self.rng.randint(1, 300))]))

    def bad_command(self) -> None:
        self.host.send_raw(self.rng.choice([b"", b"not json", b'{"cmd": "start", "arg": 7}',
                                            os.urandom(self.rng.randint(1, 200))]))

    def garbage_on_sink(self) -> None:
        if not self.sinks:
            return
        ctrl = self.rng.choice(self.sinks).ctrl["meta"]
        path = f"/tmp/{ctrl['ruleId']}_{ctrl['opId']}_{ctrl['instanceId']}.ipc"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            try:
                s.connect(path)
                s.sendall(os.urandom(self.rng.randint(1, 4096)))
            except OSError:
                pass

    # --- reloads and SIGHUPs ----------------------------------------------------------------

    def new_code(self) -> None:
        """Half the reloads find a new version.py, half the code unchanged."""
        if self.rng.random() < 0.5:
            self.version += 1
            install_version(self.root, self.version)

    def reload(self) -> Optional[str]:
        """``kuiper-pool reload``, in the background; while one runs, a SIGHUP instead."""
        if self.reloading is not None:
            return self.sighup_supervisor()
        self.new_code()
        self.reloading = subprocess.Popen(KUIPER_POOL + ["reload", self.tag, "--timeout", "120"],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return None

    def poll_reload(self, wait: float = 0.0) -> None:
        """Judge the background ``kuiper-pool reload`` once it has ended (``wait``: up to so long)."""
        proc = self.reloading
        if proc is None or (not wait and proc.poll() is None):
            return
        try:
            out, _ = proc.communicate(timeout=wait or None)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out = f"no outcome within {wait:g}s; " + out
        self.reloading = None
        lines = out.strip().splitlines() or [""]
        if proc.returncode == 0:
            outcome = "reloaded"
        elif "a reload is already in progress" in lines[0]:  # a SIGHUP's reload
            outcome = "refused: already in progress"
        elif ": reloaded: " in lines[0] and not any(self.healthy.search(x) for x in lines[1:]):
            outcome = "reloaded but a chaos instance was not replaced"
        else:
            outcome = "failed"
            self.wrong.append("kuiper-pool reload: " + " | ".join(lines))
        self.reloads[outcome] = self.reloads.get(outcome, 0) + 1

    def sighup_supervisor(self) -> str:
        self.new_code()
        os.kill(self.host.process.pid, signal.SIGHUP)
        return "sighup_supervisor"

    def sighup_tree(self) -> None:
        """SIGHUP to the supervisor, its zygote(s) and every worker, as an operator's
        ``pkill -HUP -f main.py`` or a closed terminal sends it."""
        self.new_code()
        try:
            sup = psutil.Process(self.host.process.pid)
            tree = [sup] + sup.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in tree:
            try:
                p.send_signal(signal.SIGHUP)
            except psutil.NoSuchProcess:
                pass

    def final_reload(self) -> None:
        """Once the chaos is over a reload onto a new version must succeed and be served."""
        self.version += 1
        install_version(self.root, self.version)
        deadline = time.monotonic() + 120
        while True:
            proc = subprocess.run(KUIPER_POOL + ["reload", self.tag, "--timeout", "120"], timeout=150,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode == 0 or "already in progress" not in proc.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # noqa: a SIGHUP's reload is still replacing instances
        if proc.returncode != 0:
            self.wrong.append("the last kuiper-pool reload: " + " | ".join(proc.stdout.split("\n")))
            return
        served = self.fn.exec(["version"])
        if served.get("result") != self.version:
            self.wrong.append(f"after the last reload the function serves {served}, not version {self.version}")

    def scan_log(self) -> Dict[str, int]:
        """The reloads the plugin logged (SIGHUP's too); a refusal, a lost zygote or a healthy
        instance a reload could not replace is a failure."""
        seen = {"reloaded": 0, "not replaced (chaos instances)": 0}
        with open(self.log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if ": reloaded: " in line:
                    seen["reloaded"] += 1
                elif "reload refused" in line or "zygote process died" in line:
                    self.wrong.append(line.strip())
                elif "not replaced within" in line or "the new worker did not start" in line:
                    if self.healthy.search(line):
                        self.wrong.append(line.strip())
                    else:
                        seen["not replaced (chaos instances)"] += 1
        return seen

    # --- state files ------------------------------------------------------------------------

    def corrupt_state(self) -> str:
        """A source with state starts on a rule whose state file is cut short, has a key that
        is not UTF-8, or is intact: damaged, it must start empty with one WARNING and the
        file moved aside; intact, it goes on counting from it."""
        self.next += 1
        rule = f"{self.tag}c{self.next}"
        path = self.states.file_for(self.tag, f"source:count:{rule}:st:0")
        damage = self.rng.choice(DAMAGE)
        good = encode_entry(rule, "n", JSON, b"1000000")
        key_at = HEAD.size + len(rule)
        data = {"cut short": good[:-3], "intact": good,
                "key not UTF-8": good[:key_at] + b"\xff" + good[key_at + 1:]}[damage]
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        logged = os.path.getsize(self.log)
        for attempt in range(3):
            try:
                src = self.host.start_source("count", rule, op="st")
                try:
                    n = src.recv(timeout=10)["message"]["n"]
                finally:
                    src.stop()
                break
            except HostError as e:  # a worker killed as hung under load may be retried
                if "state" in str(e) or attempt == 2:
                    self.wrong.append(f"state file {damage}: {e}")
                    return f"state file {damage}"
        if damage == "intact":
            if n != 1000001:
                self.wrong.append(f"state file intact: the source counted from {n}, not 1000001")
            return f"state file {damage}"
        warnings = self.logged_since(logged, lambda x: "WARNING" in x and path in x
                                     and "starting with empty state" in x)
        aside = glob.glob(glob.escape(path) + ".corrupt-*")
        kept = [name for name in aside if open(name, "rb").read() == data]
        if n >= 1000 or len(warnings) != 1 or len(aside) != 1 or not kept:
            self.wrong.append(f"state file {damage}: first n {n}, {len(warnings)} WARNING(s), "
                              f"{len(aside)} file(s) moved aside, {len(kept)} holding what was there")
        for name in aside:
            os.unlink(name)
        return f"state file {damage}"

    def logged_since(self, pos: int, wanted: Callable[[str], bool]) -> List[str]:
        """The plugin's log lines from byte ``pos`` on that are ``wanted`` (waiting up to 5 s
        for the first)."""
        deadline = time.monotonic() + 5
        while True:
            with open(self.log, "rb") as f:
                f.seek(pos)
                lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if wanted(x)]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)  # noqa: the supervisor writes the line as it spawns the worker

    def stop_all(self) -> None:
        for handle in self.sources + self.sinks:
            handle.stop()
        self.sources, self.sinks = [], []

    def wind_down(self, before: dict) -> Optional[dict]:
        """Stop the chaos, reload once more, and measure once the supervisor has settled
        (None if it died meanwhile)."""
        try:
            self.stop_all()
            for pid in self.chaos_pids():  # SIGSTOPped ones were killed; make sure none waits
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self.poll_reload(wait=150)
            self.final_reload()
            self.check_healthy()
            pid = self.host.process.pid
            deadline = time.monotonic() + 15
            after = measure(pid, self.tag)
            while time.monotonic() < deadline and after != before and any(
                    after[k] > before[k] for k in ("fds", "threads", "workers", "ipc_files")):
                time.sleep(0.2)  # noqa: workers killed last are still being reaped
                after = measure(pid, self.tag)
            return after
        except (HostError, StatusError, psutil.NoSuchProcess) as e:
            self.wrong.append(f"winding down: {type(e).__name__}: {e}")
            return None


ACTIONS = ["start_source", "start_sink", "stop_one", "stop_one", "kill_worker", "crash_call",
           "bad_call", "bad_command", "garbage_on_sink", "reload", "sighup_supervisor",
           "sighup_tree", "corrupt_state"]


def chaos(seconds: float, seed: int, tree_hup: bool = True, out=sys.stdout) -> tuple:
    tag = "chaos" + uuid.uuid4().hex[:8]
    rng = random.Random(seed)
    print(f"chaos: seed {seed}, {seconds:g}s" + ("" if tree_hup else ", no SIGHUP to the whole tree"),
          file=out)
    with tempfile.TemporaryDirectory() as root:
        log = os.path.join(root, "stdout.log")
        with open(log, "w") as stdout:
            host = Host(make_plugin(root, tag, f"{tag}f"), stdout=stdout,
                        env={"PYTHONDONTWRITEBYTECODE": "1"})  # a version.py of the same size and second
            try:
                host.start()
                ch = Chaos(host, tag, rng, root, log, tree_hup)
                ch.start_healthy()
                ch.crash.exec(["ok"])
                host.start_source("tick", f"{tag}w", op="warm").stop()  # lazily made objects exist
                warm = host.start_source("count", f"{tag}w", op="warm")  # and the state syncer,
                warm.recv()                                                # once it wrote a file
                warm.stop()
                synced = ch.states.file_for(tag, f"source:count:{tag}w:warm:0")
                deadline = time.monotonic() + 15
                while not os.path.exists(synced) and time.monotonic() < deadline:
                    time.sleep(0.05)  # noqa: polled with a deadline
                ch.check_healthy()
                time.sleep(0.5)  # noqa: the baseline is taken once the warm-up worker is gone
                before = measure(host.process.pid, tag)
                end = time.monotonic() + seconds
                next_check = 0.0
                while time.monotonic() < end and host.alive():
                    ch.act()
                    if time.monotonic() >= next_check:
                        ch.check_healthy()
                        next_check = time.monotonic() + 1.0
                after = ch.wind_down(before) if host.alive() else None
                ch.poll_reload(wait=30)  # one the supervisor's death interrupted
                alive = host.alive()
            finally:
                host.close()
        logged = ch.scan_log()
    print("  actions: " + ", ".join(f"{k} {v}" for k, v in sorted(ch.counts.items())), file=out)
    print("  reloads: " + ", ".join(f"{k} {v}" for k, v in logged.items()) + "; kuiper-pool reload: "
          + ", ".join(f"{k} {v}" for k, v in sorted(ch.reloads.items())) + f"; last version {ch.version}",
          file=out)
    for what, failed in (("healthy instance checks", ch.failures), ("reload and state checks", ch.wrong)):
        print(f"  {what} failed: {len(failed)}", file=out)
        for text in failed[:5]:
            print(f"    {text}", file=out)
    print(f"  supervisor alive at the end: {alive}", file=out)
    for key in before:
        print(f"  {key:14} before {before[key]:>8}  after {after[key] if after else '-':>8}", file=out)
    return before, after, alive and not ch.failures and not ch.wrong


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--crashes", type=int, default=200)
    ap.add_argument("--mem-slack", type=float, default=5.0, help="MiB of growth tolerated")
    ap.add_argument("--chaos", action="store_true", help="random faults and garbage instead")
    ap.add_argument("--minutes", type=float, default=3.0, help="how long chaos runs")
    ap.add_argument("--seed", type=int, default=None, help="repeat a chaos run")
    ap.add_argument("--smoke", action="store_true", help="a short run (chaos: 10 s)")
    ap.add_argument("--no-tree-hup", action="store_true",
                    help="chaos without SIGHUP to every process of the plugin")
    args = ap.parse_args()
    if args.chaos:
        seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        before, after, ok = chaos(10.0 if args.smoke else args.minutes * 60, seed,
                                  tree_hup=not args.no_tree_hup)
        slack = max(args.mem_slack, 10.0)
    else:
        before, after = soak(args.cycles, args.crashes)
        ok, slack = True, args.mem_slack
    if after is None:
        print("nothing measured: the supervisor is gone")
        print("FAIL")
        return 1
    grew = [k for k in ("fds", "threads", "ipc_files", "private_files", "workers") if after[k] > before[k]]
    if after["rss_mib"] - before["rss_mib"] > slack:
        grew.append("rss_mib")
    print("LEAK: " + ", ".join(grew) if grew else "no growth")
    print("PASS" if ok and not grew else "FAIL")
    return 0 if ok and not grew else 1


if __name__ == "__main__":
    sys.exit(main())
