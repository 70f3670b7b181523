"""``kuiper-pool serve <plugin dir>``: run the plugin's script as eKuiper would, with
``plugin.start`` serving its functions over REST (``serve/``); ``--emit-service <dir>``
writes the service JSON and ``.proto`` eKuiper registers instead (docs/serve.md)."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from ..config import ConfigError, load_settings
from ..plugin import SERVE_ENV
from ..serve.schema import arg_types, proto_text, service_json
from .validate import Checks, inspect_folder


def serve(plugin_dir: str, python: str, listen: Optional[str]) -> int:
    """Replace this process with the plugin's script under kuiper_pool, serving REST."""
    checks = Checks()
    folder = inspect_folder(plugin_dir, checks)
    if not folder.executable:
        return _refuse(checks, plugin_dir)
    env = dict(os.environ, **{SERVE_ENV: "1"})
    if listen:
        env["KUIPER_POOL_SERVE_LISTEN"] = listen
    script = folder.executable_path
    os.chdir(os.path.dirname(script))
    # under the ekuiper alias, so a plugin written for the official SDK serves unchanged
    os.execvpe(python, [python, "-u", "-m", "kuiper_pool.interpreter", script], env)


def emit_service(plugin_dir: str, out_dir: str, address: Optional[str]) -> int:
    """Write ``<out>/<plugin>.json`` and ``<out>/schemas/<plugin>.proto`` (etc/services' layout)."""
    checks = Checks()
    folder = inspect_folder(plugin_dir, checks)
    functions: List[str] = [f for f in folder.symbols.get("functions", []) if isinstance(f, str)]
    if not folder.name or not folder.executable:
        return _refuse(checks, plugin_dir)
    try:
        settings = load_settings(os.path.dirname(folder.executable_path))
    except ConfigError as e:
        print(f"kuiper-pool serve: {e}", file=sys.stderr)
        return 1
    if address is None:
        host, _, port = settings.serve_listen.rpartition(":")
        address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"
    types = {}
    for f in functions:
        s = settings.for_symbol(f)
        types[f] = (arg_types(s.serve_args), s.serve_result)
    schema = f"{folder.name}.proto"
    os.makedirs(os.path.join(out_dir, "schemas"), exist_ok=True)
    written = [os.path.join(out_dir, f"{folder.name}.json"), os.path.join(out_dir, "schemas", schema)]
    for path, text in zip(written, (service_json(folder.name, address, schema, functions),
                                    proto_text(folder.name, types))):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(path)
    if not functions:
        print(f"kuiper-pool serve: plugin {folder.name} declares no function", file=sys.stderr)
        return 1
    return 0


def _refuse(checks: Checks, plugin_dir: str) -> int:
    for problem in checks.problems or []:
        print(f"kuiper-pool serve: {problem.subject}: {problem.text}", file=sys.stderr)
    if not checks.problems:
        print(f"kuiper-pool serve: {plugin_dir}: no plugin executable found", file=sys.stderr)
    return 1
