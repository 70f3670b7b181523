"""``plugin.start``: turn the process eKuiper started into the supervisor."""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, List, NoReturn, Optional, Tuple

from . import logs
from .api import PluginConfig
from .config import ConfigError, check_trusted, load_settings
from .describe import DESCRIBE_ENV

if TYPE_CHECKING:
    from .runtime.zygote import WorkerMain, Zygote

# set by ``kuiper-pool serve`` (tools/serve.py); outside the KUIPER_POOL_ settings namespace
SERVE_ENV = "KUIPERPOOL_SERVE"


def start(c: Any) -> NoReturn:
    """Run the plugin under kuiper_pool; never returns (exits when eKuiper goes away or on
    SIGTERM/SIGINT). Accepts kuiper_pool's ``PluginConfig`` or the official SDK's."""
    if not sys.platform.startswith("linux"):
        print(f"kuiper_pool: cannot start: kuiper_pool runs on Linux only (this is {sys.platform}): "
              f"it needs memfd_create, prctl and /proc", flush=True)
        sys.exit(2)
    script_dir = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else os.getcwd()
    if os.environ.get(DESCRIBE_ENV):
        from .describe import describe

        describe(c, script_dir)  # prints the symbol table and exits
    from .runtime.protocol import FRESH_ENV  # not at import: plugin authors import this module

    fresh = None
    if FRESH_ENV in os.environ:  # a reload's fresh zygote: it serves the running supervisor
        from .runtime import zygote

        fresh = zygote.fresh_link()
    warnings: List[str] = []
    try:
        plugin = PluginConfig.adopt(c)
        settings = load_settings(script_dir, plugin.settings, known_symbols=plugin.symbol_names(),
                                 warn=warnings.append)
        if settings.runtime_dir:  # the default (the system's tmp) is checked with the run dir
            check_trusted(settings.runtime_dir, "runtime_dir")
        from .runtime.state import check_dir

        check_dir(settings.state_dir)
    except (ConfigError, ValueError) as e:
        if fresh is not None:
            zygote.report_error(fresh[0], str(e))
            sys.exit(2)
        print(f"kuiper_pool: cannot start: {e}", flush=True)
        sys.exit(2)
    logs.setup(plugin.name, settings.log_level)
    for text in warnings:
        logs.supervisor_logger().warning("plugin %s: %s", plugin.name, text)
    if fresh is not None:
        sys.exit(_serve_fresh(plugin, settings, script_dir, fresh))
    if os.environ.get(SERVE_ENV):  # kuiper-pool serve: functions over REST, no eKuiper to dial
        sys.exit(_serve_rest(plugin, settings, script_dir))
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
        if zygote is None:
            return 2
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
        if zygote is None:
            control.close()
            return 2
    from .runtime.supervisor import Supervisor

    return Supervisor(plugin, settings, zygote, control, _main_argv(script_dir)).run()


def _serve_rest(plugin: PluginConfig, settings: Any, script_dir: str) -> int:
    """``kuiper-pool serve``: the plugin's functions as an eKuiper external service."""
    _raise_fd_limit()
    zygote = _fork_zygote(plugin, settings, script_dir, ())
    if zygote is None:
        return 2
    from .serve.supervisor import ServeSupervisor

    try:
        return ServeSupervisor(plugin, settings, zygote, None, _main_argv(script_dir)).run()
    except OSError as e:  # cannot listen on serve_listen
        logs.supervisor_logger().error("plugin %s: cannot serve on %s: %s", plugin.name,
                                       settings.serve_listen, e)
        zygote.close()
        return 1


def _main_argv(script_dir: str) -> List[str]:
    """How a reload runs the main script again, as eKuiper did, in a fresh zygote
    (runtime/reload.py)."""
    return _python("kuiper_pool.runtime.zygote", script_dir) + [os.path.abspath(sys.argv[0]), *sys.argv[1:]]


