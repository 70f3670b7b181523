"""What the docs say about the code's structure, checked against the code: the state
diagram lists exactly the allowed changes, no import cycle exists and imports point down
(counting imports inside functions), the effects import no kind and no kind imports
another."""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Set

import kuiper_pool
from kuiper_pool.runtime import states

PACKAGE = os.path.dirname(kuiper_pool.__file__)


def test_the_state_diagram_lists_every_allowed_change_and_no_other():
    listed = {(a, b) for a, b in re.findall(r"^\s+([A-Z]+)\s+->\s+([A-Z]+)\s", states.__doc__, re.M)}
    allowed = {(a.name, b.name) for a, targets in states.TRANSITIONS.items() for b in targets}
    assert listed == allowed, {"missing": allowed - listed, "not allowed": listed - allowed}


def modules() -> Dict[str, str]:
    """Module name -> file, for every module of the package."""
    out = {}
    for folder, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(name: str, path: str, known: Dict[str, str]) -> Set[str]:
    """The package's modules ``name`` imports, anywhere in it but under ``if TYPE_CHECKING``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.dump(node.test) for n in ast.walk(node)}
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            out |= subs if len(subs) == len(node.names) else subs | ({base} & set(known))
    return out - {name}


def cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph``, or []."""
    done: Set[str] = set()

    def visit(node: str, path: List[str]) -> List[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        for nxt in sorted(graph[node]):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return []


def test_no_module_of_the_package_imports_itself_back():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "kuiper_pool.runtime.supervisor" in graph["kuiper_pool.plugin"]  # imports in functions count
    assert cycle(graph) == [], " -> ".join(cycle(graph))


KINDS = "kuiper_pool.runtime.kinds"


def kind_of(module: str) -> str:
    """The kind package ``module`` belongs to ("" for none: kinds/__init__ and base are shared)."""
    parts = module.split(".")
    return parts[3] if module.startswith(KINDS + ".") and parts[3] != "base" else ""


def test_effects_and_the_lifecycle_import_no_kind():
    """Effects holds what every kind uses; a kind's own I/O is its channel.py, loaded with it."""
    known = modules()
    for name in ("kuiper_pool.runtime.effects", "kuiper_pool.runtime.instances",
                 "kuiper_pool.runtime.worker", "kuiper_pool.runtime.frames"):
        kinds = sorted(m for m in imports(name, known[name], known) if kind_of(m))
        assert kinds == [], f"{name} imports {kinds}"


def test_no_kind_imports_another():
    """A kind's packages are loaded by name (kinds/__init__.py); ``serve`` replaces a function's
    channel, so it may import that one."""
    known = modules()
    found = {kind_of(m) for m in known} - {""}
    assert found == {"source", "sink", "function"}
    for name, path in known.items():
        mine = kind_of(name)
        for imported in imports(name, path, known):
            theirs = kind_of(imported)
            assert not theirs or theirs == mine or name.startswith("kuiper_pool.serve."), \
                f"{name} imports {imported}"


def test_imports_point_down():
    """What the README's "Imports point down" says: the top-level building blocks import no
    runtime module, and nothing of the package but ``tools/`` itself imports ``tools/``."""
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    below = [n for n in known if n in ("kuiper_pool.api", "kuiper_pool.wire", "kuiper_pool.config",
                                      "kuiper_pool.paths") or n.startswith("kuiper_pool.transport")]
    for name in below:
        up = sorted(m for m in graph[name] if m.startswith("kuiper_pool.runtime"))
        assert up == [], f"{name} imports {up}"
    for name in known:
        if name.startswith("kuiper_pool.runtime"):
            up = sorted(m for m in graph[name] if m.startswith("kuiper_pool.tools"))
            assert up == [], f"{name} imports {up}"
