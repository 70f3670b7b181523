"""The supervisor's loop never waits on a peer (native transport, real processes): a
function channel whose peer accepts and never answers the SP header, an ack reader that
never reads, a first function dial that does not connect, and START frames bigger than a
socket takes. Meanwhile other rules are served as when idle, and the supervisor stays one
thread."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable, List, Tuple

import psutil
import pytest

from conftest import wait_until
from kuiper_pool.runtime.forensics import DUMP_SIGNAL
from kuiper_pool.tools.emulator import HostError, control
from kuiper_pool.transport import sp
from plugins import MODE_FUNCTION, RECORDING_SINK, make_plugin


class SilentPeer:
    """A listener at ``path`` that accepts every connection, optionally sends ``greeting``,
    and then neither reads nor writes: the stalled peer."""

    def __init__(self, path: str, greeting: bytes = b"") -> None:
        self.path, self.greeting = path, greeting
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.conns: List[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.greeting:
                conn.sendall(self.greeting)
            self.conns.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def p99(samples: List[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def round_trips(op: Callable[[], object], seconds: float, at_least: int = 100) -> List[float]:
    """Durations of ``op`` run back to back for ``seconds`` (and at least ``at_least`` times)."""
    out: List[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(out) < at_least:
        t = time.monotonic()
        op()
        out.append(time.monotonic() - t)
    return out


def within_idle(loaded: float, idle: float) -> bool:
    """The issue's criterion is a p99 within 2x of idle. On a shared 2-core machine an idle
    p99 of a few ms can double from scheduling noise alone, so up to 250 ms more than idle
    is accepted too; a loop that waits on a stalled peer adds 0.5-1 s per wait, and such
    waits keep coming (every redial, every ack), so they show in the p99."""
    return loaded <= max(2 * idle, idle + 0.25)


def start_in_thread(host, symbol: str) -> Tuple[threading.Thread, List[str]]:
    """Send ``symbol``'s function start from a thread; what refuses it lands in the list."""
    refused: List[str] = []

    def start() -> None:
        try:
            host.command("start", control(symbol, "func"))
        except HostError as e:
            refused.append(str(e))
    return threading.Thread(target=start, daemon=True), refused


def start_stalled_sink(host, snk: str, rule: str, tmp_path) -> Tuple[SilentPeer, dict, str]:
    """A sink started with an ack reader that never reads and items that are all rejected:
    (the ack peer, the sink's Control, its data url)."""
    base = f"/tmp/{rule}_op_0"
    ack_peer = SilentPeer(base + "_ack.ipc", sp.header(sp.PULL))
    ctrl = control(snk, "sink", rule, "op", 0, config={
        "requireAck": True, "reject": "bad", "file": str(tmp_path / "stalled.jsonl")})
    host.command("start", ctrl)
    return ack_peer, ctrl, f"ipc://{base}.ipc"


def rejected(i: int) -> bytes:
    """Item ``i``, rejected by the sink with its own 2 KiB error text."""
    return json.dumps({"i": i, "v": "bad", "pad": "x" * 2048}).encode()


def stop_quietly(host, ctrl: dict) -> None:
    try:
        host.command("stop", ctrl)
    except HostError:
        pass


