"""The supervisor: one selector loop that serves eKuiper's control channel, routes data
between eKuiper and the workers, and drives each instance's state machine.

Flow of one message: eKuiper -> ``routes`` (sink item / function call) -> ``Instance``
(``instances.py``: on_sink_readable / on_call) -> worker link (``frames``) -> ``worker.py``
-> link -> ``Instance.on_frame`` -> ``routes`` -> eKuiper. Sources skip the supervisor:
their worker dials eKuiper itself.

The supervisor implements the instances' :class:`~.instances.Effects` (processes, sockets,
logs) and contains every failure: an exception raised while handling one instance ends at
most that instance (``Instance.contain``); anything else is logged and the loop goes on.
Signal handlers only wake the loop; every decision is taken in the loop on
``time.monotonic()``.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import wire
from ..api import PluginConfig
from ..config import Settings
from . import callpage, forensics, frames
from .instances import (FAILED, ENDED, KINDS, REMOVED, RUNNING, Instance, Route,
                        WorkerHandle)
from ..logs import supervisor_logger
from ..transport import load as load_transport
from .routes import FunctionRoute, SinkRoute
from .status import MetricsServer, Snapshot, StatusServer, socket_path
from .zygote import Zygote

TICK = 0.05          # seconds between housekeeping passes (crash reports wake the loop at once)
ACK_SEND_TIMEOUT = 1.0  # as eKuiper's own sends: an ack nobody reads is dropped after it
ERROR_LOG_EVERY = 10.0  # the same loop error is logged with its traceback at most this often

Handler = Callable[[int], None]


class Supervisor:
    """Owns the control channel, the instances and their workers."""

    def __init__(self, plugin: PluginConfig, settings: Settings, zygote: Zygote) -> None:
        self.plugin = plugin
        self.s = settings
        self.zygote = zygote
        self.log = supervisor_logger()
        self.sel = selectors.DefaultSelector()
        self.instances: Dict[str, Instance] = {}
        self.workers: Dict[int, Tuple[WorkerHandle, Instance, frames.Link]] = {}
        self.procs: Dict[int, Any] = {}     # wid -> psutil.Process, made when first needed
        self.next_wid = 1
        self.exiting = ""
        self.exit_code = 0
        self.control: Optional[InvertedReq] = None
        self.control_lost_since = 0.0
        self.parent = os.getppid()  # eKuiper (or conda run): when it exits, so do we
        self.last_sample = 0.0
        self.started_at = time.time()
        self.status: Optional[StatusServer] = None
        self.metrics: Optional[MetricsServer] = None
        self.cached: Optional[Snapshot] = None
        self.logged_errors: Dict[str, float] = {}
        self.transport = load_transport(settings.transport)
        self.lends_functions = settings.transport == "sp"  # a native connection can be lent

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until eKuiper goes away or a signal asks us to stop; return the exit code."""
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        self.register(wake_r, lambda _m: self.on_signal(wake_r))
        self.register(self.zygote.fileno(), lambda _m: self.on_zygote())
        self.open_status()
        self.open_control()
        next_tick = 0.0
        try:
            while not (self.exiting and not self.instances):
                for key, mask in self.sel.select(max(0.0, next_tick - time.monotonic())):
                    self.dispatch(key.data, mask)
                now = time.monotonic()
                if now >= next_tick:  # not after every message: it is on the hot path
                    self.guarded("tick", None, self.tick, now)
                    next_tick = now + TICK
        finally:
            self.close()
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
        return self.exit_code

    def register(self, fd: int, handler: Handler, inst: Optional[Instance] = None,
                 events: int = selectors.EVENT_READ) -> None:
        """Watch ``fd``; ``inst`` is the instance an exception in ``handler`` is charged to."""
        self.sel.register(fd, events, (handler, inst))

    def unregister(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def dispatch(self, data: Tuple[Handler, Optional[Instance]], mask: int) -> None:
        handler, inst = data
        self.guarded(getattr(handler, "__name__", "callback"), inst, handler, mask)

    def guarded(self, where: str, inst: Optional[Instance], fn: Callable[..., None], *args: Any) -> None:
        """Run one step of the loop; whatever it raises ends at most ``inst``."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - containment is the point
            self.loop_error(where, inst, e)

    def loop_error(self, where: str, inst: Optional[Instance], e: Exception) -> None:
        key = f"{where}:{type(e).__name__}"
        now = time.monotonic()
        if now - self.logged_errors.get(key, -ERROR_LOG_EVERY) >= ERROR_LOG_EVERY:
            self.logged_errors[key] = now
            subject = inst.where() if inst is not None else f"plugin {self.plugin.name}"
            self.log.error("%s: internal error in %s: %s: %s", subject, where, type(e).__name__, e,
                           exc_info=e, extra=_fields(inst))
        if inst is not None and inst.state != REMOVED:
            try:
                inst.contain(e)
            except Exception as again:  # noqa: BLE001 - last resort: forget the instance
                self.log.error("%s: could not contain %s: %s", inst.where(), type(again).__name__,
                               again, extra=_fields(inst))
                self.forget(inst)

    def shutdown(self, reason: str, code: int = 0) -> None:
        """Stop every instance gracefully (close runs), then leave the loop."""
        if self.exiting:
            return
        self.exiting, self.exit_code = reason, code
        self.log.info("plugin %s: stopping everything: %s", self.plugin.name, reason)
        for inst in list(self.instances.values()):
            self.guarded("shutdown", inst, inst.shutdown, reason)

    def open_status(self) -> None:
        try:
            path = socket_path(self.plugin.name, self.s.runtime_dir)
            self.status = StatusServer(path, self.on_status_request,
                                       lambda fd, ev, cb: self.register(fd, cb, None, ev),
                                       self.unregister)
        except OSError as e:
            self.log.warning("plugin %s: no status socket: %s; serving without it", self.plugin.name, e)
            return
        self.zygote.own_path(path)
        self.register(self.status.fileno(), lambda _m: self.status.on_accept())
        if self.s.metrics_address:
            self.cached = self.snapshot()
            try:
                self.metrics = MetricsServer(self.s.metrics_address, lambda: self.cached)
            except OSError as e:
                self.log.error("plugin %s: metrics_address %s: %s; serving without metrics",
                               self.plugin.name, self.s.metrics_address, e)

    def on_status_request(self, req: Dict[str, Any]) -> Any:
        """What ``kuiper-pool status`` and ``kuiper-pool restart`` ask over the status socket."""
        if req.get("cmd") == "status":
            return self.snapshot()
        if req.get("cmd") == "restart":
            symbol = req.get("symbol")
            return {"lines": self.restart(symbol if isinstance(symbol, str) and symbol else None)}
        return {"error": f"unknown request {req.get('cmd')!r}"}

    def restart(self, symbol: Optional[str]) -> List[str]:
        """Restart the instances of ``symbol`` (all without one) now: failed or backing-off
        ones start at once, running workers are recycled. One line per instance."""
        lines = []
        for inst in list(self.instances.values()):
            if symbol is not None and inst.ctrl.symbol != symbol:
                continue
            before, done = inst.state, []
            self.guarded("restart", inst, lambda i=inst: done.append(i.retry_now()))
            what = "restarting" if done and done[0] else "nothing to restart"
            lines.append(f"{inst.where()}: {before}: {what}")
            if done and done[0]:
                self.note(inst, logging.WARNING, "restart requested by an operator (was %s)", before)
        if not lines:
            lines.append(f"plugin {self.plugin.name} has no instance"
                         + (f" of {symbol}" if symbol else ""))
        return lines

    def open_control(self) -> None:
        url = wire.control_url(self.plugin.name)
        try:
            self.control = self.req_endpoint(url, self.s.dial_timeout)
        except OSError as e:
            self.log.error("plugin %s: cannot reach eKuiper's control channel %s within %gs: %s",
                           self.plugin.name, url, self.s.dial_timeout, e)
            self.exiting, self.exit_code = "no control channel", 1
            return
        self.register(self.control.fileno(), lambda _m: self.on_control())
        self.log.info("plugin %s: supervisor pid %d serving %s (zygote pid %d)",
                      self.plugin.name, os.getpid(), url, self.zygote.pid)

    def close(self) -> None:
        for inst in list(self.instances.values()):
            self.guarded("close", None, inst.remove)
        for closable in (self.control, self.status, self.metrics):
            if closable is not None:
                self.guarded("close", None, closable.close)
        self.zygote.close()

    def on_signal(self, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.shutdown(f"received {signal.Signals(signum).name}")

    # --- eKuiper's control channel -------------------------------------------------------

    def on_control(self) -> None:
        assert self.control is not None
        raw = self.control.recv()
        if raw is None:
            return
        answered = []

        def answer(data: bytes) -> None:
            if not answered and self.control is not None:
                answered.append(data)
                self.control.send(data)
        try:
            self.command(raw, answer)
        finally:  # whatever happened, eKuiper waits for exactly one answer
            if not answered and not self.waiting_answer(answer):
                answer(wire.one_line(f"plugin {self.plugin.name}: internal error; see the plugin's log"))

    def waiting_answer(self, answer: Callable[[bytes], None]) -> bool:
        """Whether an instance keeps ``answer`` to send later (after READY or the worker's exit)."""
        return any(inst.pending is answer for inst in self.instances.values())

    def command(self, raw: bytes, answer: Callable[[bytes], None]) -> None:
        try:
            ctrl = wire.parse_command(raw)
        except wire.ProtocolError as e:
            self.log.warning("plugin %s: bad command %r: %s", self.plugin.name, raw[:200], e)
            answer(wire.one_line(f"plugin {self.plugin.name}: {e}"))
            return
        if self.exiting:
            answer(wire.one_line(f"plugin {self.plugin.name} is shutting down: {self.exiting}"))
        elif ctrl.cmd == wire.CMD_START:
            self.start(ctrl, answer)
        else:
            self.stop(ctrl, answer)

    def start(self, ctrl: wire.Control, answer: Callable[[bytes], None]) -> None:
        if self.plugin.get(ctrl.plugin_type, ctrl.symbol) is None:
            answer(wire.one_line(f"plugin {self.plugin.name} has no {KINDS[ctrl.plugin_type]} "
                                 f"named {ctrl.symbol}"))
            return
        inst = self.instances.get(ctrl.key)
        if inst is not None and inst.state not in (FAILED, ENDED):
            self.guarded("start", inst, inst.start_again, answer)
            return
        if inst is not None:
            self.guarded("start", inst, inst.remove)
        inst = Instance(self.plugin.name, ctrl, self.s.for_symbol(ctrl.symbol), self)
        self.instances[ctrl.key] = inst
        self.guarded("start", inst, inst.begin, answer)

    def stop(self, ctrl: wire.Control, answer: Callable[[bytes], None]) -> None:
        inst = self.instances.get(ctrl.key)
        if ctrl.plugin_type == wire.TYPE_FUNC or inst is None:
            # eKuiper never stops functions; an unknown instance is already stopped
            self.log.info("plugin %s: stop of %s: nothing running", self.plugin.name, ctrl.describe())
            answer(wire.OK)
            return
        self.guarded("stop", inst, inst.stop, answer)

    # --- Effects: what instances may do -----------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def spawn(self, inst: Instance) -> WorkerHandle:
        wid, self.next_wid = self.next_wid, self.next_wid + 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.zygote.start_worker(wid, theirs, inst.ctrl.symbol)
        except OSError:
            ours.close()
            theirs.close()
            raise
        w = WorkerHandle(wid, time.monotonic())
        link = frames.Link(ours)
        entry = (w, inst, link)
        self.workers[wid] = entry
        self.register(link.fileno(), lambda mask: self.on_link(entry, mask), inst)
        start = frames.encode_json(frames.START, {
            "control": inst.ctrl.to_dict(), "heartbeat_interval": inst.s.heartbeat_interval,
            "stop_grace": inst.s.stop_grace, "dial_timeout": self.s.dial_timeout,
            "max_calls": inst.s.max_calls, "transport": self.s.transport,
            "dump_path": forensics.dump_path(self.zygote.rundir, wid),
            "call_page": self.lends_functions and inst.kind == wire.TYPE_FUNC})
        if self.lends_functions and inst.kind == wire.TYPE_FUNC:
            fd = callpage.create()
            try:
                w.page = callpage.CallPage(fd)
                link.send_fds(start, [fd])
            finally:
                os.close(fd)
        else:
            link.send(start)
        return w

    def send(self, w: WorkerHandle, frame: bytes) -> None:
        entry = self.workers.get(w.wid)
        if entry is None:
            return  # exited: its exit report is being handled
        link = entry[2]
        had_backlog = bool(link.outbox)
        link.send(frame)
        if link.outbox and not had_backlog:
            self.sel.modify(link.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE,
                            self.sel.get_key(link.fileno()).data)

    def hand_over(self, w: WorkerHandle, route: FunctionRoute) -> None:
        entry = self.workers.get(w.wid)
        self.unregister(route.fd)
        handoff = route.lend()
        try:
            if entry is not None:
                entry[2].send_fds(frames.encode_conn(handoff), [handoff.sock.fileno()])
        finally:
            handoff.sock.close()  # the worker holds it now; its death closes the connection

    def signal(self, w: WorkerHandle, sig: int) -> None:
        self.zygote.kill(w.wid, sig)

    def open_route(self, inst: Instance, wait: bool = True) -> Route:
        ctrl = inst.ctrl
        route: Route
        if ctrl.plugin_type == wire.TYPE_SINK:
            data_url = wire.data_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
            ack_url = wire.ack_url(ctrl.rule_id, ctrl.op_id, ctrl.instance_id)
            pull = self.transport.PullEndpoint(data_url)
            try:
                # eKuiper listens on the ack path before it sends start: a dial that does not
                # connect at once must not stall the loop (native: retried at the first ack)
                ack = self.transport.PushEndpoint(ack_url, 0.0 if self.lends_functions else 0.5,
                                                  ACK_SEND_TIMEOUT)
            except OSError:
                pull.close()
                raise
            route = SinkRoute(ctrl, inst.s.sink_window, inst.s.sink_max_deliveries, pull, ack)
            self.zygote.own_path(wire.ipc_path(data_url))
        else:
            url = wire.function_url(ctrl.symbol)
            route = FunctionRoute(self.req_endpoint(url, self.s.dial_timeout if wait else 0.0),
                                  self.lends_functions)
            self.register(route.fd, self.route_handler(inst, route), inst)
        return route

    def req_endpoint(self, url: str, dial_timeout: float) -> Any:
        if self.lends_functions:  # native: 0 means "start unconnected, redial in ticks"
            return self.transport.ReqEndpoint(url, dial_timeout)
        return self.transport.ReqEndpoint(url, max(dial_timeout, 0.05))

    def route_handler(self, inst: Instance, route: Route) -> Handler:
        """The readiness callback of ``route``; a stale event (the route was closed or
        replaced after select returned it) does nothing."""
        def on_route(_mask: int) -> None:
            if inst.route is not route or inst.state == REMOVED:
                return
            if isinstance(route, SinkRoute):
                inst.on_sink_readable()
            else:
                inst.on_call()
        return on_route

    def watch(self, inst: Instance, reading: bool) -> None:
        route = inst.route
        if not isinstance(route, SinkRoute) or route.fd < 0:
            return
        self.unregister(route.fd)
        if reading:
            self.register(route.fd, self.route_handler(inst, route), inst)

    def close_route(self, inst: Instance, route: Route) -> None:
        self.unregister(route.fd)
        if isinstance(route, SinkRoute):
            self.zygote.disown_path(wire.ipc_path(route.data_url))
        route.close()

    def forget(self, inst: Instance) -> None:
        if self.instances.get(inst.ctrl.key) is inst:
            del self.instances[inst.ctrl.key]

    def cpu_seconds(self, w: WorkerHandle) -> Optional[float]:
        proc = self.proc(w)
        if proc is None:
            return None
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - psutil.Error: gone or not readable
            return None

    def stack(self, w: WorkerHandle) -> str:
        return forensics.user_frames(forensics.read(forensics.dump_path(self.zygote.rundir, w.wid)))

    def note(self, inst: Instance, level: int, msg: str, *args: object) -> None:
        """Log about one instance: plugin, symbol and rule in the record, pid in the text."""
        self.log.log(level, "%s: " + msg, inst.where(), *args, extra=_fields(inst))

    # --- workers ----------------------------------------------------------------------------

    def on_link(self, entry: Tuple[WorkerHandle, Instance, frames.Link], mask: int) -> None:
        w, inst, link = entry
        if self.workers.get(w.wid) is not entry:
            return  # stale: the worker's exit was handled after select returned this event
        if mask & selectors.EVENT_WRITE:
            link.flush()
            if not link.outbox:
                self.sel.modify(link.fileno(), selectors.EVENT_READ, self.sel.get_key(link.fileno()).data)
        if not mask & selectors.EVENT_READ:
            return
        got = link.read()
        if got is None:  # the worker is gone; the zygote's exit report tells how
            self.unregister(link.fileno())
            return
        for ftype, payload in got:
            inst.on_frame(w, ftype, payload)

    def on_zygote(self) -> None:
        events = self.zygote.events()
        if events is None:
            self.log.error("plugin %s: the zygote process died; no worker can be started",
                           self.plugin.name)
            self.unregister(self.zygote.fileno())
            self.exiting, self.exit_code = "zygote died", 1
            for inst in list(self.instances.values()):
                self.guarded("zygote died", inst, inst.remove,
                             wire.one_line(f"plugin {self.plugin.name}: the zygote process died"))
            return
        for ev in events:
            entry = self.workers.get(ev.get("wid"))
            if entry is None:
                continue
            if ev["op"] == "started":
                self.guarded("started", entry[1], entry[1].on_started, entry[0], ev["pid"])
            elif ev["op"] == "exited":
                self.on_exit(entry, ev["status"])

    def on_exit(self, entry: Tuple[WorkerHandle, Instance, frames.Link], status: int) -> None:
        w, inst, link = entry
        del self.workers[w.wid]
        self.procs.pop(w.wid, None)
        # frames it sent just before exiting (READY error, FAULT, REPLY, DONE) may still be
        # unread: the zygote's report can be read first
        try:
            for ftype, payload in link.read() or []:
                self.guarded("frame", inst, inst.on_frame, w, ftype, payload)
        finally:
            self.unregister(link.fileno())
            link.close()
        self.guarded("exit", inst, inst.on_exit, w, status)

    def proc(self, w: WorkerHandle) -> Any:
        """psutil's handle of a worker (psutil is imported only when a figure is needed)."""
        proc = self.procs.get(w.wid)
        if proc is None and w.pid and w.wid in self.workers:
            import psutil

            try:
                proc = self.procs[w.wid] = psutil.Process(w.pid)
            except psutil.Error:
                return None
        return proc

    # --- housekeeping --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for inst in list(self.instances.values()):
            self.guarded("tick", inst, inst.tick, now)
        if now - self.last_sample >= self.s.sample_interval:
            self.last_sample = now
            self.sample()
        if self.status is not None:
            self.status.tick(now)
        if self.control is not None:
            self.control.tick(now)
            if self.control.connected():
                self.control_lost_since = 0.0
            elif not self.control_lost_since:
                self.control_lost_since = now
            elif now - self.control_lost_since > self.s.control_lost_timeout:
                self.shutdown("eKuiper's control channel is gone", 0)
        if os.getppid() != self.parent:
            # a lingering plugin would answer the next eKuiper's handshake in place of the
            # process that eKuiper starts anew, so leave at once
            self.shutdown(f"eKuiper (parent pid {self.parent}) exited", 0)

    def sample(self) -> None:
        """psutil figures of every worker; refreshes the snapshot the metrics thread serves."""
        for w, _inst, _link in list(self.workers.values()):
            proc = self.proc(w)
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    w.vitals.rss = proc.memory_info().rss
                    w.vitals.cpu_percent = proc.cpu_percent(None)
            except Exception:  # noqa: BLE001 - psutil.Error: gone meanwhile
                pass
        if self.metrics is not None:
            self.cached = self.snapshot()

    def snapshot(self) -> Snapshot:
        """Everything ``kuiper-pool status`` and the metrics show (schema in status.py)."""
        now, mono = time.time(), time.monotonic()
        rows = []
        for inst in self.instances.values():
            w, c = inst.worker, inst.ctrl
            v = w.vitals if w is not None else None
            items_in, items_out, errors = inst.counts()
            rows.append({
                "symbol": c.symbol, "type": c.plugin_type, "rule": c.rule_id, "op": c.op_id,
                "instance": c.instance_id, "pid": (w.pid or None) if w is not None else None,
                "state": inst.state,
                "uptime": mono - inst.running_since if inst.state == RUNNING else 0.0,
                "restarts": inst.restarts, "restart_causes": dict(inst.restart_causes),
                "last_error": inst.last_error, "rss": v.rss if v else 0,
                "cpu_percent": v.cpu_percent if v else 0.0,
                "items_in": items_in, "items_out": items_out, "errors": errors})
        return {"plugin": self.plugin.name, "pid": os.getpid(), "zygote_pid": self.zygote.pid,
                "uptime": now - self.started_at, "time": now, "instances": rows}


def _fields(inst: Optional[Instance]) -> Dict[str, str]:
    if inst is None:
        return {}
    return {"symbol": inst.ctrl.symbol, "rule": inst.ctrl.rule_id or "-"}
