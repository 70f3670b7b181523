"""Run an example plugin from examples/ under the official SDK or kuiper_pool, unchanged.

``copy_example`` copies ``examples/<name>`` into a test folder and gives it a main script that
imports the example's module (its ``SOURCES``, ``SINKS``, ``FUNCTIONS`` tables) and starts it
with the runtime named by ``KP_RUNTIME`` (``official`` or ``kuiper_pool``), every symbol named
with the test's unique prefix (ipc paths in /tmp are global). ``extra`` is code added to the
main script; it may define ``EXTRA_FUNCTIONS``, symbols registered only for the test.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIMES = ("official", "kuiper_pool")

MAIN = '''import os
if os.environ["KP_RUNTIME"] == "official":
    from ekuiper import Function, PluginConfig, plugin
else:
    from kuiper_pool import Function, PluginConfig, plugin
from {module} import FUNCTIONS, SINKS, SOURCES

EXTRA_FUNCTIONS = {{}}
{extra}

def _named(table):
    return {{os.environ["KP_PREFIX"] + k: (lambda c=c: c()) for k, c in table.items()}}


if __name__ == "__main__":
    plugin.start(PluginConfig(os.environ["KP_PLUGIN"], _named(SOURCES), _named(SINKS),
                              _named(dict(FUNCTIONS, **EXTRA_FUNCTIONS))))
'''


def copy_example(example: str, root: str, runtime: str, unique: str, extra: str = "",
                 extra_functions: Tuple[str, ...] = (), settings: str = "") -> Tuple[str, Dict[str, str], str]:
    """``(plugin dir, Host env, symbol prefix)`` of a copy of ``examples/<example>`` under
    ``runtime``; ``settings`` is the copy's kuiper_pool.yaml (``{p}`` stands for the prefix)."""
    name, prefix = f"{example[:6]}{runtime[:2]}{unique}", f"{runtime[:2]}{unique}_"
    d = os.path.join(root, name)
    shutil.copytree(os.path.join(REPO, "examples", example), d)
    with open(os.path.join(d, f"{example}.json")) as f:
        meta = json.load(f)
    os.remove(os.path.join(d, f"{example}.json"))
    for kind in ("sources", "sinks", "functions"):
        meta[kind] = [prefix + s for s in meta[kind] + (list(extra_functions) if kind == "functions" else [])]
    for sym in meta["sources"]:
        yaml_path = os.path.join(d, "sources", sym[len(prefix):] + ".yaml")
        os.rename(yaml_path, os.path.join(d, "sources", sym + ".yaml"))
    meta["executable"] = "main.py"
    with open(os.path.join(d, name + ".json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(d, "main.py"), "w") as f:
        f.write(MAIN.format(module=example, extra=extra))
    with open(os.path.join(d, "kuiper_pool.yaml"), "w") as f:
        f.write(settings.replace("{p}", prefix))
    return d, {"KP_RUNTIME": runtime, "KP_PLUGIN": name, "KP_PREFIX": prefix}, prefix
