"""``plugin.start``: turn the process eKuiper started into the supervisor."""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Tuple

from . import logs
from .api import PluginConfig
from .config import ConfigError, load_settings
from .describe import DESCRIBE_ENV

if TYPE_CHECKING:
    from .runtime.zygote import Zygote


def start(c: Any) -> NoReturn:
    """Run the plugin under kuiper_pool; never returns (exits when eKuiper goes away or on
    SIGTERM/SIGINT). Accepts kuiper_pool's ``PluginConfig`` or the official SDK's."""
    script_dir = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else os.getcwd()
    if os.environ.get(DESCRIBE_ENV):
        from .describe import describe

        describe(c, script_dir)  # prints the symbol table and exits
    try:
        plugin = PluginConfig.adopt(c)
        settings = load_settings(script_dir, plugin.settings)
    except (ConfigError, ValueError) as e:
        print(f"kuiper_pool: cannot start: {e}", flush=True)
        sys.exit(2)
    logs.setup(plugin.name, settings.log_level)
    if len(sys.argv) > 1:
        try:
            json.loads(sys.argv[1])  # eKuiper's {"sendTimeout": ...}: nothing in it applies here
        except ValueError:
            print(f"kuiper_pool: plugin {plugin.name}: ignoring an argument that is not eKuiper's "
                  f"JSON: {sys.argv[1]!r}", flush=True)
    sys.exit(_serve(plugin, settings, script_dir))


def _serve(plugin: PluginConfig, settings: Any, script_dir: str) -> int:
    # The runtime is imported here, and most of it only after the handshake: eKuiper waits
    # for the handshake, and importing kuiper_pool stays light for plugin modules and tools.
    _raise_fd_limit()
    if settings.transport == "nng":
        # nng aborts a forked child of a process that has opened an nng socket: zygote first
        zygote = _fork_zygote(plugin, settings, script_dir, ())
        control = _open_control(plugin, settings)
        if control is None:
            zygote.close()
            return 1
    else:
        # answer eKuiper first; commands it sends meanwhile wait in the socket for the loop
        control = _open_control(plugin, settings)
        if control is None:
            return 1
        zygote = _fork_zygote(plugin, settings, script_dir, (control,))
    from .runtime.supervisor import Supervisor

    return Supervisor(plugin, settings, zygote, control).run()


def _open_control(plugin: PluginConfig, settings: Any) -> Any:
    """eKuiper's control channel, dialed and handshaken; None (logged) if it cannot be."""
    from .transport import req_endpoint
    from .wire import control_url

    url = control_url(plugin.name)
    try:
        return req_endpoint(settings.transport, url, settings.dial_timeout)
    except OSError as e:
        logs.supervisor_logger().error("plugin %s: cannot reach eKuiper's control channel %s "
                                       "within %gs: %s", plugin.name, url, settings.dial_timeout, e)
        return None


def _fork_zygote(plugin: PluginConfig, settings: Any, script_dir: str,
                 inherited: Tuple[Any, ...]) -> Zygote:
    """The zygote, in a fresh private run dir; ``inherited`` is closed in it."""
    import tempfile

    from .paths import private_base
    from .runtime.zygote import Zygote

    rundir = tempfile.mkdtemp(prefix=f"{plugin.name}-", dir=private_base(settings.runtime_dir))
    spawn_argv = None
    if settings.start_method == "spawn":
        import cloudpickle

        payload = os.path.join(rundir, "plugin.pkl")
        with open(os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            cloudpickle.dump({"name": plugin.name, "sources": plugin.sources, "sinks": plugin.sinks,
                              "functions": plugin.functions}, f)
        spawn_argv = [sys.executable, "-u", "-m", "kuiper_pool.runtime.worker", payload, script_dir,
                      settings.log_level]

    def load_worker() -> Callable[[Any], int]:  # runs in the zygote: every worker shares it
        from . import wire
        from .runtime import worker

        wire.encoder()
        return lambda link: worker.run(link, plugin)
    return Zygote(load_worker, rundir, spawn_argv, inherited)


def _raise_fd_limit() -> None:
    """Every sink and function holds a few fds in the supervisor: use all the hard limit
    allows (the common soft limit of 1024 would cap a plugin near 165 sinks)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # the kernel's nr_open is lower: keep what we have
