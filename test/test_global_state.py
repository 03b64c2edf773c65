"""Module-level state of python/sglang_mux that changes at run time is exactly what docs/architecture.md lists in
its "Process-global state" table (name, owner, why process-global): a new global fails here until it has a row,
and a row whose global is gone fails too.

What counts, found by reading the source (nothing is imported): names in ``global`` statements; module-level
dicts, lists and sets that some module mutates (item assignment, ``del``, ``append``/``update``/...); module-level
instances of the package's classes that are not frozen dataclasses; functions decorated with ``lru_cache``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "sglang_mux"
DOC = ROOT / "docs" / "architecture.md"

MUTATORS = {"append", "appendleft", "extend", "update", "pop", "popitem", "clear", "add", "discard", "remove",
            "insert", "setdefault"}
CONTAINER_CALLS = {"dict", "list", "set", "defaultdict", "deque", "OrderedDict", "Counter"}
CACHE_DECORATORS = {"functools.lru_cache", "lru_cache", "functools.cache", "cache"}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(p.relative_to(PKG).as_posix(), ast.parse(p.read_text(encoding="utf-8")))
            for p in sorted(PKG.rglob("*.py")) if "cpu_stubs" not in p.parts]


def _classes(mods) -> tuple[set, set]:
    """The package's class names, and those that are frozen dataclasses."""
    names, frozen = set(), set()
    for _, tree in mods:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                if any(isinstance(d, ast.Call) and any(k.arg == "frozen" and getattr(k.value, "value", False)
                                                       for k in d.keywords) for d in node.decorator_list):
                    frozen.add(node.name)
    return names, frozen


def _mutated_names(mods) -> set:
    """Names that some module mutates in place: ``X[k] = ...``, ``X.a = ...``, ``del X[k]``, ``X.append(...)``."""
    out = set()
    for _, tree in mods:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name)):
                out.add(node.func.value.id)
                continue
            else:
                continue
            out.update(t.value.id for t in targets
                       if isinstance(t, (ast.Subscript, ast.Attribute)) and isinstance(t.value, ast.Name))
    return out


def global_state() -> set[str]:
    """``path::name`` of every piece of run-time module state in the package (paths relative to sglang_mux/)."""
    mods = _modules()
    classes, frozen = _classes(mods)
    mutated = _mutated_names(mods)
    found = set()
    for path, tree in mods:
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                found.update(f"{path}::{name}" for name in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(ast.unparse(d.func if isinstance(d, ast.Call) else d) in CACHE_DECORATORS
                       for d in node.decorator_list):
                    found.add(f"{path}::{node.name}")
        for node in tree.body:
            if isinstance(node, ast.Assign):
                names, value = [t.id for t in node.targets if isinstance(t, ast.Name)], node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                names, value = [node.target.id], node.value
            else:
                continue
            container = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in CONTAINER_CALLS)
            instance = (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                        and value.func.id in classes and value.func.id not in frozen)
            found.update(f"{path}::{name}" for name in names if instance or (container and name in mutated))
    return found


def documented() -> set[str]:
    """The ``path::name`` entries of the first column of docs/architecture.md's "Process-global state" table."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Process-global state", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {m for row in rows for m in re.findall(r"`([\w/]+\.py::\w+)`", row.split("|")[1])}


def test_every_global_has_a_row_in_the_architecture_table():
    missing = sorted(global_state() - documented())
    assert not missing, (f"module-level state not in docs/architecture.md 'Process-global state': {missing}; "
                         "give it an owner instead, or add a row (name, owner, why process-global)")


def test_every_row_names_a_global_that_exists():
    stale = sorted(documented() - global_state())
    assert not stale, f"docs/architecture.md 'Process-global state' lists state that is gone: {stale}"


def test_the_finder_sees_each_kind():
    found = global_state()
    assert {"memory/requests.py::REGISTRY", "metrics.py::STATS", "memory/tiers.py::_SHARED",  # instance, container
            "plugin.py::_registered", "platform/__init__.py::has_cuda_gpu"} <= found  # global, lru_cache
    assert "router/grant.py::EXACT" not in found  # an instance of a frozen dataclass
    assert "memory/chunks.py::_TABLES" not in found  # the delimiter tables live in the RequestRegistry
