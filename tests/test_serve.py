"""``kuiper-pool serve``: a plugin's function served over REST by a pool of workers, called
as eKuiper's REST executor calls a schema-based external function (``ekuiper_rest``)."""
from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import wait_until
from ekuiper_rest import Client, EKuiperError
from plugins import read_jsonl, runtime_entries
from serve_helpers import Served, serve_plugin


@pytest.fixture
def served(tmp_path, unique):
    """Start ``kuiper-pool serve`` on a test plugin (2 workers); at teardown nothing of it
    may be left."""
    runs = []

    def start(wait: bool = True, **settings):
        plugin_dir, fn, service, proto, port = serve_plugin(tmp_path, unique, **settings)
        s = Served(plugin_dir, port, str(tmp_path / f"serve{len(runs)}.log"))
        runs.append(s)
        if wait:
            s.wait_ready()
        return s, fn, lambda: Client(service, proto), plugin_dir
    yield start
    for s in runs:
        left = s.close()
        assert not left, f"processes left behind: {left}"
    # the zygote removes the run dir and status socket of a supervisor that was killed
    wait_until(lambda: not runtime_entries(unique), 10, message="the private directory emptied")


def test_emitted_service_declares_each_function_as_eKuiper_loads_it(tmp_path, unique):
    _dir, fn, service, proto, port = serve_plugin(tmp_path, unique)
    text = open(proto).read()
    assert f"rpc {fn}({fn}_args) returns (google.protobuf.StringValue)" in text
    assert "string arg0 = 1;" in text and "string arg1 = 2;" in text
    c = Client(service, proto)
    assert (c.host, c.port) == ("127.0.0.1", port)
    assert c.body(fn, ["echo", "x"]) == b'{"arg0":"echo","arg1":"x"}'


def test_concurrent_rules_get_their_own_answers_from_both_workers(served):
    s, fn, client, _dir = served()
    assert s.get("/livez") == 200

    def rule(i: int):
        c = client()
        try:
            answers = [c.call(fn, "echo", f"rule{i}-{k}") for k in range(20)]
            pid = c.call(fn, "slow", "0.2")
            return answers, pid
        finally:
            c.close()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(rule, range(6)))
    for i, (answers, _pid) in enumerate(results):
        assert answers == [f"rule{i}-{k}" for k in range(20)]
    assert {int(pid) for _a, pid in results} == set(s.worker_pids())  # every worker served


def test_errors_reach_the_rule_as_eKuipers_http_error_in_one_line(served):
    s, fn, client, _dir = served()
    c = client()
    with pytest.raises(EKuiperError) as e:
        c.call(fn, "raise", "bad input")
    assert "return code: 500" in str(e.value) and f"function {fn}" in str(e.value)
    assert "ValueError: bad input" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(EKuiperError, match="invalid type for string type field"):
        c.call(fn, "echo", 3)        # eKuiper itself refuses it: the schema says string
    assert c.call(fn, "echo", "still serving") == "still serving"
    c.close()


def test_a_worker_killed_mid_call_fails_only_that_call(served, tmp_path):
    s, fn, client, plugin_dir = served()
    events = os.path.join(plugin_dir, "events.jsonl")
    held = {}

    def hold():
        c = client()
        try:
            held["answer"] = c.call(fn, "hold", "x")
        except EKuiperError as e:
            held["error"] = str(e)
        finally:
            c.close()

    def others(i: int):
        c = client()
        try:
            return [c.call(fn, "slow", "0.05") for _ in range(10)]
        finally:
            c.close()
    t = threading.Thread(target=hold)
    t.start()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(others, i) for i in range(4)]
        victim = wait_until(lambda: read_jsonl(events, "hold"), 10, message="the held call")[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        answered = [f.result(timeout=30) for f in futures]
    t.join(10)
    assert "answer" not in held, held
    assert "return code: 500" in held["error"] and f"worker pid {victim} died during the call" in held["error"]
    assert all(len(a) == 10 for a in answered)            # every other call was answered
    survivors = wait_until(lambda: len(s.worker_pids()) == 2 and victim not in s.worker_pids()
                           and s.worker_pids(), 10, message="the restarted worker")
    c = client()
    with ThreadPoolExecutor(2) as pool:
        pids = set(pool.map(lambda _i: int(client().call(fn, "slow", "0.3")), range(2)))
    assert pids <= set(survivors)
    assert c.call(fn, "echo", "after") == "after"
    c.close()
    assert f"worker pid {victim}" in s.text() and "restart" in s.text()


def test_sigterm_drains_then_stops(served):
    s, fn, client, plugin_dir = served(serve_drain=10)
    got = {}

    def long_call():
        c = client()
        got["pid"] = c.call(fn, "slow", "1.0")
        c.close()
    t = threading.Thread(target=long_call)
    t.start()
    wait_until(lambda: read_jsonl(os.path.join(plugin_dir, "events.jsonl"), "slow"), 10,
               message="the call to start")
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: s.get("/readyz") == 503, 10, message="readyz off")
    t.join(10)
    assert "pid" in got                     # the call in flight was answered
    assert s.proc.wait(timeout=20) == 0
    assert "draining" in s.text()



