"""Metrics in tests: read kuiper_pool's Prometheus text strictly (every line is HELP, TYPE or
a sample; each family is announced once, before its samples, and its samples are not
interleaved with another family's, as the format requires), and run ``kuiper-pool metrics``."""
from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Dict, FrozenSet, Tuple

import pytest

from conftest import kuiper_pool_command

Sample = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]
_SAMPLE = re.compile(r'^(kuiper_pool_\w+)\{((?:\w+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.e+]+)$')


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> Sample:
    """GET ``url`` and parse it."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def parse(text: str) -> Sample:
    samples: Sample = {}
    typed, done = set(), set()
    current = ""
    for line in text.splitlines():
        m = re.match(r"^# (HELP|TYPE) (kuiper_pool_\w+) (.+)$", line)
        if m:
            if m.group(1) == "TYPE":
                assert m.group(3) in ("counter", "gauge"), line
                assert m.group(2) not in typed, f"{m.group(2)} announced twice"
                typed.add(m.group(2))
            continue
        m = _SAMPLE.match(line)
        assert m, f"not Prometheus text: {line!r}"
        name = m.group(1)
        assert name in typed, f"{name} has no TYPE line before it"
        if name != current:
            assert name not in done, f"{name}'s samples are not in one group"
            done.add(current)
            current = name
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        assert (name, labels) not in samples, f"a second sample of {name} {sorted(labels)}"
        samples[(name, labels)] = float(m.group(3))
    return samples


def value(samples: Sample, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 if there is none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


class Exporter:
    """A running ``kuiper-pool metrics``; ``url`` is where it says it serves."""

    def __init__(self, reaper, *args: str) -> None:
        self.proc = subprocess.Popen(kuiper_pool_command() + ["metrics", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        reaper(self.proc.pid)
        self.line = self.first_line()
        self.url = self.line.rsplit(" at ", 1)[1].split()[0]

    def first_line(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                return self.proc.stdout.readline().strip()
            if self.proc.poll() is not None:
                pytest.fail(f"kuiper-pool metrics exited: {self.proc.stderr.read()}")
        pytest.fail("kuiper-pool metrics said nothing within 30 s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code
