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
from ... import frames as link_frames
from ...context import WorkerContext
from ...worker import EXIT_OK, Worker
from . import frames
from .frames import EXIT_RECYCLED, Owed
from .page import CallPage, call_crc


def run(worker: Worker, function: Any) -> int:
    """Serve calls: on eKuiper's connection itself when the supervisor lends it (CONN),
    else relayed over the link (CALL/REPLY)."""
    page = CallPage(worker.link.fds.popleft()) if worker.spec.page else None
    worker.hold_page(page)
    worker.ready(None)
    contexts: Dict[Any, WorkerContext] = {}   # by (rule, op, instance, funcId) and by meta text
    conn: Any = None
    owed: Optional[Owed] = None
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
                    worker.link.send(frames.lost())
                    continue
                for call in calls:
                    _serve_lent(worker, function, contexts, page, conn, call, owed)
                    owed = None  # only the first call after a reconnect can be the owed one
                if max_calls and worker.processed >= max_calls:
                    return EXIT_RECYCLED  # eKuiper re-sends its next call to the fresh worker
            if worker.link.sock.fileno() not in ready_fds:
                continue
        frame = worker.link.recv()
        if frame is None or frame[0] == link_frames.STOP:
            return EXIT_OK
        if frame[0] == frames.CONN:
            lent = frames.Conn.decode(frame[1])
            conn = ReqConnection(socket.socket(fileno=worker.link.fds.popleft()),
                                 lent.request_id, lent.buffered)
            poller.register(conn.fileno(), select.POLLIN)
            worker.guard.fds.add(conn.fileno())
            owed = lent.owed
            if lent.call is not None:
                _serve_lent(worker, function, contexts, page, conn, lent.call, owed)
                owed = None
        elif frame[0] == frames.CALL:
            call = frames.Call.decode(frame[1])
            worker.busy_since = time.monotonic()
            ok, reply = call_function(worker, function, contexts, call.request)
            worker.busy_since = 0.0
            worker.processed += 1
            worker.link.send(frames.Reply(call.call_id, reply, ok).encode())


def _serve_lent(worker: Worker, function: Any, contexts: Dict[Any, WorkerContext],
                page: Optional[CallPage], conn: Any, call: bytes, owed: Optional[Owed]) -> None:
    """Run one call that arrived on a lent connection and answer eKuiper directly. The first
    call after a reconnect may be eKuiper's copy of one a dead worker began: it is answered
    with ``owed``'s error, never run twice."""
    if page is not None:
        page.begin(call, time.monotonic())
    if owed is not None and call_crc(call) == owed[0]:
        ok, reply = False, wire.func_error(owed[1])
    else:
        ok, reply = call_function(worker, function, contexts, call)
    worker.guard.check()
    if page is not None:
        page.replying()
    try:
        conn.send(reply)
    except OSError:  # eKuiper closed it: the next poll reads its end and gives it back
        pass
    if page is not None:
        page.finish(ok)
    worker.processed += 1


def call_function(worker: Worker, function: Any, contexts: Dict[Any, WorkerContext],
                  request: bytes) -> Tuple[bool, bytes]:
    """Answer one eKuiper function request: whether it succeeded (the reply's "state"), and
    the ``{"state", "result"}`` bytes."""
    rule = "-"
    try:
        req = wire.loads(request)
        name, args = req.get("func"), req.get("arg")
        if name == "Validate":
            err = function.validate(args)
            return wire.func_answer(False, err) if err else wire.func_answer(True, "")
        if name == "IsAggregate":
            return wire.func_answer(True, function.is_aggregate())
        if name != "Exec":
            return False, wire.func_error(f"{worker.where()}: unknown request {name!r}")
        if not isinstance(args, list) or not args or not isinstance(args[-1], str):
            return False, wire.func_error(f"{worker.where()}: Exec needs its arguments and the "
                                          f"function meta as the last argument")
        # eKuiper sends one meta text per rule's call site, the same on every call: known
        # texts skip their parse (a dict lookup instead of ~5 us of json per call)
        ctx = contexts.get(args[-1])
        if ctx is None:
            meta = wire.loads(args[-1])
            key = tuple(meta.get(k) for k in ("ruleId", "opId", "instanceId", "funcId"))
            if None in key:
                return False, wire.func_error(f"{worker.where()}: function meta {args[-1]} needs "
                                              f"ruleId, opId, instanceId and funcId")
            ctx = contexts.get(key)
            if ctx is None:
                ctx = contexts[key] = WorkerContext(worker.ctrl.symbol, key[0], key[1], key[2], worker.state)
            contexts[args[-1]] = ctx
        rule = ctx.get_rule_id()
        return wire.func_answer(True, function.exec(args[:-1], ctx))
    except Exception as e:  # noqa: BLE001 - the error goes back to the rule
        text = f"{worker.where()} rule {rule}: {type(e).__name__}: {e}"
        worker.log.warning("%s", text)
        return False, wire.func_error(text)