def test_stalled_peers_never_hold_up_other_rules_and_the_supervisor_stays_one_thread(
        tmp_path, unique, host_runs):
    fn, stuck_fn, unanswered_fn, snk = f"fn{unique}", f"g{unique}", f"h{unique}", f"snk{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={snk: RECORDING_SINK},
                     functions={fn: MODE_FUNCTION, stuck_fn: MODE_FUNCTION, unanswered_fn: MODE_FUNCTION},
                     settings={"dial_timeout": 2.0})
    host = host_runs.launch(pd, data_transport="sp")
    supervisor = psutil.Process(host.process.pid)
    healthy = host.start_sink(snk, f"r1{unique}", config={"file": str(tmp_path / "ok.jsonl")},
                              require_ack=True)
    f = host.start_function(fn)
    g = host.start_function(stuck_fn)
    assert g.exec(["echo", 1])["result"] == 1   # g's worker holds its connection now

    def collect() -> None:
        assert healthy.collect(b'{"a":1}') == {}

    def call() -> None:
        assert f.exec(["echo", 2])["result"] == 2

    idle_sink, idle_fn = p99(round_trips(collect, 1.0)), p99(round_trips(call, 1.0))

    # 1. g's peer goes away and comes back accepting without ever answering the SP header:
    #    the supervisor redials it again and again (header timeout, backoff)
    g.close()
    g_peer = SilentPeer(sp.path_of(g.url))
    # 2. a first function start whose channel accepts and never answers: refused after
    #    dial_timeout, answered without the loop waiting for it
    h_peer = SilentPeer(f"/tmp/func_{unanswered_fn}.ipc")
    starter, refused = start_in_thread(host, unanswered_fn)
    starter.start()
    # 3. a sink whose ack reader never reads: every item is error-acked with its own 2 KiB
    #    text, far more than the socket and the ack backlog take
    ack_peer, ctrl2, data_url = start_stalled_sink(host, snk, f"r2{unique}", tmp_path)
    n_items = 3000
    pusher = sp.PushEndpoint(data_url, dial_timeout=5.0, send_timeout=60.0)
    push_error: List[BaseException] = []

    def push() -> None:
        try:
            for i in range(n_items):
                pusher.send(rejected(i))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            push_error.append(e)
    sender = threading.Thread(target=push, daemon=True)
    sender.start()
    try:
        stalled_sink = p99(round_trips(collect, 3.0))
        stalled_fn = p99(round_trips(call, 1.0))
        starter.join(10.0)
        assert refused and "dial_timeout 2s" in refused[0] and unanswered_fn in refused[0]
        assert within_idle(stalled_sink, idle_sink), (idle_sink, stalled_sink)
        assert within_idle(stalled_fn, idle_fn), (idle_fn, stalled_fn)
        assert supervisor.num_threads() == 1

        # the acks that waited all arrive once eKuiper reads: none lost, none twice, in order
        conn = assert_every_rejection_acked_once(ack_peer, n_items)
        sender.join(30.0)
        assert not push_error and not sender.is_alive()
        assert_nothing_more(conn)
        assert supervisor.num_threads() == 1
    finally:
        pusher.close()
        ack_peer.close()
        g_peer.close()
        h_peer.close()
        stop_quietly(host, ctrl2)


def test_acks_of_a_lent_sink_that_ekuiper_does_not_read_queue_in_the_supervisor(tmp_path, unique, host_runs):
    """The worker lent an acked sink's connections writes acks itself; when eKuiper stops
    reading them, the worker passes the unsent end of the one it is writing to the
    supervisor and gives the connections back: every ack still arrives once, in order."""
    snk, rule = f"snk{unique}", f"r{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={snk: RECORDING_SINK})
    host = host_runs.launch(pd, data_transport="sp")
    base = f"/tmp/{rule}_op_0"
    ack_peer = SilentPeer(base + "_ack.ipc", sp.header(sp.PULL))
    items = tmp_path / "items.jsonl"
    ctrl = control(snk, "sink", rule, "op", 0, config={"requireAck": True, "reject": "bad", "file": str(items)})
    host.command("start", ctrl)
    pusher = sp.PushEndpoint(f"ipc://{base}.ipc", dial_timeout=5.0, send_timeout=10.0)
    seen = [0, 0]   # bytes of the items file read, lines in them

    def recorded() -> int:
        if not items.exists():
            return 0
        with open(items, "rb") as f:
            f.seek(seen[0])
            more = f.read()
        seen[0] += len(more)
        seen[1] += more.count(b"\n")
        return seen[1]
    n_items = 300   # 2 KiB error acks each: more than the ack socket holds
    try:
        for i in range(n_items):  # one at a time: none is in flight at the supervisor, so it lends
            pusher.send(json.dumps({"i": i, "v": "bad", "pad": "x" * 2048}).encode())
            wait_until(lambda: recorded() > i, 10, 0.001, f"item {i} collected")
        assert_nothing_more(assert_every_rejection_acked_once(ack_peer, n_items))
    finally:
        pusher.close()
        ack_peer.close()
        try:
            host.command("stop", ctrl)
        except HostError:
            pass
    with open(os.path.join(pd, "stdout.log"), "rb") as f:
        assert b"eKuiper has not read an ack for 1s: acks queue in the supervisor" in f.read()


def assert_every_rejection_acked_once(ack_peer: SilentPeer, n: int) -> socket.socket:
    """eKuiper's ack connection, once ``n`` error acks came on it for items 0..n-1 in order."""
    conn = wait_until(lambda: ack_peer.conns and ack_peer.conns[0], message="the ack dial")
    acks = read_acks(conn, n)
    assert [json.loads(json.loads(a)["error"][len("rejected "):])["i"] for a in acks] == list(range(n))
    return conn


def assert_nothing_more(conn: socket.socket) -> None:
    conn.settimeout(0.2)
    with pytest.raises(socket.timeout):
        conn.recv(1)


