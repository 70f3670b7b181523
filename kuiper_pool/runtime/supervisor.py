"""The supervisor: one selector loop that serves eKuiper's control channel, routes data
between eKuiper and the workers, and drives each instance's state machine. The loop only
selects, dispatches and ticks; what it dispatches to lives beside it:

* ``control.py``: eKuiper's start/stop commands, status requests, an operator's restart;
* ``effects.py``: what instances may ask for (workers, links, watching eKuiper's endpoints);
* ``instances.py`` + ``kinds/``: the lifecycle, and each kind's data path;
* ``observe.py``: psutil samples and the status snapshot;
* ``reload.py``: a reload (SIGHUP, ``kuiper-pool reload``) onto the code as it is on disk now.

A sink item: eKuiper -> ``SinkRoute.on_readable`` -> link (``frames``) -> ``kinds/sink/serve.py``
-> DONE/ACK -> ``SinkRoute.on_frame`` -> ack to eKuiper. A lent function call never passes
through the supervisor; sources skip it too (their worker dials eKuiper itself).

Every callback, frame and tick runs inside :meth:`Supervisor.guarded`: an exception raised
while handling one instance ends at most that instance (``Instance.contain``); anything
else is logged and the loop goes on. Signal handlers only wake the loop; every decision is
taken in the loop on ``time.monotonic()``.
"""
from __future__ import annotations

import os
import selectors
import signal
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .. import paths, wire
from ..api import PluginConfig
from ..config import Settings
from ..logs import supervisor_logger
from .control import Commands
from .effects import LoopEffects, fields
from .instances import REMOVED, Instance
from .observe import sample, snapshot
from .reload import Reloader
from .metrics import MetricsServer, render
from .status import StatusServer
from .zygote import Zygote

TICK = 0.05          # seconds between housekeeping passes (crash reports wake the loop at once)
ERROR_LOG_EVERY = 10.0  # the same loop error is logged with its traceback at most this often

Handler = Callable[[int], None]


