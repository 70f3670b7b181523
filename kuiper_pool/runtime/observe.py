"""What the supervisor shows: psutil samples of its workers and the status snapshot
(schema in ``status.py``) that ``kuiper-pool status`` and the metrics serve."""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..version import __version__
from .effects import process_of
from .instances import RUNNING
from .states import WAITING
from .status import Snapshot

if TYPE_CHECKING:
    from .supervisor import Supervisor

PYTHON = ".".join(map(str, sys.version_info[:3]))


def sample(sup: "Supervisor") -> None:
    """psutil figures of every worker process, read once each: memory, CPU share since the
    last sample, CPU time. A shared worker's go on its host, counted once, and on each of its
    instances' vitals (for their health checks)."""
    shared = sup.fx.shared
    for host in list(shared.hosts.values()):
        if host.proc is None and host.pid:
            host.proc = process_of(host.pid)
        got = _figures(host.proc) if host.proc is not None else None
        if got is not None:
            host.rss, host.cpu_percent, host.cpu_seconds = got
            for w in host.handles.values():
                w.vitals.rss, w.vitals.cpu_percent, w.vitals.cpu_seconds = got
    for w, _inst, _link in list(sup.fx.workers.values()):
        proc = None if w.shared else sup.fx.proc(w)
        got = _figures(proc) if proc is not None else None
        if got is not None:
            w.vitals.rss, w.vitals.cpu_percent, w.vitals.cpu_seconds = got


def _figures(proc: Any) -> Optional[Tuple[int, float, float]]:
    """RSS, CPU percent and CPU seconds of a psutil.Process (None: gone meanwhile)."""
    try:
        with proc.oneshot():
            t = proc.cpu_times()
            return proc.memory_info().rss, proc.cpu_percent(None), t.user + t.system
    except Exception:  # noqa: BLE001 - psutil.Error: gone meanwhile
        return None


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
                              if inst.state in WAITING and inst.restart_at else None),
            "last_error": inst.last_error, "last_error_at": inst.last_error_at or None,
            "rss": v.rss if v else 0,
            "cpu_percent": v.cpu_percent if v else 0.0,
            "items_in": items_in, "items_out": items_out, "errors": errors,
            "cpu_seconds": inst.cpu_seconds + (v.cpu_seconds if v else 0.0)})
    return {"plugin": sup.plugin.name, "version": __version__, "pid": os.getpid(),
            "zygote_pid": sup.zygote.pid, "uptime": now - sup.started_at, "time": now,
            "python": PYTHON, "started": sup.started_at, "instances": rows,
            "shared_workers": shared_workers(sup)}


def shared_workers(sup: "Supervisor") -> List[Dict[str, Any]]:
    """Every live shared worker process, its figures once and the instances it runs (none
    while it is let go, or with a thread that would not end)."""
    out = []
    for host in sup.fx.shared.hosts.values():
        if not host.pid:
            continue
        held = [sup.fx.workers[wid][1].ctrl for wid in host.handles if wid in sup.fx.workers]
        out.append({"symbol": host.symbol, "type": host.kind, "pid": host.pid,
                    "instances": [{"rule": c.rule_id, "op": c.op_id, "instance": c.instance_id}
                                  for c in held],
                    "rss": host.rss, "cpu_percent": host.cpu_percent, "cpu_seconds": host.cpu_seconds})
    return out
