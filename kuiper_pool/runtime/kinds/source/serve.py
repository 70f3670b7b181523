"""A source's worker half (README, "Data paths"): the worker dials eKuiper's PULL socket
and emits each item there itself, no hop through the supervisor; a thread waits for STOP
and calls ``close``. The supervisor's half only counts (``route.py``).
"""
from __future__ import annotations

import threading
from typing import Any

from .... import wire
from ....transport import TransportError, TransportTimeout
from ....transport import load as load_transport
from ... import frames
from ...context import WorkerContext
from ...worker import EXIT_CONFIGURE, EXIT_OK, Worker, start_thread

SEND_POLL = 0.1       # how often a blocked emit re-checks for stop


def run(worker: Worker, source: Any) -> int:
    """Configure, report READY, run ``open`` in this thread until it returns or STOP comes."""
    ctrl = worker.ctrl
    datasource = ctrl.source_datasource(worker.spec.source_datasource)  # the supervisor logs it
    if not worker.configure(lambda: source.configure(datasource, ctrl.config)):
        return EXIT_CONFIGURE
    url = wire.data_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
    transport = load_transport(worker.spec.transport)
    try:  # items go straight to eKuiper's PULL socket: no hop
        push = transport.PushEndpoint(url, worker.spec.dial_timeout, SEND_POLL)
    except TransportError as e:
        worker.ready(f"{worker.where()}: cannot connect to eKuiper at {url}: {e}")
        return EXIT_CONFIGURE
    worker.release(push.close)
    ctx: WorkerContext

    def send(data: bytes) -> None:
        worker.guard.check()
        while True:  # back-pressure without loss, yet a stop is noticed within SEND_POLL
            try:
                push.send(data)
                worker.processed += 1
                return
            except TransportTimeout:
                if ctx.closing:
                    return

    ctx = worker.ctx = WorkerContext(ctrl.symbol, ctrl.rule_id, ctrl.op_id, ctrl.instance_id,
                                     worker.state, send=send)
    opened = threading.Event()
    start_thread(_watch_stop, worker, source, ctx, opened)
    worker.ready(None)
    try:
        source.open(ctx)
    except Exception as e:  # noqa: BLE001
        if not ctx.closing:
            return worker.fault("open", e)
    finally:
        opened.set()
    worker.guard.check()
    if not ctx.closing:
        worker.log.info("%s: open returned; the source has ended", worker.where())
    return EXIT_OK


def _watch_stop(worker: Worker, source: Any, ctx: WorkerContext, opened: threading.Event) -> None:
    """A source's ``open`` owns the main thread: stop arrives here and calls ``close``."""
    while True:
        frame = worker.link.recv()
        if frame is None or frame[0] == frames.STOP:
            break
    ctx.closing = True
    try:
        source.close(ctx)
    except Exception as e:  # noqa: BLE001
        worker.log.error("%s: close raised %s: %s", worker.where(), type(e).__name__, e)
    if not opened.wait(worker.spec.stop_grace):
        worker.log.warning("%s: open did not return within %.1fs of close; exiting",
                           worker.where(), worker.spec.stop_grace)
        worker.give_up()  # the process exits; a shared worker ends only this instance

