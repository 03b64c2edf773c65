"""Per-request mux fields through sglang-router in PD (serving/label_options.py, docs/pd.md).

sglang-router 0.3.2 drops ``sampling_params.custom_params``; it forwards ``custom_labels`` unchanged to both PD
roles, and each server moves the ``mux_*`` labels into ``custom_params``. On a PD cluster (budget 1024, mux on in
both roles) behind the router:

* a 700-token request with ``custom_labels: {"mux_budget": "128"}`` decodes routed on the decode side (its context
  fits the server's budget, so only the request's own budget routes it), and both servers' stats show the field;
* the same request with ``custom_params`` sent to the router arrives without it (the router's limitation, pinned so
  a router that carries it shows up);
* a malformed label is a 400 naming the field, through the router.
"""

from __future__ import annotations

import random

import pytest
import requests

from mux_test_support import SERVER_COMMON
from sglang_mux.disagg.cluster import PDCluster, mooncake_unavailable_reason

_why = mooncake_unavailable_reason()
pytestmark = [pytest.mark.server, pytest.mark.skipif(_why is not None, reason=_why or "")]

WORDS = "the blue river and green mountain under a quiet morning sky with old stone garden".split()
NEW = 8


def mux_stats(url: str) -> dict:
    r = requests.get(url + "/mux/stats", timeout=30)
    r.raise_for_status()
    return r.json()["mux"]


@pytest.fixture(scope="module")
def pd():
    env = {"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "20", "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "20"}
    with PDCluster(SERVER_COMMON + ["--mux-budget", "1024"], env=env) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def prompt(tokenizer):
    rng = random.Random(7)
    ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(700)))["input_ids"][:700]
    assert len(ids) == 700
    return ids


def test_budget_in_custom_labels_reaches_prefill_and_decode(pd, prompt):
    before = {role: mux_stats(srv.url) for role, srv in (("prefill", pd.prefill), ("decode", pd.decode))}
    out = pd.greedy_ids(prompt, NEW, custom_labels={"mux_budget": "128"})
    assert len(out) == NEW
    after = {role: mux_stats(srv.url) for role, srv in (("prefill", pd.prefill), ("decode", pd.decode))}
    for role in ("prefill", "decode"):
        assert after[role]["requests_with_mux_options"] == before[role]["requests_with_mux_options"] + 1, role
        assert after[role]["last_request_mux_options"] == {"mux_budget": 128}, role
    # 700 tokens fit the servers' budget (1024): only the request's own 128 routes it on the decode side
    assert after["decode"]["routed_request_steps"] >= before["decode"]["routed_request_steps"] + NEW - 1
    assert after["decode"]["last_max_pages_read"] <= 128 // 16 + 1


def test_custom_params_through_the_router_are_still_dropped(pd, prompt):
    before = mux_stats(pd.decode.url)
    pd.greedy_ids(prompt, 4, sampling_params={"custom_params": {"mux_budget": 128}})
    after = mux_stats(pd.decode.url)
    assert after["requests_with_mux_options"] == before["requests_with_mux_options"]
    assert after["routed_request_steps"] == before["routed_request_steps"]


def test_malformed_label_is_a_400_naming_it_through_the_router(pd, prompt):
    body = {"input_ids": prompt[:20], "sampling_params": {"max_new_tokens": 2}, "custom_labels": {"mux_budget": "-5"}}
    r = requests.post(pd.url + "/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "mux_budget" in r.text
    r = requests.post(pd.url + "/generate", json={**body, "custom_labels": {"mux_bugdet": "5"}}, timeout=60)
    assert r.status_code == 400 and "custom_labels.mux_bugdet" in r.text, r.text
