"""Native SP over ipc (transport/sp.py) against pynng, an independent implementation of the
same wire (nng), in every role the plugin side plays: REQ dialer used the inverted eKuiper
way (and its lending to a worker), PULL listener, PUSH dialer; plus malformed peers on raw
sockets, peer restarts, and the rules for the socket file."""
from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time

import pynng
import pytest

from conftest import wait_until
from kuiper_pool.transport import TransportError, TransportTimeout, sp


@pytest.fixture
def url(ipc_leak_check, unique):
    return f"ipc:///tmp/{unique}_t.ipc"


def poll(endpoint, n: int = 1 << 20, timeout: float = 5.0) -> list:
    """What ``recv_many`` returns once something is there."""
    got: list = []
    wait_until(lambda: got.extend(endpoint.recv_many(n)) or got, timeout, message="messages")
    return got


def pusher(url: str) -> pynng.Push0:
    """A pynng PUSH dialing in the background (a blocking dial would wait for our accept)."""
    push = pynng.Push0(send_timeout=5000)
    push.dial(url, block=False)
    return push


def send_in_thread(push: pynng.Socket, messages: list) -> threading.Thread:
    """pynng's dialer needs our listener to accept (inside recv_many) before a send returns."""
    t = threading.Thread(target=lambda: [push.send(m) for m in messages], daemon=True)
    t.start()
    return t


def recv_all(endpoint, count: int, timeout: float = 10.0) -> list:
    got: list = []
    wait_until(lambda: got.extend(endpoint.recv_many(1 << 20)) or len(got) >= count, timeout,
               interval=0.001, message=f"{count} messages")
    return got


# --- REQ used the eKuiper way ------------------------------------------------------------------

def req_recv(req: sp.ReqEndpoint, timeout: float = 5.0) -> bytes:
    got: list = []

    def ready():
        req.tick(time.monotonic())
        msg = req.recv()
        if msg is not None:
            got.append(msg)
        return got
    wait_until(ready, timeout, interval=0.001, message="eKuiper's message")
    return got[0]


def test_req_handshakes_then_takes_commands_as_replies_and_answers_as_requests(url):
    with pynng.Rep0(listen=url, recv_timeout=5000) as host:
        req = sp.ReqEndpoint(url, dial_timeout=5)
        try:
            assert host.recv() == b"handshake"
            host.send(b'{"cmd":"start"}')
            assert req_recv(req) == b'{"cmd":"start"}'
            req.send(b"ok")
            assert host.recv() == b"ok"
            host.send(b"")                       # a 0-byte command is a message too
            assert req_recv(req) == b""
            req.send(b"bad command")
            assert host.recv() == b"bad command"
        finally:
            req.close()


def test_req_redials_a_restarted_host_and_sends_a_handshake_there(url):
    host = pynng.Rep0(listen=url, recv_timeout=5000)
    req = sp.ReqEndpoint(url, dial_timeout=5)
    try:
        assert host.recv() == b"handshake"
        host.send(b"call-1")
        assert req_recv(req) == b"call-1"
        host.close()                             # eKuiper restarts its listener
        wait_until(lambda: (req.recv(), req.tick(time.monotonic()), not req.connected())[-1],
                   message="the loss to be noticed")
        req.send(b"answer-1")                    # kept while nobody listens
        host = pynng.Rep0(listen=url, recv_timeout=5000)
        wait_until(lambda: (req.tick(time.monotonic() + 10), req.connected())[-1],
                   message="a redial")
        assert host.recv() == b"answer-1"        # the kept answer goes out on the new pipe
        host.send(b"call-2")
        assert req_recv(req) == b"call-2"
    finally:
        req.close()
        host.close()


def test_a_lent_connection_keeps_the_request_ids_straight(url):
    """detach() hands the socket to a worker: replies must echo the request the worker
    knows as outstanding, and its answers must be new requests eKuiper accepts."""
    with pynng.Rep0(listen=url, recv_timeout=5000) as host:
        req = sp.ReqEndpoint(url, dial_timeout=5)
        assert host.recv() == b"handshake"
        sock, request_id, buffered = req.detach()
        conn = sp.ReqConnection(sock, request_id, buffered)
        try:
            for i in range(3):
                host.send(b"call-%d" % i)
                assert conn.recv_ready() == [b"call-%d" % i]
                conn.send(b"reply-%d" % i)
                assert host.recv() == b"reply-%d" % i
        finally:
            conn.close()
            req.close()


def test_dial_gives_up_after_its_timeout_with_one_line(url):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="cannot dial ipc:///tmp/.*_t.ipc") as e:
        sp.ReqEndpoint(url, dial_timeout=0.2)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 5


# --- PULL listener ---------------------------------------------------------------------------------

def test_pull_receives_in_order_from_a_pynng_push_including_empty_and_huge_messages(url):
    pull = sp.PullEndpoint(url)
    try:
        with pusher(url) as push:
            sent = [b"m%d" % i for i in range(2000)] + [b""]
            send_in_thread(push, sent)
            assert recv_all(pull, len(sent)) == sent
            big = os.urandom(1024) * (100 * 1024)  # 100 MiB
            send_in_thread(push, [big])
            assert recv_all(pull, 1, timeout=30) == [big]
    finally:
        pull.close()


