"""Layer budgets (router/layer_budget.py, --mux-layer-budget): each ranked share's total over the layers is the
grant's, positional shares stay at every layer, the pyramid's worked example, the adaptive factors follow how
concentrated each layer's prefill attention is, and the routed step reads each layer's own page count."""

from __future__ import annotations

import random

import pytest
import torch
from test_routed_decode import make_backend

from sglang_mux.attention.step_planner import RequestPlan
from sglang_mux.config import MuxConfig, MuxConfigError
from sglang_mux.leaves import ranked_shares
from sglang_mux.request_options import MuxRequestError, MuxRequestOptions, parse_request_options
from sglang_mux.router.grant import EXACT, Grant
from sglang_mux.router.layer_budget import (
    ADAPTIVE_CLIP,
    adaptive_factors,
    layer_grants,
    pyramid_factors,
    split_total,
)
from sglang_mux.memory.requests import RequestMemory
from sglang_mux.router.spine import StaticSpineRouter


def test_ranked_shares_come_from_the_leaf_registry():
    assert ranked_shares() == ("heavy", "retrieval", "chunk")


def test_pyramid_worked_example():
    f = pyramid_factors(4)
    assert [round(x, 2) for x in f] == [1.5, 1.17, 0.83, 0.5]
    g = Grant(False, {"sink": 1, "recent": 2, "heavy": 2, "retrieval": 6, "chunk": 0})
    per_layer = layer_grants(g, f)
    assert [x["heavy"] + x["retrieval"] for x in per_layer] == [12, 9, 7, 4]
    assert [x["heavy"] for x in per_layer] == [3, 2, 2, 1] and [x["retrieval"] for x in per_layer] == [9, 7, 5, 3]
    assert all(x["sink"] == 1 and x["recent"] == 2 and x["chunk"] == 0 for x in per_layer)


def test_totals_kept_for_any_grant_and_factors():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(1, 40)
        pages = {"sink": rng.randint(0, 4), "recent": rng.randint(0, 8), "heavy": rng.randint(0, 20),
                 "retrieval": rng.randint(0, 60), "chunk": rng.randint(0, 20)}
        g = Grant(False, pages)
        factors = rng.choice([pyramid_factors(L), [rng.uniform(0.25, 3) for _ in range(L)], [1.0] * L])
        per_layer = layer_grants(g, factors)
        assert len(per_layer) == L
        for s in pages:
            total = sum(x[s] for x in per_layer)
            assert total == pages[s] * L  # each share's total over the layers is the grant's
            if s not in ranked_shares():
                assert all(x[s] == pages[s] for x in per_layer)  # positional shares at every layer
            assert all(x[s] >= 0 for x in per_layer)
        assert sum(x.total_pages for x in per_layer) == g.total_pages * L
    assert layer_grants(EXACT, pyramid_factors(3)) == [EXACT] * 3
    assert split_total(7, [1, 1, 1]) == [3, 2, 2] and split_total(0, [2, 1]) == [0, 0]


def test_adaptive_factors_follow_concentration():
    n = 64
    table = torch.full((4, n), 0.01)
    table[0, 10] = 10.0  # layer 0: all attention on one page
    table[1, 10:14] = 1.0  # layer 1: four pages
    table[2, 10:26] = 1.0  # layer 2: sixteen pages
    table[3] = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5  # layer 3: spread out
    f = adaptive_factors(table, ranked_pages=4, skip_first=1, skip_last=2)
    assert f[0] < f[1] < f[2] < f[3]
    assert abs(sum(f) / len(f) - 1) < 1e-5 and min(f) >= ADAPTIVE_CLIP[0] / 3 and max(f) <= ADAPTIVE_CLIP[1] * 1.01
    # sinks and the window are not counted: a sink-only layer is not "concentrated"
    sink_only = torch.full((2, n), 0.01)
    sink_only[:, 0] = 100.0
    assert adaptive_factors(sink_only, 4, 1, 2) == pytest.approx([1.0, 1.0])
    # too few pages to choose among: uniform
    assert adaptive_factors(table[:, :6], 4, 1, 2) == [1.0] * 4


def test_flag_and_request_field_validation():
    assert MuxConfig().layer_budget == "uniform"
    with pytest.raises(MuxConfigError, match="--mux-layer-budget: allowed: uniform, pyramid, adaptive"):
        MuxConfig(layer_budget="cone")
    assert parse_request_options({"mux_layer_budget": "pyramid"}).layer_budget == "pyramid"
    assert parse_request_options({"mux_layer_budget": "adaptive"}).effective_config(MuxConfig()).layer_budget == "adaptive"
    with pytest.raises(MuxRequestError, match="mux_layer_budget: allowed: uniform, pyramid, adaptive"):
        parse_request_options({"mux_layer_budget": "cone"})
    with pytest.raises(MuxRequestError, match="mux_chunk_score: allowed: heavy, quest"):
        parse_request_options({"mux_chunk_score": 3})


@pytest.mark.parametrize("policy", ["uniform", "pyramid", "adaptive"])
def test_routed_step_reads_each_layers_pages(policy):
    cfg = MuxConfig(budget=128, page_size=8, leaves="sink=16,recent=32,heavy=32,retrieval=rest", layer_budget=policy)
    L = 1003
    be, layer, kv, r2t, slots = make_backend(cfg, L)
    be.num_layers = 4  # the layer data is layer 0's; the budgets are spread over 4 layers
    n = (L + 7) // 8
    st = RequestMemory()
    table = st.scores(4, n, "cpu")
    table[:] = 0.01
    table[0, 40] = 5.0  # layer 0 concentrated; the others spread
    table[1:] += torch.rand(3, table.shape[1], generator=torch.Generator().manual_seed(1))
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    p = RequestPlan("r", 1, L, grant, st)
    per_layer = [be.planner.layer_grant(p, i) for i in range(4)]
    for s in grant.pages:
        assert sum(g[s] for g in per_layer) == 4 * grant[s]
    q = torch.randn(HQ_D := (layer.tp_q_head_num, layer.qk_head_dim), generator=torch.Generator().manual_seed(2))
    pages, by_leaf, *_ = be.planner.select(p, 0, q, r2t.req_to_token[1], layer.scaling)
    assert by_leaf["sink_heavy"] + by_leaf["retrieval"] + by_leaf["recent"] <= per_layer[0].total_pages
    assert by_leaf["retrieval"] == per_layer[0]["retrieval"]
    if policy == "uniform":
        assert all(g is grant for g in per_layer)
    elif policy == "pyramid":
        assert per_layer[0]["retrieval"] > grant["retrieval"] > per_layer[3]["retrieval"]
    else:
        assert per_layer[0]["retrieval"] < grant["retrieval"]  # the concentrated layer gives pages away
        assert st.layer_factors is not None and st.layer_factors[0] == min(st.layer_factors)
    assert be.planner.layer_grant(p, 0) is per_layer[0]  # computed once per step
