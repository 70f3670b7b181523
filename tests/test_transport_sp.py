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
from faulty_plugins import tamper_memfds
from kuiper_pool.transport import TransportError, TransportTimeout, sp
from kuiper_pool.transport.outbox import Outbox


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


def item_memfds() -> int:
    """Item memfds this process holds (a mapped one has two descriptors: mmap keeps a dup)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kuiper_pool-item"):
                found.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:  # the fd listdir itself used
            pass
    return len(found)


@pytest.mark.parametrize("pooled", [True, False], ids=["pool", "no-future-write"])
def test_pull_spills_big_messages_into_sealed_memfds_whole_and_in_order(url, pooled):
    """With ``spill``, messages of that size or more arrive as memfds holding exactly their
    bytes (read once, sealed), between the small ones, in order; a big message cut by its
    peer's close is dropped, and the next peer's arrive. Without F_SEAL_FUTURE_WRITE (the
    pool switched off, as the kernel's EINVAL leaves it) each gets a fresh sealed memfd."""
    pull = sp.PullEndpoint(url, spill=1 << 18)
    pull.pool.pooling = pooled
    try:
        with pusher(url) as push:
            sent = [b"s0", os.urandom(8 << 20), b"s1", os.urandom(1 << 18), os.urandom((1 << 18) - 1),
                    os.urandom(1 << 20), b""]
            send_in_thread(push, sent)
            got = recv_all(pull, len(sent), timeout=30)
        assert [isinstance(m, sp.Spilled) for m in got] == [False, True, False, True, False, True, False]
        assert all(isinstance(m, sp.PooledSpill if pooled else sp.SealedSpill) for m in got[1::2])
        assert [m if isinstance(m, bytes) else os.pread(m.fileno(), len(m), 0) for m in got] == sent
        found, done = tamper_memfds("/proc/self/fd")
        assert found >= 3 and done == [] and os.pread(got[1].fileno(), len(sent[1]), 0) == sent[1]
        with raw_peer(url, pull) as raw:
            raw.sendall(sp.header(sp.PUSH) + struct.pack(">BQ", 1, 1 << 20) + b"x" * 1000)
            wait_until(lambda: pull.recv_many(10) == [] and any(p.reader.body for p in pull.pipes.values()),
                       5, message="a big message begun")
        wait_until(lambda: pull.recv_many(10) == [] and not pull.pipes, 5, message="the cut peer dropped")
        with pusher(url) as push:
            send_in_thread(push, [b"after"])
            assert recv_all(pull, 1) == [b"after"]
    finally:
        pull.close()


def test_pooled_memfds_are_reused_bounded_hold_each_message_exactly_and_go_at_close(url):
    """Messages of mixed sizes, each dropped once read (as a sink's finished item): each
    memfd holds exactly its message when it arrives, even one written where a bigger message
    was; finished memfds are reused (no more than KEEP kept free) and a message over
    LARGEST gets a sealed memfd of its own. close() releases the free ones, and a message
    still held then releases its own when it goes."""
    pull = sp.PullEndpoint(url, spill=1 << 18)
    kib = [4096, 300, 1024, 256, 2048, 700, 3000, 260, 1024, 512, 4000, 300, 1500, 256] * 2
    sent = [os.urandom(k << 10) for k in kib] + [os.urandom((16 << 20) + 1)]
    seen = set()
    try:
        with pusher(url) as push:
            sender = send_in_thread(push, sent)
            for i, data in enumerate(sent):
                [m] = recv_all(pull, 1, timeout=30)
                assert os.pread(m.fileno(), len(data), 0) == data, f"message {i}"
                assert isinstance(m, sp.PooledSpill if len(data) <= sp.MemfdPool.LARGEST else sp.SealedSpill)
                found, done = tamper_memfds("/proc/self/fd")
                assert found >= 1 and done == []
                seen.add(os.fstat(m.fileno()).st_ino)
                del m
                assert len(pull.pool.free) <= sp.MemfdPool.KEEP
            sender.join(10)
            assert len(seen) < len(kib) // 3, "finished memfds were not reused"
            send_in_thread(push, [os.urandom(1 << 20)])
            [held] = recv_all(pull, 1)
        assert item_memfds() == len(pull.pool.free) + 1
    finally:
        pull.close()
    assert pull.pool.free == [] and item_memfds() == 1
    del held
    assert item_memfds() == 0


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


# --- never blocking: the outbox, silent peers, stalled readers --------------------------------------

def test_an_outbox_keeps_what_the_socket_does_not_take_in_order_with_descriptors():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    watched: list = []
    box = Outbox(ours, watched.append)
    r, w = os.pipe()
    try:
        assert box.write(b"a" * 10)                     # taken at once: nothing queued
        big = bytes(range(256)) * 16384                 # 4 MiB: more than the socket takes
        assert not box.write(big) and len(box) > 0 and watched == [True]
        assert not box.write(b"fd", [w])                # the descriptor waits with its frame
        os.close(w)                                     # the caller's copy may go at once
        got, fds = bytearray(), []
        theirs.setblocking(False)
        while len(got) < 10 + len(big) + 2:
            box.flush()
            try:
                data, more, _flags, _addr = socket.recv_fds(theirs, 1 << 20, 4)
            except BlockingIOError:
                continue
            got += data
            fds += more
        assert bytes(got) == b"a" * 10 + big + b"fd" and len(box) == 0 and watched == [True, False]
        assert len(fds) == 1
        os.write(fds[0], b"!")                          # the same pipe travelled
        assert os.read(r, 1) == b"!"
        os.close(fds[0])
    finally:
        ours.close()
        theirs.close()
        os.close(r)


def test_a_packet_outbox_keeps_each_message_whole_and_in_order_with_its_descriptor():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    box = Outbox(ours, packets=True)
    r, w = os.pipe()
    try:
        n = 0
        while box.write(b"%d:" % n + b"m" * 1000):      # until the zygote's socket is full
            n += 1
        box.write(b"start", [w])
        os.close(w)
        got, fds = [], []
        theirs.setblocking(False)
        while len(got) < n + 2:
            box.flush()
            try:
                msg, more, _flags, _addr = socket.recv_fds(theirs, 65536, 4)
            except BlockingIOError:
                continue
            got.append(msg)
            fds += more
        assert [m.split(b":")[0] for m in got[:n + 1]] == [b"%d" % i for i in range(n + 1)]
        assert got[-1] == b"start" and len(fds) == 1 and not box.queue
        os.close(fds[0])
    finally:
        ours.close()
        theirs.close()
        os.close(r)


def test_a_push_dialer_never_blocks_on_a_pull_that_does_not_read_and_loses_nothing(url):
    with pynng.Pull0(listen=url, recv_buffer_size=1, recv_timeout=5000) as pull:
        push = sp.PushDialer(url)
        try:
            wait_until(lambda: (push.pump(time.monotonic()), push.connected())[-1], message="the dial")
            n = 0
            while push.pending() < 4 << 20:              # far past what the peer takes
                push.send(b"%d:" % n + b"x" * 4000)
                n += 1
            got = []

            def drained():
                push.pump(time.monotonic())
                try:
                    got.append(pull.recv(block=False))
                except pynng.TryAgain:
                    pass
                return len(got) == n
            wait_until(drained, 30, interval=0, message=f"{n} messages")
            assert [m.split(b":")[0] for m in got] == [b"%d" % i for i in range(n)]
            assert push.pending() == 0
        finally:
            push.close()


class SilentListener:
    """Accepts connections and never answers: a peer stuck before its SP header."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def test_a_peer_silent_after_accept_is_redialed_without_blocking_then_a_real_one_answers(url):
    silent = SilentListener(sp.path_of(url))
    try:
        req = sp.ReqEndpoint(url, dial_timeout=0)       # returns at once: connect, no header yet
        first, _ = silent.sock.accept()
        assert first.recv(8) == sp.header(sp.REQ)
        assert not req.connected() and req.recv() is None

        def given_up():
            req.tick(time.monotonic())
            first.setblocking(False)
            try:
                return first.recv(1) == b""             # closed after HEADER_TIMEOUT
            except BlockingIOError:
                return False
        wait_until(given_up, 5, message="the silent connection to be closed")
        silent.sock.setblocking(False)

        def redialed():                                  # and dialed again, after a backoff
            req.tick(time.monotonic())
            try:
                return silent.sock.accept()[0]
            except BlockingIOError:
                return None
        second = wait_until(redialed, 5, message="a redial")
        second.settimeout(5)
        assert second.recv(8) == sp.header(sp.REQ)
        first.close()
        second.close()
    finally:
        silent.close()
    with pynng.Rep0(listen=url, recv_timeout=5000) as host:
        wait_until(lambda: (req.tick(time.monotonic()), req.connected())[-1], 10, message="a dial")
        assert host.recv() == b"handshake"
        host.send(b"call")
        assert req_recv(req) == b"call"
        req.close()


def test_a_push_dialer_holds_acks_until_its_first_connection_is_up(url):
    push = sp.PushDialer(url)                            # nobody listens yet: no wait
    try:
        push.send(b"one")
        push.send(b"two")
        with pynng.Pull0(listen=url, recv_timeout=5000) as pull:
            wait_until(lambda: (push.tick(time.monotonic() + 10), push.connected())[-1],
                       10, message="a dial")
            push.pump(time.monotonic())
            assert [pull.recv(), pull.recv()] == [b"one", b"two"]
    finally:
        push.close()


def test_acks_queued_while_a_peer_stays_silent_go_to_the_next_connection(url):
    silent = SilentListener(sp.path_of(url))
    push = sp.PushDialer(url)                            # connects; the header never comes
    try:
        push.send(b"kept")
        conn, _ = silent.sock.accept()
        wait_until(lambda: (push.tick(time.monotonic()), push.sock is None)[-1], 5,
                   message="the silent peer to be given up")
        conn.close()
    finally:
        silent.close()
    try:
        with pynng.Pull0(listen=url, recv_timeout=5000) as pull:
            wait_until(lambda: (push.tick(time.monotonic() + 10), push.connected())[-1],
                       10, message="a dial")
            assert pull.recv() == b"kept" and push.pending() == 0
    finally:
        push.close()


def test_the_receive_buffer_is_each_process_own_after_a_fork():
    """The supervisor reads before it forks the zygote, which forks every worker: a receive
    buffer shared across those forks would let one process overwrite what another parses."""
    a, b = socket.socketpair()
    try:
        a.send(b"parent")
        assert bytes(sp.recv_view(b)) == b"parent"
        pid = os.fork()
        if pid == 0:  # the child reads into its buffer, then exits without cleanup
            a.send(b"CHILD!")
            sp.recv_view(b)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bytes(sp.scratch()[:6]) == b"parent"
    finally:
        a.close()
        b.close()