def test_pull_takes_two_peers_and_at_most_n_at_a_time(url):
    pull = sp.PullEndpoint(url)
    try:
        with pusher(url) as a, pusher(url) as b:
            send_in_thread(a, [b"a%d" % i for i in range(10)])
            send_in_thread(b, [b"b%d" % i for i in range(10)])
            first = poll(pull, n=3)
            assert len(first) == 3
            rest = recv_all(pull, 17)
            got = first + rest
            assert sorted(got) == sorted([b"a%d" % i for i in range(10)] + [b"b%d" % i for i in range(10)])
            assert [m for m in got if m.startswith(b"a")] == [b"a%d" % i for i in range(10)]
    finally:
        pull.close()


def raw_peer(url: str, pull: sp.PullEndpoint) -> socket.socket:
    """A hand-made peer, connected and accepted (the listener sends its header first)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sp.path_of(url))
    s.settimeout(5)
    wait_until(lambda: pull.recv_many(1) == [] and pull.pipes, message="the accept")
    assert s.recv(8) == sp.header(sp.PULL)
    return s


def test_items_left_in_the_endpoint_keep_its_fd_readable(url):
    import select

    pull = sp.PullEndpoint(url)
    try:
        peer = raw_peer(url, pull)
        peer.sendall(sp.header(sp.PUSH) + b"".join(sp.frame(b"%d" % i) for i in range(5)))
        assert poll(pull, n=1) == [b"0"]  # one read took all five in
        readable, _, _ = select.select([pull.fileno()], [], [], 1.0)
        assert readable, "read items wait inside: the outer selector must still wake"
        assert pull.recv_many(10) == [b"1", b"2", b"3", b"4"]
        readable, _, _ = select.select([pull.fileno()], [], [], 0)
        assert not readable
        peer.close()
    finally:
        pull.close()


@pytest.mark.parametrize("garbage", [
    sp.header(sp.REQ),                                         # wrong protocol id
    b"GET / HTTP/1.1\r\n\r\n",                                 # not SP at all
    sp.header(sp.PUSH) + sp.header(sp.PUSH),                   # a second header
    sp.header(sp.PUSH) + b"\x02" + struct.pack(">Q", 1) + b"x",  # message type 2
    sp.header(sp.PUSH) + b"\x01" + struct.pack(">Q", 100) + b"cut",  # cut by the close
])
def test_a_malformed_peer_is_dropped_and_the_next_good_one_is_served(url, garbage):
    pull = sp.PullEndpoint(url)
    try:
        bad = raw_peer(url, pull)
        bad.sendall(garbage)
        bad.close()
        wait_until(lambda: pull.recv_many(10) == [] and not pull.pipes, message="the drop")
        with pusher(url) as push:
            send_in_thread(push, [b"good"])
            assert poll(pull) == [b"good"]
    finally:
        pull.close()


def test_whole_frames_before_a_cut_are_delivered(url):
    pull = sp.PullEndpoint(url)
    try:
        peer = raw_peer(url, pull)
        peer.sendall(sp.header(sp.PUSH) + sp.frame(b"one") + sp.frame(b"two") + b"\x01\x00\x00")
        peer.close()
        assert recv_all(pull, 2) == [b"one", b"two"]
    finally:
        pull.close()


# --- PUSH dialer -------------------------------------------------------------------------------------

def test_push_delivers_in_order_to_a_pynng_pull(url):
    with pynng.Pull0(listen=url, recv_timeout=5000) as pull:
        push = sp.PushEndpoint(url, dial_timeout=5, send_timeout=1)
        try:
            for i in range(5000):
                push.send(b"%d" % i)
            push.flush()
            assert [pull.recv() for _ in range(5000)] == [b"%d" % i for i in range(5000)]
        finally:
            push.close()


def test_push_raises_transport_timeout_when_nobody_reads(url):
    with pynng.Pull0(listen=url, recv_buffer_size=1) as _pull:
        push = sp.PushEndpoint(url, dial_timeout=5, send_timeout=0.2)
        try:
            with pytest.raises(TransportTimeout):
                for _ in range(10000):
                    push.send(b"x" * 65536)
        finally:
            push.close()


def test_push_redials_a_restarted_listener(url):
    pull = pynng.Pull0(listen=url, recv_timeout=5000)
    push = sp.PushEndpoint(url, dial_timeout=5, send_timeout=1)
    try:
        push.send(b"before")
        assert pull.recv() == b"before"
        pull.close()
        pull = pynng.Pull0(listen=url, recv_timeout=200)

        def delivered():
            push.send(b"after")
            try:
                return pull.recv() == b"after"
            except pynng.Timeout:
                return False
        wait_until(delivered, 10, message="a send after the listener came back")
    finally:
        push.close()
        pull.close()


# --- the socket file ------------------------------------------------------------------------------------

def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(url):
    path = sp.path_of(url)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()                                   # the file stays, nobody listens
    pull = sp.PullEndpoint(url)
    try:
        with pytest.raises(TransportError, match="address in use"):
            sp.PullEndpoint(url)
    finally:
        pull.close()
    assert not os.path.exists(path)


def test_the_socket_file_is_0600_whatever_the_umask(url):
    old = os.umask(0)
    try:
        pull = sp.PullEndpoint(url)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(sp.path_of(url)).st_mode) == 0o600
    finally:
        pull.close()


def test_close_leaves_a_file_someone_else_created_in_its_place(url):
    path = sp.path_of(url)
    pull = sp.PullEndpoint(url)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)                                # a new owner listens there now
    try:
        pull.close()
        assert os.path.exists(path)
    finally:
        other.close()
        os.unlink(path)