class Supervisor:
    """Owns the control channel, the instances and the loop."""

    effects_class = LoopEffects  # kuiper-pool serve brings its own (serve/pool.py)

    def __init__(self, plugin: PluginConfig, settings: Settings, zygote: Zygote,
                 control: Any = None, main_argv: Sequence[str] = ()) -> None:
        """``control`` is eKuiper's control channel (a REQ endpoint), already dialed and
        handshaken by ``plugin.start``; ``main_argv``: how to run the plugin's main script
        again (a reload's fresh zygote)."""
        self.plugin = plugin
        self.s = settings
        self.zygote = zygote
        self.log = supervisor_logger()
        self.sel = selectors.DefaultSelector()
        self.instances: Dict[str, Instance] = {}
        self.fx = self.effects_class(settings, zygote, self.register, self.unregister,
                                     self.want_write, self.guarded, self.forget)
        self.commands = Commands(self)
        self.exiting = ""
        self.exit_code = 0
        self.control: Any = control
        self.control_lost_since = 0.0
        self.parent = os.getppid()  # eKuiper (or conda run): when it exits, so do we (0: never)
        self.last_sample = 0.0
        self.started_at = time.time()
        self.status: Optional[StatusServer] = None
        self.metrics: Optional[MetricsServer] = None
        self.cached = ""    # the metrics text the metrics thread serves
        self.logged_errors: Dict[str, float] = {}
        self.reloader = Reloader(self, list(main_argv))

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until eKuiper goes away or a signal asks us to stop; return the exit code."""
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number
        self.register(wake_r, lambda _m: self.on_signal(wake_r))
        self.attach_zygote(self.zygote)
        self.open_channels()
        self.open_status()
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

    def open_channels(self) -> None:
        """Start serving whoever calls the plugin: eKuiper's control channel."""
        # commands eKuiper sent since the handshake wait in the control socket until now
        self.register(self.control.fileno(), lambda _m: self.commands.on_control())
        self.log.info("plugin %s: supervisor pid %d serving %s (zygote pid %d)",
                      self.plugin.name, os.getpid(), self.control.url, self.zygote.pid)

    def register(self, fd: int, handler: Handler, inst: Optional[Instance] = None,
                 events: int = selectors.EVENT_READ) -> None:
        """Watch ``fd``; ``inst`` is the instance an exception in ``handler`` is charged to."""
        self.sel.register(fd, events, (handler, inst))

    def unregister(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def want_write(self, fd: int, on: bool) -> None:
        """Watch ``fd`` for write readiness too while its outbox holds bytes."""
        try:
            key = self.sel.get_key(fd)
        except (KeyError, ValueError):
            return  # not watched (any more): nothing to wake for
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if key.events != events:
            self.sel.modify(fd, events, key.data)

    def forget(self, inst: Instance) -> None:
        if self.instances.get(inst.ctrl.key) is inst:
            del self.instances[inst.ctrl.key]

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
                           exc_info=e, extra=fields(inst))
        if inst is not None and inst.state != REMOVED:
            try:
                inst.contain(e)
            except Exception as again:  # noqa: BLE001 - last resort: forget the instance
                self.log.error("%s: could not contain %s: %s", inst.where(), type(again).__name__,
                               again, extra=fields(inst))
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
            path = paths.status_socket(self.plugin.name, self.s.runtime_dir)
            self.status = StatusServer(path, self.commands.on_status_request,
                                       lambda fd, ev, cb: self.register(fd, cb, None, ev),
                                       self.unregister)
        except OSError as e:
            self.log.warning("plugin %s: no status socket: %s; serving without it", self.plugin.name, e)
            return
        self.zygote.own_path(path)
        self.register(self.status.fileno(), lambda _m: self.status.on_accept())
        self.log.info("plugin %s: status and metrics on %s (kuiper-pool status %s; "
                      "kuiper-pool metrics serves every plugin's over HTTP)",
                      self.plugin.name, path, self.plugin.name)
        if self.s.metrics_address:
            self.cached = render([snapshot(self)])
            try:
                self.metrics = MetricsServer(self.s.metrics_address, lambda: self.cached)
            except OSError as e:
                self.log.error("plugin %s: metrics_address %s: %s; serving them on the status socket "
                               "only (each plugin needs a port of its own; kuiper-pool metrics "
                               "serves every plugin's on one)", self.plugin.name,
                               self.s.metrics_address, e.strerror or e)
            else:
                self.log.info("plugin %s: metrics served at %s", self.plugin.name, self.metrics.url)

    def close(self) -> None:
        for inst in list(self.instances.values()):
            self.guarded("close", None, inst.remove)
        for closable in (self.control, self.status, self.metrics):
            if closable is not None:
                self.guarded("close", None, closable.close)
        self.guarded("close", None, self.fx.flush_state)
        self.guarded("close", None, self.reloader.close)
        self.zygote.close()

    def on_signal(self, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.shutdown(f"received {signal.Signals(signum).name}")
            elif signum == signal.SIGHUP:
                refused = self.reloader.begin(check=False).get("error")
                if refused:
                    self.log.warning("%s", refused)

    def attach_zygote(self, z: Zygote) -> None:
        """Serve ``z`` (the first zygote, or the one a reload switched to): its reports, and
        its requests as it can take them."""
        self.register(z.fileno(), lambda mask: self.on_zygote(z, mask))
        z.watch(lambda on: self.want_write(z.fileno(), on))

    def on_zygote(self, z: Zygote, mask: int) -> None:
        if self.fx.on_zygote(z, mask):
            return
        if z is not self.zygote:  # a zygote a reload replaced: its workers died with it
            self.fx.orphaned(z)
            return
        self.log.error("plugin %s: the zygote process died; no worker can be started", self.plugin.name)
        self.exiting, self.exit_code = "zygote died", 1
        for inst in list(self.instances.values()):
            self.guarded("zygote died", inst, inst.remove,
                         wire.one_line(f"plugin {self.plugin.name}: the zygote process died"))

    # --- housekeeping --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for inst in list(self.instances.values()):
            self.guarded("tick", inst, inst.tick, now)
        self.guarded("state", None, self.fx.flush_state, now)
        self.guarded("shared", None, self.fx.shared.tick, now)
        self.guarded("reload", None, self.reloader.tick, now)
        if now - self.last_sample >= self.s.sample_interval:
            self.last_sample = now
            sample(self)
            if self.metrics is not None:  # the text the metrics thread serves
                self.cached = render([snapshot(self)])
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
        if self.parent and os.getppid() != self.parent:
            # a lingering plugin would answer the next eKuiper's handshake in place of the
            # process that eKuiper starts anew, so leave at once
            self.shutdown(f"eKuiper (parent pid {self.parent}) exited", 0)
