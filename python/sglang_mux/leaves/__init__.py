"""Leaves: the memory streams a routed decode reads from. One policy per module, one method each.

A leaf gets a :class:`LeafContext` (what the router and the attention backend know about one request at one
layer) and its share of the :class:`~sglang_mux.router.grant.Grant`, and returns the logical page ids it keeps.

This registry is the one list of leaves: the ``--mux-leaves`` names (``leaf_names()``), the split, the grant,
the pages kept on the device and the routed decode's leaf loop all read it. Adding a leaf is one module with one
:class:`Leaf` subclass and one ``register_leaf`` line below. Unknown names fail loudly with the allowed ones.
"""

from __future__ import annotations

from sglang_mux.leaves.base import Leaf, LeafContext
from sglang_mux.leaves.chunk import ChunkLeaf
from sglang_mux.leaves.recent import RecentLeaf
from sglang_mux.leaves.retrieval import RetrievalLeaf
from sglang_mux.leaves.sink_heavy import SinkHeavyLeaf


class LeafRegistryError(ValueError):
    pass


# name -> leaf, in the order leaves choose pages: each chooses among the pages the previous ones left (the window
# first, so heavy hitters and retrieval never spend budget on pages the window already reads).
LEAVES: dict[str, Leaf] = {}


def register_leaf(cls: type[Leaf]) -> type[Leaf]:
    """Add a leaf class (last in the choosing order); its shares become ``--mux-leaves`` names."""
    if not (isinstance(cls, type) and issubclass(cls, Leaf)) or cls.name in ("", Leaf.name):
        raise LeafRegistryError(f"register_leaf: expected a Leaf subclass with its own name, got {cls!r}")
    if cls.name in LEAVES:
        raise LeafRegistryError(f"register_leaf: leaf {cls.name!r} is already registered")
    taken = set(leaf_names())
    clash = sorted(taken & set(cls.share_places()))
    if clash:
        raise LeafRegistryError(f"register_leaf: {cls.name!r}: share(s) {', '.join(clash)} already spent by a leaf")
    LEAVES[cls.name] = cls()
    return cls


def unregister_leaf(name: str) -> None:
    if name not in LEAVES:
        raise LeafRegistryError(f"unknown leaf {name!r}; registered: {', '.join(LEAVES)}")
    del LEAVES[name]


def get_leaf(name: str) -> Leaf:
    try:
        return LEAVES[name]
    except KeyError:
        raise LeafRegistryError(f"unknown leaf {name!r}; registered: {', '.join(LEAVES)}") from None


def leaf_names() -> tuple[str, ...]:
    """The ``--mux-leaves`` names (every registered leaf's shares), in split order."""
    places = {s: p for leaf in LEAVES.values() for s, p in leaf.share_places().items()}
    return tuple(sorted(places, key=places.__getitem__))  # stable: equal places keep registration order


def ranked_shares() -> tuple[str, ...]:
    """The shares registered leaves choose by score (``Leaf.ranked_shares``), in split order."""
    ranked = {s for leaf in LEAVES.values() for s in leaf.ranked_shares}
    return tuple(s for s in leaf_names() if s in ranked)


def query_aware_shares() -> tuple[str, ...]:
    """The shares of leaves that read this step's query (``Leaf.query_aware``): the pages worth scoring."""
    return tuple(s for leaf in LEAVES.values() if leaf.query_aware for s in leaf.share_places())


register_leaf(RecentLeaf)
register_leaf(SinkHeavyLeaf)
register_leaf(RetrievalLeaf)
register_leaf(ChunkLeaf)

__all__ = ["LEAVES", "Leaf", "LeafContext", "LeafRegistryError", "get_leaf", "leaf_names", "query_aware_shares",
           "ranked_shares", "register_leaf", "unregister_leaf"]
