"""Leaves: the memory streams a routed decode reads from. One policy per module, one method each.

A leaf gets a :class:`LeafContext` (what the router and the attention backend know about one request at one
layer) and its share of the :class:`~sglang_mux.router.grant.Grant`, and returns the logical page ids it keeps.
The registry maps names (as used in ``--mux-leaves``) to leaf objects; unknown names fail loudly.
"""

from __future__ import annotations

from sglang_mux.leaves.base import Leaf, LeafContext
from sglang_mux.leaves.recent import RecentLeaf
from sglang_mux.leaves.retrieval import RetrievalLeaf
from sglang_mux.leaves.sink_heavy import SinkHeavyLeaf

# Order matters: each leaf chooses among the pages the previous ones left (the window first, so heavy hitters
# and retrieval never spend budget on pages the window already reads).
LEAVES: dict[str, Leaf] = {
    "recent": RecentLeaf(),
    "sink_heavy": SinkHeavyLeaf(),
    "retrieval": RetrievalLeaf(),
}

__all__ = ["LEAVES", "Leaf", "LeafContext"]
