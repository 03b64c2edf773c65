"""Adding a leaf is one class and one registry call: a throwaway leaf, defined here, is accepted in a leaf spec
(server flag and per-request field), granted budget by the split, and run through the routed decode of every
cold-page mode x {exact, routed} (test/test_leaf_matrix.py's cases, float64 oracles); the registry is restored after.
"""

from __future__ import annotations

import pytest
import torch
from test_leaf_matrix import MODES, P, ROUTED_BUDGET, L, run_case

from sglang_mux.config import MuxConfig, MuxConfigError
from sglang_mux.leaves import LEAVES, Leaf, LeafContext, LeafRegistryError, leaf_names, register_leaf, unregister_leaf
from sglang_mux.request_options import MuxRequestError, parse_request_options
from sglang_mux.router.grant import Grant, grant_for


class EveryOtherLeaf(Leaf):
    """Every other page going back from the one before the tail page, as many as its grant pays for.

        pages  0  1  2  3  4  5  6  7  [8: tail]     grant["every_other"] = 3  ->  keeps 3, 5, 7
    Positional, so it says which pages must stay on the device: exactly those.
    """

    name = "every_other"

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:
        pages = torch.tensor(list(self.device_pages(ctx.num_pages, grant)), dtype=torch.long, device=ctx.taken.device)
        return pages[~ctx.taken[pages]]

    def device_pages(self, num_pages: int, grant: Grant) -> range:
        return range(max(num_pages - 2 * grant["every_other"], num_pages % 2), num_pages - 1, 2)


@pytest.fixture
def every_other():
    before = (list(LEAVES), leaf_names())
    register_leaf(EveryOtherLeaf)  # the one line adding a leaf
    try:
        yield
    finally:
        unregister_leaf("every_other")
        assert (list(LEAVES), leaf_names()) == before


def test_worked_example():
    assert list(EveryOtherLeaf().device_pages(9, Grant(False, {"every_other": 3}))) == [3, 5, 7]
    assert list(EveryOtherLeaf().device_pages(9, Grant(False, {"every_other": 9}))) == [1, 3, 5, 7]
    assert list(EveryOtherLeaf().device_pages(8, Grant(False, {"every_other": 9}))) == [0, 2, 4, 6]


def test_unknown_until_registered():
    with pytest.raises(MuxConfigError, match="allowed: sink, recent, heavy, retrieval, chunk$"):
        MuxConfig(leaves="recent=16,every_other=rest")


def test_spec_split_and_grant(every_other):
    assert list(LEAVES)[-1] == "every_other" and leaf_names() == ("sink", "recent", "heavy", "retrieval", "chunk", "every_other")
    cfg = MuxConfig(budget=ROUTED_BUDGET, page_size=P, leaves="sink=8,recent=16,every_other=rest")
    split = cfg.leaf_split(cfg.budget)
    assert split == {"sink": 8, "recent": 16, "heavy": 0, "retrieval": 0, "chunk": 0, "every_other": 40}
    g = grant_for(L, cfg.budget, P, split)
    assert (g["sink"], g["recent"], g["every_other"]) == (1, 2, 5)
    assert g.total_pages == ROUTED_BUDGET // P
    # the default split gives it nothing; the per-request field accepts its name
    assert MuxConfig(budget=ROUTED_BUDGET, page_size=P).leaf_split(ROUTED_BUDGET)["every_other"] == 0
    opts = parse_request_options({"mux_leaves": "recent=8,every_other=rest"})
    assert opts.effective_config(cfg).leaf_split(ROUTED_BUDGET)["every_other"] == 56
    with pytest.raises(MuxConfigError, match="allowed: sink, recent, heavy, retrieval, chunk, every_other"):
        MuxConfig(leaves="every_odd=rest")
    with pytest.raises(MuxRequestError, match="mux_leaves"):
        parse_request_options({"mux_leaves": "every_odd=rest"})


def test_registry_errors_are_loud(every_other):
    with pytest.raises(LeafRegistryError, match="already registered"):
        register_leaf(EveryOtherLeaf)
    clash = type("Clash", (Leaf,), {"name": "clash", "shares": {"recent": 9}})
    with pytest.raises(LeafRegistryError, match="recent already spent"):
        register_leaf(clash)
    with pytest.raises(LeafRegistryError, match="registered: recent, sink_heavy, retrieval, chunk, every_other"):
        unregister_leaf("nope")


@pytest.mark.parametrize("routed", [False, True], ids=["exact", "routed"])
@pytest.mark.parametrize("mode", MODES)
def test_throwaway_leaf_runs_through_the_matrix(every_other, mode, routed):
    got = run_case("every_other", mode, routed)
    if routed:  # "every_other=rest": 8 pages; with the tail page (recent) that is what the step reads
        n = (L + P - 1) // P
        assert got["grant"]["every_other"] == ROUTED_BUDGET // P
        assert got["by_leaf"]["every_other"] == 8 and got["pages"] == list(range(n - 16, n - 1, 2)) + [n - 1]
