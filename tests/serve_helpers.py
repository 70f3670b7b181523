"""Running ``kuiper-pool serve`` in tests: a test plugin, a free loopback port, the server as
a real process (its log in a file), and its teardown that proves nothing is left."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from typing import List, Optional

import psutil
from conftest import kill_tree, kuiper_pool_cli, kuiper_pool_command, wait_until
from plugins import make_plugin

SERVE_FN = '''
class ServeFn(Function):
    """exec(mode, arg): echo -> arg; slow -> sleeps arg seconds (recorded from 1 s), returns its pid;
    hold -> records its pid, then sleeps 3 s (the test kills it meanwhile); raise -> ValueError(arg)."""

    def validate(self, args):
        return ""

    def exec(self, args, ctx):
        mode, arg = args[0], args[1]
        if mode == "echo":
            return arg
        if mode == "slow":
            if float(arg) >= 1:
                record("slow", arg=arg)
            time.sleep(float(arg))
            return os.getpid()
        if mode == "hold":
            record("hold", arg=arg)
            time.sleep(3)
            return "survived"
        raise ValueError(arg)

    def is_aggregate(self):
        return False
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_plugin(tmp_path, unique: str, workers: int = 2, factory: Optional[str] = None,
                 main_code: str = "", **settings) -> tuple:
    """A plugin with one function ``f<unique>`` (``SERVE_FN``, two string arguments; made by
    ``factory``, an expression in main.py after ``main_code``) and its service files emitted
    by ``kuiper-pool serve --emit-service``: (dir, fn, json, proto, port)."""
    fn = f"f{unique}"
    port = free_port()
    yaml_settings = {"serve_listen": f"127.0.0.1:{port}",
                     "symbols": {fn: {"serve_workers": workers, "serve_args": "string,string"}}}
    yaml_settings.update(settings)
    plugin_dir = make_plugin(str(tmp_path), f"p{unique}", functions={fn: SERVE_FN},
                             yaml_settings=yaml_settings, main_code=main_code,
                             factories={fn: factory} if factory else None)
    out = tmp_path / "services"
    done = kuiper_pool_cli("serve", plugin_dir, "--emit-service", out)
    assert done.returncode == 0, done.stderr
    return plugin_dir, fn, str(out / f"p{unique}.json"), str(out / "schemas" / f"p{unique}.proto"), port


class Served:
    """One ``kuiper-pool serve`` process."""

    def __init__(self, plugin_dir: str, port: int, log_path: str, runtime_dir: Optional[str] = None) -> None:
        env = dict(os.environ)
        if runtime_dir:
            os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
            env["KUIPER_POOL_RUNTIME_DIR"] = runtime_dir
        self.port = port
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(kuiper_pool_command() + ["serve", plugin_dir, "--listen", f"127.0.0.1:{port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.tree: List[int] = []

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def wait_ready(self) -> None:
        wait_until(lambda: self.get("/readyz") == 200 or self.proc.poll() is not None, 30,
                   message="readyz")
        assert self.proc.poll() is None, self.text()
        self.tree = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def worker_pids(self) -> List[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)
                if p.pid != self.zygote()]

    def zygote(self) -> int:
        return psutil.Process(self.proc.pid).children()[0].pid

    def text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def close(self) -> List[int]:
        """SIGKILL the supervisor, as a crash or an impatient operator would: its zygote cleans
        up and its workers follow. The pids of its tree still alive 10 s later (then killed)."""
        tree = set(self.tree)
        try:
            tree.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
        procs = []
        for pid in tree:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            kill_tree(p.pid)
        return [p.pid for p in alive]
