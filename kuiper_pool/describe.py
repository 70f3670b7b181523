"""What a plugin's main script exposes, printed from inside the plugin process.

``kuiper-pool validate`` runs the plugin's executable the way eKuiper does, with
:data:`DESCRIBE_ENV` set; ``plugin.start`` then calls :func:`describe`, which builds every
symbol, checks its object, prints one :data:`DESCRIBE_MARK` JSON line and exits instead of
serving. It lives apart from the tools so that the runtime never imports them.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Dict, NoReturn

from .api import PluginConfig
from .config import ConfigError, load_settings

# Not KUIPER_POOL_*: config.py rejects unknown variables with that prefix.
DESCRIBE_ENV = "KUIPERPOOL_DESCRIBE"
DESCRIBE_MARK = "kuiper_pool-describe: "
KINDS = ("sources", "sinks", "functions")  # json keys, PluginConfig attributes, metadata folders
# What each symbol's object must have: method -> positional arguments eKuiper's runtime passes.
METHODS: Dict[str, Dict[str, int]] = {
    "sources": {"configure": 2, "open": 1, "close": 1},
    "sinks": {"configure": 1, "open": 1, "collect": 2, "close": 1},
    "functions": {"validate": 1, "exec": 2, "is_aggregate": 0},
}

def describe(config: Any, script_dir: str) -> NoReturn:
    """Called by ``plugin.start`` when :data:`DESCRIBE_ENV` is set: build every
    symbol, check its object, load the settings, print one ``DESCRIBE_MARK`` JSON line, exit 0
    at once (threads the plugin's code started must not keep the process alive)."""
    report: Dict[str, Any] = {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable,
                              "name": getattr(config, "name", None), "config_error": "",
                              "settings_error": "", "start_method": "",
                              "symbols": {k: {} for k in KINDS}}
    try:
        plugin = PluginConfig.adopt(config)
    except ValueError as e:
        report["config_error"] = str(e)
        plugin = None
    if plugin is not None:
        try:
            report["start_method"] = load_settings(script_dir, plugin.settings,
                                                   known_symbols=plugin.symbol_names()).start_method
        except ConfigError as e:
            report["settings_error"] = str(e)
        report["symbols"] = inspect_symbols(plugin, report["start_method"] == "spawn")
    print(DESCRIBE_MARK + json.dumps(report, default=repr), flush=True)
    sys.stderr.flush()
    os._exit(0)


def inspect_symbols(plugin: PluginConfig, spawn: bool) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Build every symbol and check its object: kind -> symbol -> what is wrong with it."""
    return {kind: {str(symbol): _inspect_factory(factory, METHODS[kind], spawn)
                   for symbol, factory in getattr(plugin, kind).items()} for kind in KINDS}


def problem(entry: Dict[str, Any]) -> str:
    """What :func:`inspect_symbols` found wrong with one symbol, in words ('' if nothing)."""
    if entry["error"]:
        return entry["error"]
    if entry["missing"]:
        return f"{entry['class']} has no {', '.join(entry['missing'])} method"
    if entry["abstract"]:
        return f"{entry['class']} does not implement {', '.join(entry['abstract'])}"
    return "; ".join(entry["signature"])


def _inspect_factory(factory: Callable[[], Any], methods: Dict[str, int], spawn: bool) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"class": "", "error": "", "missing": [], "abstract": [], "signature": []}
    try:
        obj = factory()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - report any failure of plugin code
        entry["error"] = f"the factory raised {type(e).__name__}: {e}"
        return entry
    cls = type(obj)
    entry["class"] = f"{cls.__module__}.{cls.__qualname__}"
    for name, nargs in methods.items():
        attr = getattr(obj, name, None)
        if not callable(attr):
            entry["missing"].append(name)
        elif getattr(getattr(cls, name, None), "__isabstractmethod__", False):
            entry["abstract"].append(name)
        else:
            import inspect  # not at import: plugin.start imports this module on every start

            try:
                inspect.signature(attr).bind(*[None] * nargs)
            except TypeError:
                entry["signature"].append(f"{name}{inspect.signature(attr)} cannot take {nargs} "
                                          f"argument(s)")
            except ValueError:  # no signature to read (a builtin): nothing to check
                pass
    if spawn:
        try:
            import cloudpickle

            cloudpickle.dumps(factory)
        except Exception as e:  # noqa: BLE001 - anything pickling raises
            entry["error"] = f"start_method spawn cannot ship the factory: {type(e).__name__}: {e}"
    return entry
