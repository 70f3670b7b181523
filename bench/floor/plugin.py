"""The floor of eKuiper's round trips: a bare portable plugin, no runtime (bench/hotpath.py --floor).

Started as eKuiper starts a plugin (``<python> -u plugin.py '<json>'``), it speaks the
protocol (docs/protocol.md) with nothing but SP framing (``kuiper_pool.transport.sp``):
answers every command ``ok``, dials or listens as each kind needs and then serves each
connection in a thread of its own: a function answers ``{"state": true, "result": <its first
argument>}``, an acked sink acks ``{}``, a source pushes one small message after another.
With ``FLOOR_PEER`` (the compiled bench/floor/peer.c) the connections go to that program
instead, so the figures are the host's own round trip with a peer that costs next to nothing.
``BENCH_PLUGIN`` names the plugin (its control path).
"""
import json
import os
import struct
import subprocess
import sys
import threading

from kuiper_pool.transport import sp

PEER = os.environ.get("FLOOR_PEER")
_ID = struct.Struct(">I")
_FRAME = struct.Struct(">BQ")
SOURCE_ITEM = sp.frame(b'{"message":{"i":1},"meta":null}')
ACK = sp.frame(b"{}")


def recv_exact(sock, n):
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError
        got += chunk
    return bytes(got)


def recv_msg(sock):
    _kind, n = _FRAME.unpack(recv_exact(sock, _FRAME.size))
    return recv_exact(sock, n)


def hand_over(*args):
    """Give connections to the C peer (it ends when eKuiper closes them)."""
    fds = tuple(int(a) for a in args[1:])
    subprocess.Popen([PEER, *args], pass_fds=fds)


def serve(target, *args):
    threading.Thread(target=target, args=args, daemon=True).start()


def source(ctrl):
    meta = ctrl["meta"]
    path = "/tmp/%s_%s_%d.ipc" % (meta["ruleId"], meta["opId"], meta["instanceId"])
    sock = sp.connect(path, sp.PUSH, sp.PULL, 5.0)
    if PEER:
        return hand_over("source", str(sock.fileno()))

    def push():
        try:
            while True:
                sock.sendall(SOURCE_ITEM)
        except OSError:
            pass
    serve(push)


def sink(ctrl):
    meta = ctrl["meta"]
    base = "/tmp/%s_%s_%d" % (meta["ruleId"], meta["opId"], meta["instanceId"])
    listener, _ident = sp.listen(base + ".ipc")
    listener.setblocking(True)
    acks = sp.connect(base + "_ack.ipc", sp.PUSH, sp.PULL, 5.0)
    require_ack = (ctrl.get("config") or {}).get("requireAck") is True

    def take():
        conn, _ = listener.accept()  # eKuiper dials right after our answer
        os.unlink(base + ".ipc")
        conn.setblocking(True)
        conn.sendall(sp.header(sp.PULL))
        sp.check_header(recv_exact(conn, 8), sp.PUSH, base)
        if PEER:
            return hand_over("sink", str(conn.fileno()), *([str(acks.fileno())] if require_ack else []))
        try:
            while True:
                recv_msg(conn)
                if require_ack:
                    acks.sendall(ACK)
        except (EOFError, OSError):
            pass
    serve(take)


def function(ctrl):
    sock = sp.connect("/tmp/func_%s.ipc" % ctrl["symbolName"], sp.REQ, sp.REP, 5.0)
    sock.sendall(sp.frame(_ID.pack(0x80000001) + b"handshake"))
    if PEER:
        return hand_over("func", str(sock.fileno()))

    def answer():
        try:
            while True:
                msg = recv_msg(sock)
                call = json.loads(msg[4:])
                result = (call["arg"][0] if call["func"] == "Exec" else
                          False if call["func"] == "IsAggregate" else "")
                reply = json.dumps({"state": True, "result": result}).encode()
                sock.sendall(sp.frame(_ID.pack(sp.next_id(_ID.unpack_from(msg)[0])) + reply))
        except (EOFError, OSError):
            pass
    serve(answer)


KINDS = {"source": source, "sink": sink, "func": function}


def main():
    ctrl_sock = sp.connect("/tmp/plugin_%s.ipc" % os.environ["BENCH_PLUGIN"], sp.REQ, sp.REP, 10.0)
    request_id = 0x80000001
    ctrl_sock.sendall(sp.frame(_ID.pack(request_id) + b"handshake"))
    while True:
        cmd = json.loads(recv_msg(ctrl_sock)[4:])
        ctrl = json.loads(cmd["arg"])
        if cmd["cmd"] == "start":
            KINDS[ctrl["pluginType"]](ctrl)
        request_id = sp.next_id(request_id)
        ctrl_sock.sendall(sp.frame(_ID.pack(request_id) + b"ok"))


if __name__ == "__main__":
    sys.exit(main())
