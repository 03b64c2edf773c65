"""Routed decode in a real mux server on CPU (issue: the multiplexed radix cache and routed decode).

* a per-request budget >= context gives stock SGLang's greedy tokens; a smaller one routes the request;
* a long request (16K tokens) decodes routed, reading <= budget / page_size + 1 pages per step, the same
  bound as at 4K (independent of context);
* in drop mode, the device KV a routed request holds stays <= budget + one page, while stock SGLang holds
  its whole context; only the exact prefix enters the radix tree;
* with --mux-placement-costs, /mux/stats carries the placement policy's worker recommendation for the
  requests the server finished;
* malformed per-request budgets get HTTP 400 naming the field, and the server keeps serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from sglang_mux.server_process import ServerProcess

from mux_test_support import SERVER_COMMON, mux_stats, word_ids

pytestmark = pytest.mark.server
COSTS = Path(__file__).resolve().parents[1] / "benchmark" / "results" / "pd_costs.json"
BUDGET, PAGE = 256, 16
@pytest.fixture(scope="module")
def routed_server():
    with ServerProcess(SERVER_COMMON + ["--mux-budget", str(BUDGET), "--mux-page-size", str(PAGE)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def drop_server():
    with ServerProcess(SERVER_COMMON + ["--mux-budget", str(BUDGET), "--mux-drop-cold", "--mux-placement-costs", str(COSTS)]) as srv:
        yield srv


def test_budget_at_least_context_equals_stock(routed_server, stock_server, tokenizer):
    ids = word_ids(tokenizer, 900, seed=1)
    want = stock_server.greedy_ids(ids, 16)
    before = mux_stats(routed_server)["exact_request_steps"]
    got = routed_server.greedy_ids(ids, 16, sampling_params={"custom_params": {"mux_budget": 4096}})
    assert got == want
    assert mux_stats(routed_server)["exact_request_steps"] >= before + 15


def test_small_budget_routes_the_request(routed_server, tokenizer):
    ids = word_ids(tokenizer, 900, seed=2)
    before = mux_stats(routed_server)["routed_request_steps"]
    out = routed_server.greedy_ids(ids, 12)
    assert len(out) == 12
    st = mux_stats(routed_server)
    assert st["routed_request_steps"] >= before + 11
    assert 0 < st["max_pages_read"] <= BUDGET // PAGE + 1


@pytest.mark.parametrize("n_tokens", [4096, 16384])
def test_long_request_pages_read_independent_of_context(routed_server, tokenizer, n_tokens):
    ids = word_ids(tokenizer, n_tokens, seed=3)
    assert len(ids) == n_tokens
    out = routed_server.greedy_ids(ids, 6)
    assert len(out) == 6
    st = mux_stats(routed_server)
    assert st["last_routed_requests"] == 1 and st["last_max_context_tokens"] >= n_tokens
    assert st["last_max_pages_read"] <= BUDGET // PAGE + 1
    assert sum(st["last_pages_by_leaf"].values()) == st["last_max_pages_read"]


@pytest.mark.parametrize(
    "field_value",
    [-5, 0, "lots", 1.5, True, 10**9],
)
def test_bad_per_request_budget_is_400_and_server_keeps_serving(routed_server, tokenizer, field_value):
    ids = word_ids(tokenizer, 50, 0)
    ref = routed_server.greedy_ids(ids, 4)
    r = routed_server.generate(
        {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "custom_params": {"mux_budget": field_value}}}
    )
    assert r.status_code == 400, r.text
    assert "mux_budget" in r.text
    assert routed_server.greedy_ids(ids, 4) == ref


def test_bad_leaf_spec_is_400(routed_server):
    r = routed_server.generate(
        {"text": "hello", "sampling_params": {"max_new_tokens": 2, "custom_params": {"mux_leaves": "sink=1,bogus=2"}}}
    )
    assert r.status_code == 400 and "mux_leaves" in r.text


def test_drop_mode_holds_at_most_budget_plus_a_page(drop_server, stock_server, tokenizer):
    requests.post(drop_server.url + "/flush_cache", timeout=30)
    ids = word_ids(tokenizer, 6000, seed=4)
    out = drop_server.greedy_ids(ids, 40)
    assert len(out) == 40
    st = mux_stats(drop_server)
    assert st["dropped_tokens"] > 0
    # what the request held on the device during routed decode
    assert 0 < st["max_routed_kv_tokens_held"] <= BUDGET + PAGE
    # stock holds the whole context (6000 + 40 tokens) for the same request: the contrast the mode is for
    assert len(ids) + 40 > 20 * (BUDGET + PAGE)
    # only the exact prefix went into the tree: a repeat hits at most the pages before the first dropped one
    again = drop_server.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}).json()
    assert again["meta_info"]["cached_tokens"] < len(ids) // 2
    # nothing leaked: after a flush the pool is as free as at start
    requests.post(drop_server.url + "/flush_cache", timeout=30)
    free_after = mux_stats(drop_server)["pool_free_tokens"]
    assert free_after > 0


def test_stats_carry_the_placement_recommendation(drop_server, tokenizer):
    before = mux_stats(drop_server)["placement"]["window_requests"]
    for seed in (21, 22):
        assert len(drop_server.greedy_ids(word_ids(tokenizer, 900, seed=seed), 8)) == 8
    pl = mux_stats(drop_server)["placement"]
    assert pl["window_requests"] == before + 2
    assert (pl["slo_ttft_ms"], pl["slo_tpot_ms"], pl["costs"]) == (2000.0, 200.0, str(COSTS))
    rec = pl["recommendation"]
    # drop mode, budget 256, no tiers (no staging): a request holds at most 256 + 16 device tokens
    assert rec["device_kv_tokens_per_request"] == min(908, BUDGET + PAGE)
    assert rec["feasible"] and rec["ratio"] == f"{rec['prefill_workers']}:{rec['decode_workers']}"
    assert rec["prefill_workers"] >= 1 and rec["decode_workers"] >= 1
