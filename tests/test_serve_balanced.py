"""Two ``kuiper-pool serve`` instances behind a real nginx (Debian's package): one is killed
mid-run, and every call is answered: the calls in flight on it fail once (nginx's 502),
every later call goes to the survivor (nginx passes a POST on only when nothing was sent)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import kill_tree, wait_until
from ekuiper_rest import Client, EKuiperError
from serve_helpers import Served, free_port, serve_plugin

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")

CONF = """daemon off;
{user}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream serve {{
    server 127.0.0.1:{a} max_fails=1 fail_timeout=60s;
    server 127.0.0.1:{b} max_fails=1 fail_timeout=60s;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://serve;
      proxy_http_version 1.1;
      proxy_next_upstream error timeout;
      proxy_connect_timeout 2s;
      proxy_read_timeout 5s;
    }}
  }}
}}
"""


def test_a_killed_instance_fails_only_its_calls_in_flight(tmp_path, unique):
    plugin_dir, fn, service, proto, _port = serve_plugin(tmp_path, unique)
    a_port, b_port, lb_port = free_port(), free_port(), free_port()
    a = Served(plugin_dir, a_port, str(tmp_path / "a.log"), str(tmp_path / "run-a"))
    b = Served(plugin_dir, b_port, str(tmp_path / "b.log"), str(tmp_path / "run-b"))
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    conf = nginx_dir / "nginx.conf"
    conf.write_text(CONF.format(dir=nginx_dir, a=a_port, b=b_port, port=lb_port,
                                user="user root;" if os.geteuid() == 0 else ""))
    nginx = subprocess.Popen([NGINX, "-p", str(nginx_dir), "-e", str(nginx_dir / "error.log"), "-c", str(conf)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        a.wait_ready()
        b.wait_ready()
        # the client reads the emitted service, pointed at the balancer
        lb_service = tmp_path / "lb.json"
        lb_service.write_text(open(service).read().replace(f"127.0.0.1:{_port}", f"127.0.0.1:{lb_port}"))
        probe = Client(str(lb_service), proto)
        wait_until(lambda: _answers(probe, fn), 10, message="nginx up")
        probe.close()
        b_workers = set(b.worker_pids())
        answered, killed = [], threading.Event()
        lock = threading.Lock()

        def rule(i: int) -> None:
            c = Client(str(lb_service), proto)
            try:
                for k in range(40):
                    after = killed.is_set()
                    try:
                        got = ("ok", int(c.call(fn, "slow", "0.02")))
                    except EKuiperError as e:
                        got = ("error", str(e))
                    with lock:
                        answered.append((after, got))
                        if len(answered) == 40 and not killed.is_set():
                            os.kill(a.proc.pid, signal.SIGKILL)   # the supervisor: its workers follow
                            killed.set()
            finally:
                c.close()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(rule, range(4)))
        assert killed.is_set() and len(answered) == 160          # every call was answered
        errors = [got[1] for _after, got in answered if got[0] == "error"]
        print(f"{len(errors)} of 160 calls failed: {errors[:1]}")
        assert len(errors) <= 4, errors                           # at most the calls in flight
        assert all("return code: 502" in e for e in errors), errors
        started_after = [got for after, got in answered if after]
        assert started_after and all(got[0] == "ok" and got[1] in b_workers for got in started_after[4:])
    finally:
        kill_tree(nginx.pid)
        nginx.wait(timeout=10)
        left = a.close() + b.close()
        assert not left, f"processes left behind: {left}"
        bases = [tmp_path / run / f"kuiper_pool-{os.getuid()}" for run in ("run-a", "run-b")]
        wait_until(lambda: not any(os.listdir(b) for b in bases if b.exists()), 10,
                   message="the private directories emptied")


def _answers(client: Client, fn: str) -> bool:
    try:
        return client.call(fn, "echo", "up") == "up"
    except EKuiperError:
        return False
