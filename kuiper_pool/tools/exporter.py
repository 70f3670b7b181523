"""``kuiper-pool metrics``: one HTTP endpoint with the metrics of every plugin of a node.

Each supervisor answers on its status socket in the private runtime directory (no TCP port
per plugin); on every scrape this exporter asks each socket it finds there for its
snapshot and serves them all as one Prometheus text, labelled by plugin. A socket nobody
listens on (a killed supervisor's) is skipped; a supervisor that does not answer within
``ASK_TIMEOUT`` is ``kuiper_pool_up{plugin=...} 0``.
"""
from __future__ import annotations

import glob
import os
import signal
import sys
from typing import List, Sequence

from .. import paths
from ..config import is_loopback
from ..runtime.metrics import MetricsServer, render
from ..runtime.status import NotRunning, StatusError, ask

ASK_TIMEOUT = 2.0       # seconds one supervisor gets to answer a scrape


def status_sockets(runtime_dirs: Sequence[str]) -> List[str]:
    """Every status socket in the private directories of ``runtime_dirs`` ("" = the default)."""
    found: List[str] = []
    for runtime_dir in runtime_dirs:
        for base in paths.private_bases(runtime_dir):
            found += sorted(glob.glob(os.path.join(glob.escape(base), "*.sock")))
    return list(dict.fromkeys(found))


def scrape(runtime_dirs: Sequence[str]) -> str:
    """The metrics of every supervisor found now."""
    snaps, down = [], []
    for path in status_sockets(runtime_dirs):
        name = os.path.basename(path)[:-len(".sock")]
        try:
            snap = ask(path, {"cmd": "status"}, ASK_TIMEOUT, f"plugin {name}")
        except NotRunning:
            continue
        except StatusError:
            down.append(name)
            continue
        if isinstance(snap, dict) and isinstance(snap.get("plugin"), str):
            snaps.append(snap)
        else:
            down.append(name)
    return render(snaps, down)


def serve(listen: str, runtime_dirs: Sequence[str]) -> int:
    """Serve until SIGTERM or SIGINT; 2 with one line when ``listen`` cannot be served."""
    host, _, port = listen.rpartition(":")
    if not host or not (port.isascii() and port.isdigit() and int(port) <= 65535):
        print(f"kuiper-pool metrics: --listen must be host:port (got {listen!r})", file=sys.stderr)
        return 2
    dirs = list(runtime_dirs) or [""]
    try:
        server = MetricsServer(listen, lambda: scrape(dirs))
    except (OSError, ValueError) as e:  # ValueError: a host that is no address
        print(f"kuiper-pool metrics: cannot listen on {listen}: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    where = ", ".join(paths.usual_base(d) for d in dirs)
    beyond = "" if is_loopback(listen) else " (beyond loopback, as --listen asks)"
    print(f"kuiper-pool metrics: serving the metrics of every plugin in {where} at "
          f"{server.url}{beyond}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