def _exchange(port: int, raw: bytes, replies: int = 1) -> list:
    """Send ``raw`` on a fresh connection; the (status, body) of ``replies`` answers."""
    import socket

    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        buf = b""
        while len(out) < replies:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = buf[:end].decode()
                length = int(next(h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")))
                if len(buf) >= end + 4 + length:
                    out.append((int(head[9:12]), buf[end + 4:end + 4 + length].decode()))
                    buf = buf[end + 4 + length:]
                    continue
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {out}"
            buf += chunk
    return out


def _post(fn: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST /{fn} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_http_requests_eKuiper_does_not_send_are_refused_in_one_line(served):
    s, fn, _client, _dir = served()
    chunked = f"POST /{fn} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode()
    assert _exchange(s.port, chunked)[0][0] == 501
    assert _exchange(s.port, _post(fn, b"[1]"))[0] == (400, f"function {fn}: the body must be a JSON object, got list")
    assert _exchange(s.port, _post("nope", b"{}"))[0][0] == 404
    assert _exchange(s.port, b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")[0][0] == 404


def test_pipelined_calls_are_answered_in_order_and_a_stalled_client_holds_up_nobody(served):
    import socket

    s, fn, client, _dir = served()
    stalled = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    try:
        stalled.sendall(_post(fn, b'{"arg0":"echo","arg1":"never finished"}')[:-10])  # half a request
        pipelined = _post(fn, b'{"arg0":"echo","arg1":"one"}') + _post(fn, b'{"arg0":"echo","arg1":"two"}')
        assert _exchange(s.port, pipelined, 2) == [(200, "one"), (200, "two")]
        c = client()
        assert c.call(fn, "echo", "others are served") == "others are served"
        c.close()
    finally:
        stalled.close()


def test_max_calls_recycles_workers_between_calls_and_no_call_fails(served):
    s, fn, client, _dir = served(max_calls=3)
    c = client()
    pids = [int(c.call(fn, "slow", "0")) for _ in range(12)]
    c.close()
    assert len(set(pids)) >= 3          # 12 calls, 2 workers, 3 calls each: fresh workers took over
    assert "served max_calls 3" in s.text()


def test_a_reload_replaces_every_worker_and_no_call_fails(served):
    s, fn, client, _dir = served()
    before = set(s.worker_pids())
    stop, errors, answered = threading.Event(), [], []

    def rule() -> None:
        c = client()
        try:
            while not stop.is_set():
                try:
                    answered.append(c.call(fn, "echo", "x"))
                except EKuiperError as e:
                    errors.append(str(e))
        finally:
            c.close()
    threads = [threading.Thread(target=rule) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(answered) > 20, 10, message="calls flowing")
        s.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded: 2 instance(s) replaced" in s.text(), 60, message="the reload")
        n = len(answered)
        wait_until(lambda: len(answered) > n + 20, 10, message="calls after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert not before & set(s.worker_pids())


def test_a_taken_address_is_one_line_and_exit_1(tmp_path, unique):
    import socket
    import subprocess

    from conftest import kuiper_pool_command

    plugin_dir, _fn, _service, _proto, _port = serve_plugin(tmp_path, unique)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(kuiper_pool_command() + ["serve", plugin_dir, "--listen", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert done.returncode == 1, done.stdout
    assert f"plugin p{unique}: cannot serve on 127.0.0.1:{port}: [Errno 98]" in done.stdout


def test_a_call_past_call_deadline_is_answered_with_an_error_and_its_worker_replaced(served):
    s, fn, client, _dir = served(call_deadline=0.5)
    c = client()
    with pytest.raises(EKuiperError) as e:
        c.call(fn, "slow", "3")
    assert "return code: 500" in str(e.value) and "call_deadline 0.5" in str(e.value), str(e.value)
    assert c.call(fn, "echo", "next") == "next"
    c.close()


GATED = """
def gated():
    if not os.path.exists(os.path.join(PLUGIN_DIR, "ready")):
        raise RuntimeError("not ready yet")
    return ServeFn()
"""


def test_a_worker_whose_start_is_refused_is_started_again_until_it_serves(served):
    s, fn, client, plugin_dir = served(wait=False, factory="gated", main_code=GATED)
    wait_until(lambda: s.text().count("not ready yet; trying again in") >= 2, 30, message="refused starts")
    assert s.get("/readyz") == 503
    open(os.path.join(plugin_dir, "ready"), "w").close()
    s.wait_ready()
    wait_until(lambda: len(s.worker_pids()) == 2, 30, message="both workers")
    c = client()
    assert c.call(fn, "echo", "up") == "up"
    c.close()


# --- connections lent to workers (docs/serve.md, "How a call is served") ----------------------

def _holder(s: Served, local_port: int) -> int:
    """The pid of the worker that holds the client connection from ``local_port`` (lent to
    it), or 0."""
    for pid in s.worker_pids():
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(x.raddr and x.raddr.port == local_port for x in conns):
            return pid
    return 0


def _lent(s: Served, c: Client, fn: str) -> int:
    """Call until ``c``'s connection is lent to a worker (a request that arrived in parts is
    read by the supervisor, the next whole one is lent); that worker's pid."""
    return wait_until(lambda: c.call(fn, "echo", "x") == "x" and _holder(s, c.conn.sock.getsockname()[1]),
                      10, message="the connection lent to a worker")


def test_a_worker_killed_while_it_holds_a_lent_connection_fails_that_call_once(served):
    s, fn, client, plugin_dir = served(workers=1)
    c = client()
    holder = _lent(s, c, fn)
    got = {}

    def held() -> None:
        try:
            got["answer"] = c.call(fn, "hold", "x")
        except EKuiperError as e:
            got["error"] = str(e)
    t = threading.Thread(target=held)
    t.start()
    victim = wait_until(lambda: read_jsonl(os.path.join(plugin_dir, "events.jsonl"), "hold"), 10,
                        message="the held call")[0]["pid"]
    assert victim == holder          # the call ran in the worker that holds the connection
    os.kill(victim, signal.SIGKILL)
    t.join(10)
    assert "answer" not in got, got
    assert "return code: 500" in got["error"] and f"worker pid {victim} died during the call" in got["error"]
    assert "\n" not in got["error"]
    assert c.call(fn, "echo", "same connection") == "same connection"   # on the restarted worker
    c.close()
    c2 = client()
    assert c2.call(fn, "echo", "new connection") == "new connection"
    assert _lent(s, c2, fn) != victim
    c2.close()


def test_a_lent_call_past_call_deadline_is_answered_with_an_error_and_the_connection_serves_on(served):
    s, fn, client, _dir = served(workers=1, call_deadline=0.5)
    c = client()
    holder = _lent(s, c, fn)
    with pytest.raises(EKuiperError) as e:
        c.call(fn, "slow", "3")
    assert "return code: 500" in str(e.value) and "call exceeded call_deadline 0.5s" in str(e.value)
    assert f"worker pid {holder} died during the call" in str(e.value)
    assert c.call(fn, "echo", "next") == "next"
    assert _lent(s, c, fn) != holder
    c.close()


def test_a_lent_connection_still_answers_probes_and_other_requests(served):
    import socket

    s, fn, _client, _dir = served(workers=1)
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
        def exchange(raw: bytes) -> tuple:
            sock.sendall(raw)
            buf = b""
            while b"\r\n\r\n" not in buf or len(buf) < buf.index(b"\r\n\r\n") + 4 + int(
                    buf.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
                chunk = sock.recv(65536)
                assert chunk, f"closed after {buf!r}"
                buf += chunk
            return int(buf[9:12]), buf.split(b"\r\n\r\n", 1)[1].decode()
        holder = wait_until(lambda: exchange(_post(fn, b'{"arg0":"echo","arg1":"one"}')) == (200, "one")
                            and _holder(s, sock.getsockname()[1]), 10, message="the connection lent")
        assert exchange(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n") == (200, "ok")   # given back to the supervisor
        assert exchange(_post(fn, b"[1]"))[0] == 400
        assert exchange(_post("nope", b"{}"))[0] == 404
        assert exchange(_post(fn, b'{"arg0":"echo","arg1":"two"}')) == (200, "two")
        body = b'{"arg0":"echo","arg1":"continued"}'
        sock.sendall(_post(fn, body, "Expect: 100-continue\r\n")[:-len(body)])   # the head alone
        got = b""
        while not got.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            assert byte, f"closed after {got!r}"
            got += byte
        assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert exchange(body) == (200, "continued")
        assert exchange(_post(fn, b'{"arg0":"echo","arg1":"three"}')) == (200, "three")
        assert _holder(s, sock.getsockname()[1]) == holder   # lent again


def test_a_call_on_another_connection_is_not_held_up_by_a_busy_lent_one(served):
    """One worker, busy back to back on a lent connection: a call from elsewhere makes the
    pool recall the connection and gets the worker within one call (call_deadline is 1 s,
    the lent connection's calls go on for 3 s)."""
    s, fn, client, _dir = served(workers=1, call_deadline=1)
    busy = client()
    _lent(s, busy, fn)
    stop, answered = threading.Event(), []

    def loop() -> None:
        while not stop.is_set():
            answered.append(busy.call(fn, "slow", "0.1"))
    t = threading.Thread(target=loop)
    t.start()
    try:
        wait_until(lambda: len(answered) >= 2, 10, message="calls on the lent connection")
        other = client()
        assert other.call(fn, "echo", "not starved") == "not starved"
        other.close()
        n = len(answered)
        wait_until(lambda: len(answered) > n + 2, 10, message="the busy connection served on")
    finally:
        stop.set()
        t.join(10)
        busy.close()
