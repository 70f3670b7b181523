"""The bare peer of the raw transport measurements in bench/run.py (section 6).

    python bench/nng_raw.py push <url> <size>   dial <url>, send <size>-byte messages flat out
    python bench/nng_raw.py rep <url>           dial <url>, echo every request
    python bench/nng_raw.py sp-push <url> <size>  the same natively (SP over ipc framing on a
    python bench/nng_raw.py sp-rep <url>          Unix socket, one frame per write, as mangos)
    python bench/nng_raw.py burn <seconds> <loops>  CPU-bound calls (the bench plugin's Burn)
                                                for <seconds>; prints calls/s (no nng at all)

The driver listens (so it owns the ipc file) and measures; this process only dials, and
exits when the driver stops reading (send/recv time out or the socket closes) or dies.
"""
import os
import sys
import time

import pynng

from kuiper_pool.transport import sp


def burn(loops):
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1000003
    return acc


def main(argv):
    role, url = argv[1], argv[2]
    if role == "burn":
        seconds, loops, n = float(argv[2]), int(argv[3]), 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            burn(loops)
            n += 1
        print(n / (time.perf_counter() - t0), flush=True)
        return 0
    parent = os.getppid()
    if role == "sp-push":
        data = sp.frame(b"x" * int(argv[3]))
        sock = sp.connect(sp.path_of(url), sp.PUSH, sp.PULL, 5.0)
        sock.settimeout(2.0)
        try:
            while True:
                for _ in range(1000):
                    sock.sendall(data)
                if os.getppid() != parent:
                    return 0
        except OSError:
            return 0
        finally:
            sock.close()
    if role == "sp-rep":
        sock = sp.connect(sp.path_of(url), sp.REP, sp.REQ, 5.0)
        sock.settimeout(2.0)
        reader = sp.FrameReader()
        try:
            while True:
                data = sock.recv(sp.READ_SIZE)
                if not data:
                    return 0
                for msg in reader.feed(data):
                    sock.sendall(sp.frame(msg))
        except OSError:
            return 0
        finally:
            sock.close()
    if role == "push":
        payload = b"x" * int(argv[3])
        with pynng.Push0(send_timeout=2000) as sock:
            sock.dial(url, block=True)
            send = sock.send
            try:
                while True:
                    for _ in range(1000):
                        send(payload)
                    if os.getppid() != parent:
                        return 0
            except pynng.NNGException:
                return 0
    if role == "rep":
        with pynng.Rep0(recv_timeout=2000) as sock:
            sock.dial(url, block=True)
            try:
                while True:
                    sock.send(sock.recv())
            except pynng.NNGException:
                return 0
    print(f"unknown role {role!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