def read_acks(conn: socket.socket, n: int, timeout: float = 30.0) -> List[bytes]:
    """``n`` SP messages from a PUSH peer whose header is the first 8 bytes read."""
    conn.settimeout(timeout)
    head = b""
    while len(head) < 8:
        head += conn.recv(8 - len(head))
    sp.check_header(head, sp.PUSH, "ack")
    reader, out = sp.FrameReader(), []
    while len(out) < n:
        data = conn.recv(sp.READ_SIZE)
        assert data, f"the supervisor closed its ack connection after {len(out)} acks"
        out += reader.feed(data)
    assert len(out) == n
    return out


@pytest.mark.parametrize("mib", [8, 64])
def test_a_start_bigger_than_a_socket_takes_reaches_the_worker(tmp_path, unique, host_runs, mib):
    snk = f"snk{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={snk: RECORDING_SINK})
    host = host_runs.launch(pd, data_transport="sp", command_timeout=60.0)
    items = str(tmp_path / "items.jsonl")
    pad = "x" * (mib << 20)
    s = host.start_sink(snk, f"r{unique}", config={"file": items, "pad": pad}, require_ack=True)
    assert s.collect(b'{"a":1}') == {}
    assert psutil.Process(host.process.pid).num_threads() == 1


def _signal_masks(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":\t") for line in f if line.startswith("Sig"))
                if k in ("SigIgn", "SigCgt")}


def test_the_stack_dump_signal_is_harmless_until_the_worker_installed_its_handler(
        tmp_path, unique, host_runs):
    fn = f"fn{unique}"
    host = host_runs.launch(make_plugin(str(tmp_path), f"kp{unique}",
                                        functions={fn: MODE_FUNCTION, f"fn2{unique}": MODE_FUNCTION}))
    f = host.start_function(fn)
    worker = f.exec(["pid"])["result"]
    zygote = psutil.Process(worker).ppid()
    bit = 1 << (int(DUMP_SIGNAL) - 1)
    # a worker is forked with the zygote's handler (faulthandler writing to /dev/null until
    # the worker points it at its own dump file) or exec'd with the signal ignored, so a dump
    # asked before that does nothing; a running worker dumps its stack on it
    zygote_masks = _signal_masks(zygote)
    assert (zygote_masks["SigIgn"] | zygote_masks["SigCgt"]) & bit
    masks = _signal_masks(worker)
    assert masks["SigCgt"] & bit and not masks["SigIgn"] & bit
    os.kill(zygote, DUMP_SIGNAL)  # the zygote, and every worker it forks later, lives on
    g = host.start_function(f"fn2{unique}")
    assert psutil.Process(g.exec(["pid"])["result"]).ppid() == zygote
    assert f.exec(["pid"])["result"] == worker



def test_under_nng_a_stalled_ack_reader_and_a_missing_function_channel_hold_up_nothing(
        tmp_path, unique, host_runs, monkeypatch):
    """``transport: nng``: acks eKuiper does not read queue in the supervisor (nng's sends
    never wait) and a function channel nobody listens on is dialed in nng's threads, so
    other rules' calls and starts go on as when idle; every ack arrives once read."""
    monkeypatch.setenv("KUIPER_POOL_TRANSPORT", "nng")
    fn, absent_fn, late_fn, snk = f"fn{unique}", f"g{unique}", f"h{unique}", f"snk{unique}"
    pd = make_plugin(str(tmp_path), f"kp{unique}", sinks={snk: RECORDING_SINK},
                     functions={fn: MODE_FUNCTION, absent_fn: MODE_FUNCTION, late_fn: MODE_FUNCTION},
                     settings={"dial_timeout": 2.0})
    host = host_runs.launch(pd, data_transport="sp")
    f = host.start_function(fn)

    def call() -> None:
        assert f.exec(["echo", 2])["result"] == 2

    idle_fn = p99(round_trips(call, 1.0))
    starter, refused = start_in_thread(host, absent_fn)  # nobody listens on its channel
    ack_peer, ctrl, data_url = start_stalled_sink(host, snk, f"r{unique}", tmp_path)
    n_items = 1000
    pusher = None
    try:
        pusher = sp.PushEndpoint(data_url, dial_timeout=5.0, send_timeout=60.0)
        for i in range(n_items):  # far more error acks than a socket takes
            pusher.send(rejected(i))
        starter.start()
        stalled_fn = p99(round_trips(call, 2.0))
        late = host.start_function(late_fn)  # another instance starts meanwhile
        assert late.exec(["echo", 3])["result"] == 3
        starter.join(10.0)
        assert refused and "dial_timeout 2s" in refused[0] and absent_fn in refused[0]
        assert within_idle(stalled_fn, idle_fn), (idle_fn, stalled_fn)
        conn = assert_every_rejection_acked_once(ack_peer, n_items)
        assert_nothing_more(conn)
    finally:
        if pusher is not None:
            pusher.close()
        ack_peer.close()
        stop_quietly(host, ctrl)
