"""Route or not: one rule (router/route_rule.py), and the radix cache and the attention backend both apply it to
the request's own budget (no server).

Before the rule was shared, the cache decided with the server's ``--mux-budget`` while the backend used the
request's ``mux_budget``: a long-enough prompt with a small budget of its own was scored for heavy hitters by the
backend, but took its observation window from the cache, so its routed output depended on what was cached.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cpu_pools import kv_pool, mux_radix_cache, req_to_token_pool
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from sglang_mux.attention.backend import MuxAttentionBackend
from sglang_mux.config import MuxConfig
from sglang_mux.memory.radix_cache import MuxRadixCache
from sglang_mux.router.grant import grant_for
from sglang_mux.memory.requests import REGISTRY
from sglang_mux.router.route_rule import may_route, routes_now, scores_heavy_hitters

P = 4
SERVER = MuxConfig(budget=4096, page_size=P, leaves="sink=4,recent=8,heavy=8,retrieval=rest", observation_window=16)
PROMPT = 200  # > 64 // 2 (a request budget of 64 may route it), <= 4096 // 2 (the server's may not)


def test_worked_example():
    assert [routes_now(L, 1024) for L in (512, 513, 1024, 1025)] == [False, False, False, True]
    assert [may_route(L, 1024) for L in (512, 513, 1024, 1025)] == [False, True, True, True]
    assert not may_route(10**6, 1024, exact=True) and not routes_now(10**6, 1024, exact=True)


def test_heavy_hitters_need_a_heavy_leaf_and_a_routable_request():
    assert scores_heavy_hitters(513, 1024, heavy_tokens=8)
    assert not scores_heavy_hitters(513, 1024, heavy_tokens=0)
    assert not scores_heavy_hitters(512, 1024, heavy_tokens=8)
    assert not scores_heavy_hitters(513, 1024, heavy_tokens=8, exact=True)


def test_the_budget_of_the_request_decides():
    # the same prompt, two budgets: only the budget passed in decides
    assert scores_heavy_hitters(PROMPT, 64, heavy_tokens=8)
    assert not scores_heavy_hitters(PROMPT, 4096, heavy_tokens=8)


@pytest.mark.parametrize("exact", [False, True])
def test_grant_routes_exactly_when_the_rule_says(exact):
    split = {"sink": 16, "recent": 32, "heavy": 16, "retrieval": 64}
    for L in range(1, 400, 7):
        assert (not grant_for(L, 128, 16, split, force_exact=exact).exact) == routes_now(L, 128, exact)


# ------------------------------------------------------------------ the cache and the backend agree
def cache_holding(tokens: list[int]) -> MuxRadixCache:
    _, alloc, cache = mux_radix_cache(1024, P, mux_config=SERVER)
    cache.insert(InsertParams(key=RadixKey(tokens), value=alloc.alloc(len(tokens)).long()))
    return cache


def backend() -> MuxAttentionBackend:
    kv = kv_pool(256, P, 2, 4)
    r2t = req_to_token_pool(2, 256)
    return MuxAttentionBackend(SimpleNamespace(req_to_token_pool=r2t, token_to_kv_pool=kv), None, SERVER)


@pytest.fixture
def admitted():
    rids = []

    def admit(rid: str, custom_params=None):
        REGISTRY.admit(rid, custom_params)
        rids.append(rid)
        return SimpleNamespace(rid=rid)

    yield admit
    for rid in rids:
        REGISTRY.release(rid)


@pytest.mark.parametrize(
    "custom_params, routable",
    [({"mux_budget": 64}, True), (None, False), ({"mux_budget": 64, "mux_exact": True}, False)],
)
def test_cache_and_backend_decide_with_the_requests_budget(admitted, custom_params, routable):
    tokens = list(range(1000, 1000 + PROMPT))
    req = admitted(f"route-rule-{custom_params}", custom_params)
    matched = cache_holding(tokens).match_prefix(MatchPrefixParams(key=RadixKey(tokens), req=req)).device_prefix_len
    # a routable prompt recomputes its observation window (its last 16 tokens), whatever the cache holds
    assert matched == (PROMPT - 16 if routable else PROMPT)
    assert backend().planner.wants_heavy_scores(req.rid, PROMPT) is routable


def test_without_a_request_the_cache_uses_the_servers_budget():
    tokens = list(range(PROMPT))
    assert cache_holding(tokens).match_prefix(MatchPrefixParams(key=RadixKey(tokens))).device_prefix_len == PROMPT
