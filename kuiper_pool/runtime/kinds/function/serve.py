"""A function's worker half (README, "Data paths"): calls relayed by the supervisor
(CALL/REPLY), or, under the native transport, eKuiper's connection lent to the worker
(CONN), which then answers eKuiper itself and notes each call in its call page
(``page.py``). The supervisor's half is ``route.py``.
"""
from __future__ import annotations

import select
import socket
import time
from typing import Any, Dict, Optional, Tuple

from .... import wire
from ....transport.sp import ReqConnection
from ... import frames
from ...context import WorkerContext
from ...protocol import is_error_reply
from ...worker import EXIT_OK, Worker
from .page import CallPage, call_crc

EXIT_RECYCLED = frames.EXIT_RECYCLED  # served max_calls on a lent connection


def run(worker: Worker, function: Any) -> int:
    """Serve calls: on eKuiper's connection itself when the supervisor lends it (CONN),
    else relayed over the link (CALL/REPLY)."""
    page = CallPage(worker.link.fds.popleft()) if worker.spec.page else None
    worker.hold_page(page)
    worker.ready(None)
    contexts: Dict[Tuple[Any, ...], WorkerContext] = {}
    conn: Any = None
    owed: Optional[Tuple[int, str]] = None
    max_calls = worker.spec.max_calls
    poller = select.poll()  # the link and, while lent, eKuiper's connection (no FD_SETSIZE limit)
    poller.register(worker.link.sock.fileno(), select.POLLIN)
    while True:
        if conn is not None and not worker.link.has_frame():
            ready_fds = [fd for fd, _ev in poller.poll()]
            # the link first: after a STOP the next call is the next worker's (eKuiper re-sends it)
            if conn.fileno() in ready_fds and worker.link.sock.fileno() not in ready_fds:
                try:
                    calls = conn.recv_ready()
                except OSError:  # eKuiper closed it: the supervisor dials again and lends anew
                    poller.unregister(conn.fileno())
                    worker.guard.fds.discard(conn.fileno())
                    conn.close()
                    conn = None
                    worker.link.send(frames.encode(frames.LOST))
                    continue
                for call in calls:
                    _serve_lent(worker, function, contexts, page, conn, call, owed)
                    owed = None  # only the first call after a reconnect can be the owed one
                if max_calls and worker.processed >= max_calls:
                    return EXIT_RECYCLED  # eKuiper re-sends its next call to the fresh worker
            if worker.link.sock.fileno() not in ready_fds:
                continue
        frame = worker.link.recv()
        if frame is None or frame[0] == frames.STOP:
            return EXIT_OK
        if frame[0] == frames.CONN:
            head, buffered, call = frames.decode_conn(frame[1])
            conn = ReqConnection(socket.socket(fileno=worker.link.fds.popleft()),
                                 head["request_id"], buffered)
            poller.register(conn.fileno(), select.POLLIN)
            worker.guard.fds.add(conn.fileno())
            owed = (head["owed_crc"], head["owed_error"]) if head["owed_error"] else None
            if call is not None:
                _serve_lent(worker, function, contexts, page, conn, call, owed)
                owed = None
        elif frame[0] == frames.CALL:
            call_id, request = frames.split_seq(frame[1])
            worker.busy_since = time.monotonic()
            reply = call_function(worker, function, contexts, request)
            worker.busy_since = 0.0
            worker.processed += 1
            worker.link.send(frames.encode_seq(frames.REPLY, call_id, reply))


def _serve_lent(worker: Worker, function: Any, contexts: Dict[Tuple[Any, ...], WorkerContext],
                page: Optional[CallPage], conn: Any, call: bytes,
                owed: Optional[Tuple[int, str]]) -> None:
    """Run one call that arrived on a lent connection and answer eKuiper directly. The first
    call after a reconnect may be eKuiper's copy of one a dead worker began: it is answered
    with ``owed``'s error, never run twice."""
    if page is not None:
        page.begin(call, time.monotonic())
    if owed is not None and call_crc(call) == owed[0]:
        reply = wire.func_error(owed[1])
    else:
        reply = call_function(worker, function, contexts, call)
    worker.guard.check()
    if page is not None:
        page.replying()
    try:
        conn.send(reply)
    except OSError:  # eKuiper closed it: the next poll reads its end and gives it back
        pass
    if page is not None:
        page.finish(not is_error_reply(reply))
    worker.processed += 1


def call_function(worker: Worker, function: Any, contexts: Dict[Tuple[Any, ...], WorkerContext],
                  request: bytes) -> bytes:
    """Answer one eKuiper function request with ``{"state", "result"}`` bytes."""
    rule = "-"
    try:
        req = wire.loads(request)
        name, args = req.get("func"), req.get("arg")
        if name == "Validate":
            err = function.validate(args)
            return wire.func_reply(False, err) if err else wire.func_reply(True, "")
        if name == "IsAggregate":
            return wire.func_reply(True, function.is_aggregate())
        if name != "Exec":
            return wire.func_error(f"{worker.where()}: unknown request {name!r}")
        if not isinstance(args, list) or not args or not isinstance(args[-1], str):
            return wire.func_error(f"{worker.where()}: Exec needs its arguments and the "
                                   f"function meta as the last argument")
        meta = wire.loads(args[-1])
        key = tuple(meta.get(k) for k in ("ruleId", "opId", "instanceId", "funcId"))
        if None in key:
            return wire.func_error(f"{worker.where()}: function meta {args[-1]} needs ruleId, "
                                   f"opId, instanceId and funcId")
        rule = key[0]
        ctx = contexts.get(key)
        if ctx is None:
            ctx = contexts[key] = WorkerContext(worker.ctrl.symbol, key[0], key[1], key[2], worker.state)
        return wire.func_reply(True, function.exec(args[:-1], ctx))
    except Exception as e:  # noqa: BLE001 - the error goes back to the rule
        text = f"{worker.where()} rule {rule}: {type(e).__name__}: {e}"
        worker.log.warning("%s", text)
        return wire.func_error(text)

