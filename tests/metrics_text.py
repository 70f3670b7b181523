"""Read kuiper_pool's Prometheus text as Prometheus does, strictly: every line is HELP, TYPE
or a sample; each family is announced once, before its samples, and its samples are not
interleaved with another family's (the format requires a family in one group)."""
from __future__ import annotations

import re
import urllib.request
from typing import Dict, FrozenSet, Tuple

Sample = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]
_SAMPLE = re.compile(r'^(kuiper_pool_\w+)\{((?:\w+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.e+]+)$')


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
