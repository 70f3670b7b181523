"""kuiper_pool's internal messages, typed: the only place both ends agree on them.

* ``StartSpec``: the START frame the supervisor sends a new worker (its instance and the
  settings it needs), encoded as JSON on the worker's link (``frames.py`` frames it);
* the zygote's operations (supervisor -> zygote) and reports (zygote -> supervisor), one
  JSON datagram each on the zygote's socketpair;
* ``is_error_reply``: whether a function reply tells eKuiper the call failed (docs/protocol.md,
  "Functions").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import wire
from . import frames

# supervisor -> zygote: {"op": ZYGOTE_START, "wid"} with the link fd (SCM_RIGHTS),
# {"op": ZYGOTE_KILL, "wid", "sig"}, {"op": ZYGOTE_OWN, "path", "ident"}, {"op": ZYGOTE_DISOWN, "path"};
# a reload: {"op": ZYGOTE_ADOPT, "rundir", "paths": {path: ident}} makes a fresh zygote the one
# that cleans up after the supervisor, {"op": ZYGOTE_RETIRE} makes the old one clean up nothing
ZYGOTE_START = "start"
ZYGOTE_KILL = "kill"
ZYGOTE_OWN = "own"
ZYGOTE_DISOWN = "disown"
ZYGOTE_ADOPT = "adopt"
ZYGOTE_RETIRE = "retire"
# zygote -> supervisor: {"op": ZYGOTE_STARTED, "wid", "pid"}, {"op": ZYGOTE_EXITED, "wid", "pid", "status"},
# {"op": ZYGOTE_REFUSED, "wid", "errno", "error"} (the fork failed: at the process limit, no memory);
# a fresh zygote's first report (reload.py): {"op": ZYGOTE_HELLO, "version", "name", "sources", "sinks",
# "functions", "settings", "checks" (describe.inspect_symbols, or {"error"})} or
# {"op": ZYGOTE_ERROR, "error"} (it cannot serve the new code)
ZYGOTE_STARTED = "started"
ZYGOTE_EXITED = "exited"
ZYGOTE_REFUSED = "refused"
ZYGOTE_HELLO = "hello"
ZYGOTE_ERROR = "error"

# a function reply whose "state" is false, whatever the encoder's spacing
_ERROR_REPLY = re.compile(rb'\s*\{\s*"state"\s*:\s*false\b')


def is_error_reply(data: bytes) -> bool:
    """Whether a function reply (``wire.func_result`` / ``wire.func_error``) is an error."""
    return _ERROR_REPLY.match(data) is not None


@dataclass(frozen=True)
class StartSpec:
    """What a worker is told in its START frame."""

    control: wire.Control
    heartbeat_interval: float
    stop_grace: float
    dial_timeout: float
    max_calls: int = 0
    transport: str = "sp"
    dump_path: str = ""        # where the worker writes its stack when asked (forensics)
    page: bool = False         # a shared page's fd travels with the frame: a lent function's
                               # call page, a sink's collect mark (and item page)
    source_datasource: str = "stream"  # what a source's configure gets (config.py)

    def frame(self) -> bytes:
        return frames.encode_json(frames.START, {
            "control": self.control.to_dict(), "heartbeat_interval": self.heartbeat_interval,
            "stop_grace": self.stop_grace, "dial_timeout": self.dial_timeout,
            "max_calls": self.max_calls, "transport": self.transport,
            "dump_path": self.dump_path, "page": self.page,
            "source_datasource": self.source_datasource})

    @classmethod
    def decode(cls, payload: bytes) -> "StartSpec":
        d: Any = frames.decode_json(payload)
        return cls(wire.Control.from_dict(d["control"]), float(d["heartbeat_interval"]),
                   float(d["stop_grace"]), float(d["dial_timeout"]), int(d["max_calls"]),
                   str(d["transport"]), str(d["dump_path"]), bool(d["page"]),
                   str(d["source_datasource"]))
