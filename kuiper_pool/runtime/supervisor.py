"""The supervisor: one selector loop that serves eKuiper's control channel, routes data
between eKuiper and the workers, and restarts workers that crash, hang or grow.

Flow of one message: eKuiper -> ``routing`` socket (sink item / function call) ->
``on_sink_data``/``on_call`` here -> worker link (``frames``) -> ``worker.py`` ->
link -> ``on_frame`` here -> ``routing`` socket -> eKuiper. Sources skip the
supervisor: their worker dials eKuiper itself.

Signal handlers only wake the loop; every decision is taken in the loop on
``time.monotonic()``.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil
import pynng

from .. import wire
from . import frames
from ..api import PluginConfig
from ..config import Settings
from .health import KILL, RECYCLE, RestartPolicy, verdict
from .instances import (BACKOFF, ENDED, FAILED, RECYCLING, RUNNING, STARTING, STOPPING,
                        Instance, WorkerHandle)
from ..logs import supervisor_logger
from .routes import FunctionRoute, InvertedReq, SinkRoute
from .status import MetricsServer, Snapshot, StatusServer, socket_path
from .zygote import Zygote, describe_status

TICK = 0.05          # seconds between housekeeping passes (crash reports wake the loop at once)
KINDS = {wire.TYPE_SOURCE: "source", wire.TYPE_SINK: "sink", wire.TYPE_FUNC: "function"}


class Supervisor:
    """Owns the control channel, the instances and their workers."""

    def __init__(self, plugin: PluginConfig, settings: Settings, zygote: Zygote) -> None:
        self.plugin = plugin
        self.s = settings
        self.zygote = zygote
        self.log = supervisor_logger()
        self.sel = selectors.DefaultSelector()
        self.instances: Dict[str, Instance] = {}
        self.workers: Dict[int, Tuple[WorkerHandle, Instance]] = {}
        self.procs: Dict[int, psutil.Process] = {}
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

    # --- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Serve until eKuiper goes away or a signal asks us to stop; return the exit code."""
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        self.sel.register(wake_r, selectors.EVENT_READ, lambda _m: self.on_signal(wake_r))
        self.sel.register(self.zygote.fileno(), selectors.EVENT_READ, lambda _m: self.on_zygote())
        self.open_status()
        url = wire.control_url(self.plugin.name)
        try:
            self.control = InvertedReq(url, self.s.dial_timeout)
        except pynng.NNGException as e:
            self.log.error("plugin %s: cannot reach eKuiper's control channel %s within %gs: %s",
                           self.plugin.name, url, self.s.dial_timeout, e)
            self.exiting, self.exit_code = "no control channel", 1
        else:
            self.sel.register(self.control.fileno(), selectors.EVENT_READ,
                              lambda _m: self.on_control())
            self.log.info("plugin %s: supervisor pid %d serving %s (zygote pid %d)",
                          self.plugin.name, os.getpid(), url, self.zygote.pid)
        next_tick = 0.0
        try:
            while not (self.exiting and not self.instances):
                for key, mask in self.sel.select(max(0.0, next_tick - time.monotonic())):
                    key.data(mask)
                now = time.monotonic()
                if now >= next_tick:  # not after every message: it is on the hot path
                    self.tick(now)
                    next_tick = now + TICK
        finally:
            self.close()
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
        return self.exit_code

    def shutdown(self, reason: str, code: int = 0) -> None:
        """Stop every instance gracefully (close runs), then leave the loop."""
        if self.exiting:
            return
        self.exiting, self.exit_code = reason, code
        self.log.info("plugin %s: stopping everything: %s", self.plugin.name, reason)
        for inst in list(self.instances.values()):
            inst.answer(wire.one_line(f"plugin {self.plugin.name} is shutting down: {reason}"))
            if inst.worker is not None and inst.state != STOPPING:
                self.begin_stop(inst)
            elif inst.worker is None:
                self.discard(inst)

    def open_status(self) -> None:
        path = socket_path(self.plugin.name, self.s.runtime_dir)
        self.status = StatusServer(path, self.snapshot)
        self.zygote.own_path(path)
        self.sel.register(self.status.fileno(), selectors.EVENT_READ,
                          lambda _m: self.status.on_accept())
        if self.s.metrics_address:
            self.cached = self.snapshot()
            try:
                self.metrics = MetricsServer(self.s.metrics_address, lambda: self.cached)
            except OSError as e:
                self.log.error("plugin %s: metrics_address %s: %s; serving without metrics",
                               self.plugin.name, self.s.metrics_address, e)

    def close(self) -> None:
        for inst in list(self.instances.values()):
            self.discard(inst)
        if self.control is not None:
            self.control.close()
        if self.status is not None:
            self.status.close()
        if self.metrics is not None:
            self.metrics.close()
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
        answer = self.control.send
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
            if inst.state == STOPPING:
                answer(wire.one_line(f"plugin {self.plugin.name} {ctrl.describe()} is still stopping"))
            else:  # a repeated start (eKuiper replays starts) changes nothing
                self.note(logging.INFO, inst, "start of a running instance: nothing to do")
                answer(wire.OK)
            return
        if inst is not None:
            self.discard(inst)
        inst = Instance(ctrl, RestartPolicy(self.s))
        inst.pending = answer
        self.instances[ctrl.key] = inst
        self.spawn(inst)

    def stop(self, ctrl: wire.Control, answer: Callable[[bytes], None]) -> None:
        inst = self.instances.get(ctrl.key)
        if ctrl.plugin_type == wire.TYPE_FUNC or inst is None:
            # eKuiper never stops functions; an unknown instance is already stopped
            self.log.info("plugin %s: stop of %s: nothing running", self.plugin.name, ctrl.describe())
            answer(wire.OK)
            return
        if inst.state == STOPPING:
            answer(wire.OK)
            return
        inst.pending = answer
        if inst.worker is None:
            self.finish_stop(inst)
        else:
            self.begin_stop(inst)

    # --- workers ----------------------------------------------------------------------------

    def spawn(self, inst: Instance) -> None:
        wid, self.next_wid = self.next_wid, self.next_wid + 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.zygote.start_worker(wid, theirs)
        w = WorkerHandle(wid, ours, time.monotonic())
        self.workers[wid] = (w, inst)
        inst.worker = w
        inst.state = STARTING
        self.sel.register(ours, selectors.EVENT_READ, lambda mask: self.on_link(w, inst, mask))
        self.send(w, frames.encode_json(frames.START, {
            "control": inst.ctrl.to_dict(), "heartbeat_interval": self.s.heartbeat_interval,
            "stop_grace": self.s.stop_grace, "dial_timeout": self.s.dial_timeout}))

    def send(self, w: WorkerHandle, frame: bytes) -> None:
        had_backlog = bool(w.outbox)
        w.send(frame)
        if w.outbox and not had_backlog:
            self.sel.modify(w.link, selectors.EVENT_READ | selectors.EVENT_WRITE,
                            self.sel.get_key(w.link).data)

    def on_link(self, w: WorkerHandle, inst: Instance, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            w.flush()
            if not w.outbox:
                self.sel.modify(w.link, selectors.EVENT_READ, self.sel.get_key(w.link).data)
        if not mask & selectors.EVENT_READ:
            return
        got = w.read()
        if got is None:  # the worker is gone; the zygote's exit report tells how
            self.drop_link(w)
            return
        for ftype, payload in got:
            if inst.worker is w:
                self.on_frame(w, inst, ftype, payload)

    def drop_link(self, w: WorkerHandle) -> None:
        if w.link.fileno() >= 0:
            self.sel.unregister(w.link)
            w.link.close()

    def on_frame(self, w: WorkerHandle, inst: Instance, ftype: int, payload: bytes) -> None:
        route = inst.route
        if ftype == frames.BEAT:
            beat = json.loads(payload)
            v = w.vitals
            v.last_beat = time.monotonic()
            v.processed, v.busy_since = beat["n"], beat["busy"]
        elif ftype == frames.DONE:
            assert isinstance(route, SinkRoute)
            before = len(route.inflight)
            route.done(frames.split_seq(payload)[0])
            inst.items_out += before - len(route.inflight)
            if route.pull is not None and not route.full() and not self.sel_has(route.fd):
                self.watch(route.fd, lambda _m: self.on_sink_data(inst))
        elif ftype == frames.ACK:
            assert isinstance(route, SinkRoute)
            seq, data = frames.split_seq(payload)
            route.acked(seq, data)
        elif ftype == frames.REPLY:
            assert isinstance(route, FunctionRoute)
            call_id, data = frames.split_seq(payload)
            if route.call is not None and route.forwarded and call_id == route.call_id:
                w.vitals.call_started = 0.0
                inst.items_out += 1
                if data.startswith(b'{"state": false'):
                    inst.errors += 1
                route.reply(data)
                if self.s.max_calls:  # recycle before the next call, not at the next tick
                    self.check(inst, time.monotonic())
        elif ftype == frames.READY:
            self.on_ready(inst, w, json.loads(payload)["error"])
        elif ftype == frames.FAULT:
            inst.last_error = w.fault = json.loads(payload)["error"]

    def on_ready(self, inst: Instance, w: WorkerHandle, error: Optional[str]) -> None:
        if inst.state != STARTING:  # stopped or shutting down meanwhile: STOP is queued behind
            return
        first = inst.pending is not None
        if error:
            inst.last_error = w.fault = error
            if first:  # eKuiper gets the configure error as the start answer
                self.note(logging.WARNING, inst, "start refused: %s", error)
                inst.answer(wire.one_line(error))
                self.discard(inst)
            return  # on a restart the worker's exit counts as a crash
        if first and inst.ctrl.plugin_type != wire.TYPE_SOURCE:
            try:
                self.open_route(inst)
            except pynng.NNGException as e:
                text = f"plugin {self.plugin.name} {inst.ctrl.describe()}: cannot open eKuiper's channel: {e}"
                inst.answer(wire.one_line(text))
                self.discard(inst)
                return
        inst.move(RUNNING, STARTING)
        inst.running_since = time.time()
        self.note(logging.INFO, inst, "%s in worker pid %d", "started" if first else "restarted", w.pid)
        inst.answer(wire.OK)
        route = inst.route
        if isinstance(route, SinkRoute):
            again, poison = route.redeliver() if not first else ([], [])
            if poison:
                inst.errors += len(poison)
                self.note(logging.ERROR, inst, "dropped %d item(s) that ended a worker %d times: %s",
                          len(poison), self.s.sink_max_deliveries, poison)
            if again:
                self.note(logging.INFO, inst, "redelivering %d unfinished item(s)", len(again))
                self.deliver(w, again)
            self.on_sink_data(inst)
        elif isinstance(route, FunctionRoute) and route.call is not None:
            self.forward(inst)

    def open_route(self, inst: Instance) -> None:
        ctrl = inst.ctrl
        if ctrl.plugin_type == wire.TYPE_SINK:
            sink = SinkRoute(ctrl, self.s.sink_window, self.s.sink_max_deliveries)
            try:
                sink.open(self.s.dial_timeout)
            except pynng.NNGException:
                sink.close()
                raise
            inst.route = sink
            self.zygote.own_path(wire.ipc_path(sink.data_url))
            self.watch(sink.fd, lambda _m: self.on_sink_data(inst))
        else:
            func = FunctionRoute(ctrl.symbol, self.s.dial_timeout)
            inst.route = func
            self.watch(func.fd, lambda _m: self.on_call(inst))

    def on_zygote(self) -> None:
        events = self.zygote.events()
        if events is None:
            self.log.error("plugin %s: the zygote process died; no worker can be started",
                           self.plugin.name)
            self.sel.unregister(self.zygote.fileno())
            self.exiting, self.exit_code = "zygote died", 1
            for inst in list(self.instances.values()):
                self.discard(inst)
            return
        for ev in events:
            entry = self.workers.get(ev["wid"])
            if ev["op"] == "started" and entry is not None:
                entry[0].pid = ev["pid"]
                try:
                    self.procs[ev["wid"]] = psutil.Process(ev["pid"])
                except psutil.Error:
                    pass
            elif ev["op"] == "exited":
                self.on_exit(ev["wid"], ev["status"])

    def on_exit(self, wid: int, status: int) -> None:
        entry = self.workers.pop(wid, None)
        self.procs.pop(wid, None)
        if entry is None:
            return
        w, inst = entry
        if w.link.fileno() >= 0 and inst.worker is w:
            # frames it sent just before exiting (READY error, FAULT, REPLY, DONE) may still be
            # unread: the zygote's report can be read first (same batch as its "started")
            for ftype, payload in w.read() or []:
                if inst.worker is w:
                    self.on_frame(w, inst, ftype, payload)
        self.drop_link(w)
        how = describe_status(status)
        if inst.worker is not w or self.instances.get(inst.ctrl.key) is not inst:
            return
        inst.worker = None
        if inst.ctrl.plugin_type == wire.TYPE_SOURCE:  # keep what this worker emitted
            inst.items_in += w.vitals.processed
            inst.items_out += w.vitals.processed
        if inst.state == STOPPING:
            self.note(logging.INFO, inst, "stopped (worker pid %d %s)", w.pid, how)
            self.finish_stop(inst)
        elif inst.state == RECYCLING:
            self.note(logging.INFO, inst, "worker pid %d recycled (%s): %s", w.pid, how, w.kill_reason)
            self.spawn(inst)
        elif inst.pending is not None:  # died before READY on its first start
            inst.answer(wire.one_line(f"plugin {self.plugin.name} {inst.ctrl.describe()}: worker "
                                      f"exited with {how} before it was ready {inst.last_error}"))
            self.discard(inst)
        elif (inst.ctrl.plugin_type == wire.TYPE_SOURCE and os.WIFEXITED(status)
              and os.WEXITSTATUS(status) == 0 and not w.kill_reason):
            inst.move(ENDED, RUNNING)
            self.note(logging.INFO, inst, "ended: open returned (worker pid %d)", w.pid)
        else:
            self.crashed(inst, w, how)

    def crashed(self, inst: Instance, w: WorkerHandle, how: str) -> None:
        now = time.monotonic()
        cause = w.kill_reason or w.fault or "exited unexpectedly"  # this worker's, not a stale one
        kind = "hang" if w.kill_reason.startswith("hung") else (
            "deadline" if "deadline" in w.kill_reason else
            "signal" if how.startswith("signal") else "exit")
        inst.restart_causes[kind] = inst.restart_causes.get(kind, 0) + 1
        route = inst.route
        if isinstance(route, FunctionRoute) and route.call is not None and route.forwarded:
            inst.errors += 1
            route.reply(wire.func_error(f"plugin {self.plugin.name} {inst.ctrl.describe()}: worker "
                                        f"pid {w.pid} died during the call ({how}; {cause}); "
                                        f"it is being restarted"))
        delay = inst.policy.next_delay(now)
        if delay is None:
            inst.move(FAILED, RUNNING, STARTING)
            inst.last_error = (f"failed after {self.s.flap_max_restarts} restarts within "
                               f"{self.s.flap_window:g}s; last worker pid {w.pid} {how}: {cause}")
            self.note(logging.ERROR, inst, "%s; not restarting it again", inst.last_error)
            if isinstance(route, FunctionRoute) and route.call is not None:
                route.reply(wire.func_error(self.failed_text(inst)))
            elif isinstance(route, SinkRoute) and route.inflight:  # eKuiper waits for their acks
                lost = route.fail_all(self.failed_text(inst))
                inst.errors += lost
                self.note(logging.ERROR, inst, "dropped %d unfinished item(s)", lost)
                if route.pull is not None and not self.sel_has(route.fd):  # refuse what comes next
                    self.watch(route.fd, lambda _m: self.on_sink_data(inst))
            return
        inst.restarts += 1
        inst.move(BACKOFF, RUNNING, STARTING)
        inst.restart_at = now + delay
        self.note(logging.WARNING, inst, "worker pid %d %s: %s; restart %d in %.3fs",
                  w.pid, how, cause, inst.restarts, delay)
        if delay == 0:  # do not wait for the next tick
            self.spawn(inst)

    def failed_text(self, inst: Instance) -> str:
        return f"plugin {self.plugin.name} {inst.ctrl.describe()} has failed: {inst.last_error}"

    def kill(self, inst: Instance, w: WorkerHandle, why: str, now: float) -> None:
        """SIGTERM now, SIGKILL after stop_grace; answer a call it holds right away."""
        if w.kill_reason:
            return
        w.kill_reason = why
        w.kill_at = now + self.s.stop_grace
        self.note(logging.WARNING, inst, "killing worker pid %d: %s", w.pid, why)
        route = inst.route
        if isinstance(route, FunctionRoute) and route.call is not None and route.forwarded:
            inst.errors += 1
            route.reply(wire.func_error(f"plugin {self.plugin.name} {inst.ctrl.describe()}: {why}; "
                                        f"the worker is being replaced"))
        self.zygote.kill(w.wid, signal.SIGTERM)

    def begin_stop(self, inst: Instance) -> None:
        """Ask the worker to close; it gets stop_grace, then SIGKILL."""
        w = inst.worker
        assert w is not None
        route = inst.route
        if isinstance(route, SinkRoute) and route.pull is not None:
            self.unwatch(route.fd)
            if inst.state == RUNNING:
                self.deliver(w, route.take())  # what eKuiper sent before closing its side
        inst.move(STOPPING)
        self.send(w, frames.encode(frames.STOP))
        w.kill_at = time.monotonic() + self.s.stop_grace

    def finish_stop(self, inst: Instance) -> None:
        self.discard(inst)
        inst.answer(wire.OK)

    def discard(self, inst: Instance) -> None:
        """Forget an instance: close its eKuiper channels, SIGKILL a worker still alive."""
        if self.instances.get(inst.ctrl.key) is inst:
            del self.instances[inst.ctrl.key]
        route, inst.route = inst.route, None
        if route is not None:
            self.unwatch(route.fd)
            if isinstance(route, SinkRoute):
                self.zygote.disown_path(wire.ipc_path(route.data_url))
            route.close()
        if inst.worker is not None:
            self.zygote.kill(inst.worker.wid, signal.SIGKILL)

    # --- data --------------------------------------------------------------------------------

    def watch(self, fd: int, callback: Callable[[int], None]) -> None:
        self.sel.register(fd, selectors.EVENT_READ, callback)

    def unwatch(self, fd: int) -> None:
        if self.sel_has(fd):
            self.sel.unregister(fd)

    def sel_has(self, fd: int) -> bool:
        try:
            self.sel.get_key(fd)
            return True
        except KeyError:
            return False

    def deliver(self, w: WorkerHandle, items: List[Tuple[int, bytes]]) -> None:
        if items:
            self.send(w, frames.encode_items(items[0][0], [data for _seq, data in items]))

    def on_sink_data(self, inst: Instance) -> None:
        route = inst.route
        assert isinstance(route, SinkRoute)
        if inst.state == FAILED:
            inst.errors += route.refuse(self.failed_text(inst))
            if not route.require_ack:
                self.unwatch(route.fd)  # no acks to answer with: let eKuiper's sends time out
            return
        running = inst.state == RUNNING and inst.worker is not None
        items = route.take(running)
        inst.items_in += len(items)
        if running:
            self.deliver(inst.worker, items)
        if route.full():
            self.unwatch(route.fd)  # back-pressure; DONE frames resume reading

    def on_call(self, inst: Instance) -> None:
        route = inst.route
        assert isinstance(route, FunctionRoute)
        if route.take() is None:
            return
        inst.items_in += 1
        if inst.state == FAILED:
            inst.errors += 1
            route.reply(wire.func_error(self.failed_text(inst)))
        elif inst.state == RUNNING and inst.worker is not None and not inst.worker.kill_reason:
            self.forward(inst)
        # otherwise the call waits for the (re)started worker, within call_deadline

    def forward(self, inst: Instance) -> None:
        route, w = inst.route, inst.worker
        assert isinstance(route, FunctionRoute) and w is not None and route.call is not None
        route.forwarded = True
        w.vitals.call_started = time.monotonic()
        w.vitals.calls += 1
        self.send(w, frames.encode_seq(frames.CALL, route.call_id, route.call))

    # --- housekeeping --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for inst in list(self.instances.values()):
            self.check(inst, now)
        if now - self.last_sample >= self.s.sample_interval:
            self.last_sample = now
            self.sample()
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

    def check(self, inst: Instance, now: float) -> None:
        route, w = inst.route, inst.worker
        if isinstance(route, FunctionRoute):
            route.channel.tick(now)
            if (route.call is not None and not route.forwarded
                    and now - route.arrived > self.s.call_deadline):
                inst.errors += 1
                route.reply(wire.func_error(
                    f"plugin {self.plugin.name} {inst.ctrl.describe()}: no worker became ready "
                    f"within call_deadline {self.s.call_deadline:g}s ({inst.state}: {inst.last_error})"))
        if inst.state == BACKOFF and now >= inst.restart_at:
            self.spawn(inst)
            return
        if w is None:
            return
        if w.kill_at and now >= w.kill_at:
            w.kill_at = 0.0
            w.kill_reason = w.kill_reason or f"did not exit within stop_grace {self.s.stop_grace:g}s"
            self.zygote.kill(w.wid, signal.SIGKILL)
            return
        if inst.state not in (STARTING, RUNNING) or w.kill_reason:
            return
        found = verdict(w.vitals, now, self.s, inst.ctrl.plugin_type != wire.TYPE_SOURCE)
        if found is None:
            return
        kind, why = found
        if kind == KILL:
            self.kill(inst, w, why, now)
        elif kind == RECYCLE and inst.state == RUNNING and not (
                isinstance(route, FunctionRoute) and route.call is not None):
            inst.move(RECYCLING, RUNNING)
            w.kill_reason = why
            self.note(logging.INFO, inst, "recycling worker pid %d: %s", w.pid, why)
            self.send(w, frames.encode(frames.STOP))
            w.kill_at = now + self.s.stop_grace

    def sample(self) -> None:
        """psutil figures of every worker; refreshes the snapshot the metrics thread serves."""
        for wid, proc in list(self.procs.items()):
            entry = self.workers.get(wid)
            if entry is None:
                continue
            try:
                with proc.oneshot():
                    entry[0].vitals.rss = proc.memory_info().rss
                    entry[0].vitals.cpu_percent = proc.cpu_percent(None)
            except psutil.Error:
                pass
        if self.metrics is not None:
            self.cached = self.snapshot()

    def snapshot(self) -> Snapshot:
        """Everything ``kuiper-pool status`` and the metrics show (schema in status.py)."""
        now = time.time()
        rows = []
        for inst in self.instances.values():
            w, c = inst.worker, inst.ctrl
            v = w.vitals if w is not None else None
            emitted = v.processed if v is not None and c.plugin_type == wire.TYPE_SOURCE else 0
            rows.append({
                "symbol": c.symbol, "type": c.plugin_type, "rule": c.rule_id, "op": c.op_id,
                "instance": c.instance_id, "pid": (w.pid or None) if w is not None else None,
                "state": inst.state,
                "uptime": now - inst.running_since if inst.state == RUNNING else 0.0,
                "restarts": inst.restarts, "restart_causes": dict(inst.restart_causes),
                "last_error": inst.last_error, "rss": v.rss if v else 0,
                "cpu_percent": v.cpu_percent if v else 0.0,
                "items_in": inst.items_in + emitted, "items_out": inst.items_out + emitted,
                "errors": inst.errors})
        return {"plugin": self.plugin.name, "pid": os.getpid(), "zygote_pid": self.zygote.pid,
                "uptime": now - self.started_at, "time": now, "instances": rows}

    def note(self, level: int, inst: Instance, msg: str, *args: Any) -> None:
        """Log about one instance: plugin, symbol and rule in the record, pid in the text."""
        self.log.log(level, "plugin %s %s: " + msg, self.plugin.name, inst.ctrl.describe(), *args,
                     extra={"symbol": inst.ctrl.symbol, "rule": inst.ctrl.rule_id or "-"})
