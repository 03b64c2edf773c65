"""Tiers in a real server: cold pages of routed requests leave the device for host and disk, retrieval fetches them
back through the staging area, and nothing changes in what attention reads (``wait`` mode).

* outputs and their logprobs equal the same routed selection without tiers (keep mode, same budget);
* device KV bytes of the request stay <= budget + one page at 2K and 6K context, and device + host + disk account
  for the whole context's KV exactly;
* a budget >= context is exact (stock SGLang's tokens) with tiers on.
"""

from __future__ import annotations

import pytest
import requests

from sglang_mux.server_process import ServerProcess

from mux_test_support import SERVER_COMMON, mux_stats, word_ids

pytestmark = pytest.mark.server
BUDGET, PAGE = 256, 16
def run(srv, ids, n=24, **sp):
    body = {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **sp}}
    r = srv.generate(body)
    r.raise_for_status()
    j = r.json()
    return j["output_ids"], [lp[0] for lp in j["meta_info"]["output_token_logprobs"]]


@pytest.fixture(scope="module")
def keep_server():
    with ServerProcess(SERVER_COMMON + ["--mux-budget", str(BUDGET)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def tier_server(tmp_path_factory):
    disk = tmp_path_factory.mktemp("mux-disk")
    # a small host tier so that pages also spill to disk
    args = ["--mux-budget", str(BUDGET), "--mux-host-bytes", str(64 * PAGE * 2048),
            "--mux-disk-path", str(disk), "--mux-disk-bytes", str(1 << 30), "--mux-staging-pages", "8"]
    with ServerProcess(SERVER_COMMON + args) as srv:
        srv.disk = disk
        yield srv


def test_tiered_outputs_equal_keep_mode_routed(keep_server, tier_server, tokenizer):
    ids = word_ids(tokenizer, 3000, seed=11)
    want_ids, want_lp = run(keep_server, ids)
    got_ids, got_lp = run(tier_server, ids)
    assert got_ids == want_ids
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-4
    st = mux_stats(tier_server)
    assert st["demoted_pages"] > 0
    assert st["staging_waited"] > 0 and st["staging_skipped"] == 0
    assert st["tiers"]["host"]["kv_bytes"] >= 0 and "disk" in st["tiers"]


@pytest.mark.parametrize("n_tokens", [2048, 6144])
def test_device_bytes_bounded_and_tiers_account_for_the_rest(tier_server, tokenizer, n_tokens):
    run(tier_server, word_ids(tokenizer, n_tokens, seed=n_tokens), n=8)
    acc = mux_stats(tier_server)["last_tiered_request"]
    kvb = mux_stats(tier_server)["kv_bytes_per_token"]
    assert acc["context_tokens"] >= n_tokens
    assert acc["device_kv_bytes"] <= (BUDGET + PAGE) * kvb
    assert acc["device_kv_bytes"] + acc["host_kv_bytes"] + acc["disk_kv_bytes"] == acc["context_kv_bytes"]
    assert acc["staging_bytes"] <= 8 * PAGE * kvb


def test_budget_covering_context_is_exact_with_tiers(tier_server, stock_server, tokenizer):
    ids = word_ids(tokenizer, 700, seed=5)
    want = stock_server.greedy_ids(ids, 12)
    got = tier_server.greedy_ids(ids, 12, sampling_params={"custom_params": {"mux_budget": 2048}})
    assert got == want


def test_finished_tiered_prompt_is_reused_from_lower_tiers(tier_server, tokenizer):
    requests.post(tier_server.url + "/flush_cache", timeout=30)
    ids = word_ids(tokenizer, 2500, seed=21)
    first_ids, first_lp = run(tier_server, ids, n=8)
    body = {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    again = tier_server.generate(body).json()
    # the device kept only the prefix before the first demoted page; the rest came back from host/disk (all but
    # the observation window, which is always recomputed so that the routed output does not depend on caching)
    assert again["meta_info"]["cached_tokens"] >= len(ids) - 32 - 2 * PAGE
    assert again["output_ids"] == first_ids
    assert max(abs(a[0] - b) for a, b in zip(again["meta_info"]["output_token_logprobs"], first_lp)) < 1e-4
