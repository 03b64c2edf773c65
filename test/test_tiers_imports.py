"""The tier modules import each other without a cycle (no server).

Every ``import`` counts, those inside functions too: a lazy import only hides a cycle until someone moves it.
What tiers share (errors, ``SizeInfo``) lives in ``memory/tier_base.py``, which imports no other tier module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "sglang_mux"


def imports_of(path: Path) -> set[str]:
    """The ``sglang_mux`` modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang_mux"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sglang_mux"))
    return found


def memory_graph() -> dict[str, set[str]]:
    modules = {f"sglang_mux.memory.{p.stem}": p for p in (PACKAGE / "memory").glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:  # path: from the start to node
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_memory_modules_have_no_import_cycle():
    graph = memory_graph()
    assert "sglang_mux.memory.remote_tier" in graph["sglang_mux.memory.tiers"]  # the edge the check is about
    assert find_cycle(graph) is None


def test_tier_base_imports_no_tier():
    assert imports_of(PACKAGE / "memory" / "tier_base.py") == set()


def test_every_tier_raises_the_same_errors():
    from sglang_mux.memory import remote_tier, tier_base, tiers

    for name in ("PageIntegrityError", "TierConfigError", "SizeInfo"):
        assert getattr(tiers, name) is getattr(tier_base, name) is getattr(remote_tier, name)
