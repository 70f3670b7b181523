"""What the supervisor shows: psutil samples of its workers and the status snapshot
(schema in ``status.py``) that ``kuiper-pool status`` and the metrics serve."""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Dict, Tuple

from ..version import __version__
from .instances import BACKOFF, FAILED, RUNNING
from .status import Snapshot

if TYPE_CHECKING:
    from .supervisor import Supervisor

PYTHON = ".".join(map(str, sys.version_info[:3]))


def sample(sup: "Supervisor") -> None:
    """psutil figures of every worker: memory, CPU share since the last sample, CPU time;
    read once per process (a shared worker's are every one of its instances')."""
    seen: Dict[int, Tuple[int, float, float]] = {}
    for w, _inst, _link in list(sup.fx.workers.values()):
        v = w.vitals
        if w.pid in seen:
            v.rss, v.cpu_percent, v.cpu_seconds = seen[w.pid]
            continue
        proc = sup.fx.proc(w)
        if proc is None:
            continue
        try:
            with proc.oneshot():
                v.rss = proc.memory_info().rss
                v.cpu_percent = proc.cpu_percent(None)
                t = proc.cpu_times()
                v.cpu_seconds = t.user + t.system
        except Exception:  # noqa: BLE001 - psutil.Error: gone meanwhile
            continue
        seen[w.pid] = (v.rss, v.cpu_percent, v.cpu_seconds)


def snapshot(sup: "Supervisor") -> Snapshot:
    """Everything ``kuiper-pool status`` and the metrics show."""
    now, mono = time.time(), time.monotonic()
    rows = []
    for inst in sup.instances.values():
        w, c = inst.worker, inst.ctrl
        v = w.vitals if w is not None else None
        items_in, items_out, errors = inst.counts()
        rows.append({
            "symbol": c.symbol, "type": c.plugin_type, "rule": c.rule_id, "op": c.op_id,
            "instance": c.instance_id, "pid": (w.pid or None) if w is not None else None,
            "shared": w is not None and sup.fx.shared.is_shared(w),
            "state": inst.state.value,
            "uptime": mono - inst.running_since if inst.state is RUNNING else 0.0,
            "restarts": inst.restarts, "restart_causes": dict(inst.restart_causes),
            "recent_restarts": list(inst.recent_restarts),
            "next_retry_at": (now + max(inst.restart_at - mono, 0.0)
                              if inst.state in (BACKOFF, FAILED) and inst.restart_at else None),
            "last_error": inst.last_error, "last_error_at": inst.last_error_at or None,
            "rss": v.rss if v else 0,
            "cpu_percent": v.cpu_percent if v else 0.0,
            "items_in": items_in, "items_out": items_out, "errors": errors,
            "cpu_seconds": inst.cpu_seconds + (v.cpu_seconds if v else 0.0)})
    return {"plugin": sup.plugin.name, "version": __version__, "pid": os.getpid(),
            "zygote_pid": sup.zygote.pid, "uptime": now - sup.started_at, "time": now,
            "python": PYTHON, "started": sup.started_at, "instances": rows}