def _serve_fresh(plugin: PluginConfig, settings: Any, script_dir: str, fresh: Any) -> int:
    """A reload's fresh zygote: report the new code's symbols (each built and checked in a
    throwaway child, as ``kuiper-pool validate`` does) and settings, then make workers with
    them exactly as a zygote forked at start would. It never dials eKuiper."""
    from .version import __version__  # the kuiper_pool the new code imports (its own, once upgraded)
    from .describe import inspect_symbols
    from .runtime import zygote
    from .runtime.protocol import Hello

    try:
        load_worker, spawn_argv, exec_all, _payload = _worker_setup(plugin, settings, script_dir)
    except ValueError as e:
        zygote.report_error(fresh[0], str(e))
        return 2
    hello = Hello(__version__, plugin.name, sorted(plugin.sources), sorted(plugin.sinks),
                  sorted(plugin.functions), settings.as_dict(),
                  zygote.in_child(lambda: inspect_symbols(plugin, settings.start_method == "spawn")))
    # the payload stays open here: this process is the zygote its exec'd workers inherit it from
    return zygote.serve_fresh(fresh, hello, load_worker, spawn_argv, exec_all, settings.thread_env(),
                              settings.symbol_env())


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
                 inherited: Tuple[Any, ...]) -> Optional[Zygote]:
    """The zygote, in a fresh private run dir; ``inherited`` is closed in it. None (said in
    one line) when workers must exec and the factories cannot be shipped to them."""
    from .paths import fresh_dir, private_base, system_tmp
    from .runtime.zygote import Zygote

    if not settings.runtime_dir:
        try:
            check_trusted(system_tmp(), "runtime_dir")
        except ConfigError as e:
            print(f"kuiper_pool: cannot start: {e}", flush=True)
            return None
    try:
        load_worker, spawn_argv, exec_all, payload = _worker_setup(plugin, settings, script_dir)
    except ValueError as e:
        print(f"kuiper_pool: cannot start: {e}", flush=True)
        return None
    rundir = fresh_dir(private_base(settings.runtime_dir), f"{plugin.name}-")
    try:
        return Zygote(load_worker, rundir, spawn_argv, inherited, exec_all, settings.thread_env(),
                      settings.symbol_env())
    finally:
        if payload >= 0:
            os.close(payload)  # the zygote has it: exec'd workers inherit it


def _worker_setup(plugin: PluginConfig, settings: Any, script_dir: str
                  ) -> Tuple[Callable[[], WorkerMain], Optional[List[str]], bool, int]:
    """How a zygote makes workers: ``load_worker`` (run once in the zygote), the command
    exec'd workers run (None: every worker is forked), whether every worker execs, and the
    payload fd (-1: none) the command reads. ValueError (one line) when workers must exec
    and the factories cannot be shipped to them."""
    from .runtime.zygote import other_threads

    exec_all = _exec_workers(plugin.name, settings.start_method, other_threads())
    symbol_env = settings.symbol_env()
    spawn_argv, payload = None, -1
    if exec_all or symbol_env:
        try:
            payload = _spawn_payload(plugin)
        except Exception as e:  # noqa: BLE001 - cloudpickle raises whatever an object's reduction raises
            why = f"cannot ship the factories to exec'd workers: {type(e).__name__}: {e}"
            if settings.start_method != "auto" or symbol_env:
                raise ValueError(f"plugin {plugin.name}: {why}") from e
            logs.supervisor_logger().warning("plugin %s: %s; workers are forked", plugin.name, why)
            exec_all = False
        else:
            spawn_argv = _worker_command(payload, script_dir, settings.log_level)

    def load_worker() -> Callable[[Any], int]:  # runs in the zygote: every worker shares it
        from . import wire
        from .runtime import worker

        wire.encoder()
        return lambda link: worker.run(link, plugin)
    return load_worker, spawn_argv, exec_all, payload


def _spawn_payload(plugin: PluginConfig) -> int:
    """The cloudpickled factories in a sealed memfd that exec'd workers inherit: no path
    another user could reach, no bytes anyone can change after it is written."""
    import fcntl

    import cloudpickle

    data = cloudpickle.dumps({"name": plugin.name, "sources": plugin.sources, "sinks": plugin.sinks,
                              "functions": plugin.functions})
    fd = os.memfd_create("kuiper_pool-plugin", os.MFD_ALLOW_SEALING)  # inheritable on purpose
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                | fcntl.F_SEAL_SEAL)
    return fd


def _worker_command(payload: int, script_dir: str, log_level: str) -> List[str]:
    """The command an exec'd worker runs; it reads the factories from fd ``payload``."""
    return _python("kuiper_pool.runtime.worker", script_dir) + [str(payload), log_level]


def _python(module: str, script_dir: str) -> List[str]:
    """This interpreter running ``module``, unbuffered, with the plugin's folder first on
    sys.path (as eKuiper's ``python <script>`` has it) and never the working directory;
    under kuiper-pool-python the plugin's modules import ekuiper, so what it starts runs
    under the alias too."""
    from . import interpreter
    from .launch import python_command

    alias = ["kuiper_pool.interpreter"] if interpreter.installed() else []
    return python_command(script_dir, alias + [module])


def _exec_workers(name: str, start_method: str, threads: Tuple[int, str]) -> bool:
    """Whether every worker execs: ``spawn``, or ``auto`` with threads alive (forking a
    process with threads can deadlock the child on a lock one of them held)."""
    count, which = threads
    if count:
        choice = ("workers are forked anyway (start_method: fork)" if start_method == "fork" else
                  "workers are started with exec and import the plugin afresh (set start_method: "
                  "fork to fork anyway)" if start_method == "auto" else "workers are started with exec")
        logs.supervisor_logger().warning(
            "plugin %s: %d thread(s) alive besides the main one before forking: %s; %s",
            name, count, which, choice)
    return start_method == "spawn" or (start_method == "auto" and count > 0)


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
