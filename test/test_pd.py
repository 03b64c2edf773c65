"""PD disaggregation with mux on: prefill + decode + sglang-router on CPU, KV over mooncake_tcp (docs/pd.md).

Oracles: stock SGLang and the aggregated mux server (the session fixtures of conftest.py), greedy, float32.
The PD servers run with ``--mux-budget 1024`` and the default leaf split (heavy hitters included: their scores
are taken at prefill and cross with SGLang's PD metadata, docs/pd.md); the aggregated oracle gets the same
budget per request.

* budget >= context (40 and 700 tokens): PD tokens == stock SGLang's, and the decode side ran exact;
* budget < context (1500 tokens: routed decode on the decode side, over page summaries the decode side rebuilt
  from the received KV, and heavy-hitter scores received from the prefill side; the decode side has a host tier,
  so the request's cold pages leave its device): PD tokens == the aggregated (untiered) mux server's, the decode
  side really routed, its heavy leaf chose pages and its host tier took the cold pages;
* sglang-router 0.3.2 drops ``sampling_params.custom_params`` (per-request mux fields) on the way: pinned here,
  so a router that carries them shows up; the PD servers themselves still reject a malformed mux field (400);
* a malformed or missing bootstrap field sent to a PD server is a 400 naming it;
* the decode server dies mid-transfer: the router answers that request with an error (no hang) and the
  prefill server frees the request's KV (pool free tokens back to the baseline, from /mux/stats).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import requests

from mux_test_support import SERVER_COMMON
from sglang_mux.disagg.cluster import PDCluster, mooncake_unavailable_reason

_why = mooncake_unavailable_reason()
pytestmark = [pytest.mark.server, pytest.mark.skipif(_why is not None, reason=_why or "")]

WORDS = "the blue river and green mountain under a quiet morning sky with old stone garden".split()
BUDGET = 1024  # default split at this budget: sink 64, recent 512, heavy 128, retrieval 320 tokens
PD_MUX = ["--mux-budget", str(BUDGET)]
# the decode side keeps a routed request's cold pages in its host tier (tiered mode), the prefill side none
DECODE_TIER = ["--mux-host-bytes", str(256 << 20)]
SAME_PER_REQUEST = {"mux_budget": BUDGET}
SINK_PAGES = 64 // 16
LENGTHS = {"short": 40, "long": 700, "routed": 1500}
NEW = 12
BOOTSTRAP_TIMEOUT_S = 20
FAULT_DEADLINE_S = 120


def prompt_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(n_tokens)))["input_ids"][:n_tokens]
    assert len(ids) == n_tokens
    return ids


def mux_stats(url: str) -> dict:
    r = requests.get(url + "/mux/stats", timeout=30)
    r.raise_for_status()
    return r.json()["mux"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return {name: prompt_ids(tokenizer, n, seed=11 + i) for i, (name, n) in enumerate(LENGTHS.items())}


@pytest.fixture(scope="module")
def oracle(prompts, mux_server, stock_server):
    """Aggregated outputs, taken before the PD servers start (fewer servers busy at once)."""
    out = {}
    for name, ids in prompts.items():
        out["stock", name] = stock_server.greedy_ids(ids, NEW)
        out["mux", name] = mux_server.greedy_ids(ids, NEW, sampling_params={"custom_params": SAME_PER_REQUEST})
    return out


@pytest.fixture(scope="module")
def pd(oracle):
    # A prefill request whose decode peer never connects fails after this many seconds (SGLang's default is
    # 300): the fault test's retried request must not outlive the test.
    env = {"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": str(BOOTSTRAP_TIMEOUT_S),
           "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(BOOTSTRAP_TIMEOUT_S)}
    with PDCluster(SERVER_COMMON + PD_MUX, decode_args=DECODE_TIER, env=env) as cluster:
        yield cluster


@pytest.mark.parametrize("name", ["short", "long"])
def test_pd_equals_stock_when_budget_covers_context(pd, prompts, oracle, name):
    assert oracle["mux", name] == oracle["stock", name]  # aggregated mux is exact here too
    before = mux_stats(pd.decode.url)
    assert pd.greedy_ids(prompts[name], NEW) == oracle["stock", name]
    after = mux_stats(pd.decode.url)
    assert after["routed_request_steps"] == before["routed_request_steps"]
    assert after["exact_request_steps"] >= before["exact_request_steps"] + NEW - 1


def test_pd_equals_aggregated_mux_when_routed(pd, prompts, oracle):
    before, sent = mux_stats(pd.decode.url), mux_stats(pd.prefill.url)["pd_heavy_scores_sent"]
    assert pd.greedy_ids(prompts["routed"], NEW) == oracle["mux", "routed"]
    after = mux_stats(pd.decode.url)
    # 1500 tokens > budget 1024: every decode step after the first is routed on the decode side
    assert after["routed_request_steps"] >= before["routed_request_steps"] + NEW - 1
    # the prefill's heavy-hitter scores crossed, and the decode side's heavy leaf used them (sinks + heavy pages)
    assert mux_stats(pd.prefill.url)["pd_heavy_scores_sent"] == sent + 1
    assert after["pd_heavy_scores_received"] == before["pd_heavy_scores_received"] + 1
    assert after["last_pages_by_leaf"]["sink_heavy"] > SINK_PAGES
    # tiered decode side: the request's cold pages left the device for the host tier (and came back when chosen)
    assert after["demoted_pages"] > before["demoted_pages"]


def test_router_drops_custom_params_known_limitation(pd, prompts):
    """sglang-router 0.3.2 re-serialises /generate without ``sampling_params.custom_params``: a per-request
    budget that would route this request does not reach the decode side. When this fails, the router carries
    the mux fields: turn it into an equality test with per-request options (docs/pd.md)."""
    before = mux_stats(pd.decode.url)["routed_request_steps"]
    pd.greedy_ids(prompts["long"], 4, sampling_params={"custom_params": {"mux_budget": 128}})
    assert mux_stats(pd.decode.url)["routed_request_steps"] == before


def test_pd_server_rejects_malformed_mux_field(pd, prompts):
    body = {"input_ids": prompts["short"], "sampling_params": {"max_new_tokens": 2, "custom_params": {"mux_budget": -5}},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port, "bootstrap_room": 99}
    for srv in (pd.prefill, pd.decode):
        r = requests.post(srv.url + "/generate", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert "mux_budget" in r.text


@pytest.mark.parametrize(
    "role, change, field",
    [
        ("prefill", {"bootstrap_room": "abc"}, "bootstrap_room"),
        ("prefill", {"bootstrap_room": -1}, "bootstrap_room"),
        ("decode", {"bootstrap_port": 0}, "bootstrap_port"),
        ("decode", {"bootstrap_host": ""}, "bootstrap_host"),
        ("prefill", {"bootstrap_host": None}, "bootstrap_host"),  # a PD server cannot pair a request without it
    ],
)
def test_malformed_bootstrap_field_is_400(pd, role, change, field):
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": pd.bootstrap_port, "bootstrap_room": 77, **change}
    srv = pd.prefill if role == "prefill" else pd.decode
    r = requests.post(srv.url + "/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.text  # SGLang's own schema check answers type errors first; ours names ranges/absence
    assert pd.greedy_ids([5, 6, 7], 2) == pd.greedy_ids([5, 6, 7], 2)  # the pair still serves


# ------------------------------------------------------------------ faults (last: this kills the decode server)
def _prefill_load(pd) -> dict:
    """SGLang's own load report of the prefill server (``/v1/loads``)."""
    r = requests.get(pd.prefill.url + "/v1/loads", timeout=30)
    r.raise_for_status()
    return r.json()["loads"][0]


def _holds_nothing(load: dict) -> bool:
    d = load["disaggregation"]
    return (
        load["num_used_tokens"] == 0  # KV held by requests (the radix cache's evictable pages not counted)
        and load["num_running_reqs"] == 0
        and load["num_waiting_reqs"] == 0
        and d["prefill_bootstrap_queue_reqs"] == 0
        and d["prefill_inflight_queue_reqs"] == 0
    )


def _send_in_background(pd, ids: list[int], result: dict) -> threading.Thread:
    def send():
        t0 = time.time()
        try:
            r = pd.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}, timeout=300)
            result["status"], result["body"] = r.status_code, r.text[:300]
        except requests.RequestException as e:
            result["status"], result["body"] = None, repr(e)
        result["seconds"] = time.time() - t0

    th = threading.Thread(target=send, daemon=True)
    th.start()
    return th


def test_decode_dies_mid_transfer_prefill_frees_kv_router_errors(pd):
    assert _holds_nothing(_prefill_load(pd))
    tracked = mux_stats(pd.prefill.url)["running_requests_tracked"]
    # Kill the decode server while the prefill has the request in its transfer ("inflight") queue: the decode
    # side pre-allocated the KV and handed over its destination, the bytes are on their way. 8K tokens (16 MB
    # over mooncake_tcp here) keep that window open long enough to see; if a request slips through before we
    # see it (on a loaded machine the poll below runs late), the next one (another prompt, and from the third
    # on a longer one: a longer transfer) tries again.
    killed = False
    for attempt, n_tokens in enumerate((8192, 8192, 16384, 16384, 24576)):
        result: dict = {}
        ids = [10 + (7 * i + attempt) % 480 for i in range(n_tokens)]
        th = _send_in_background(pd, ids, result)
        while th.is_alive():
            if _prefill_load(pd)["disaggregation"]["prefill_inflight_queue_reqs"] >= 1:
                os.killpg(pd.decode.proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        if killed:
            break
        th.join()
    assert killed, "never saw the request in the prefill's transfer queue: cannot test the fault"
    th.join(timeout=FAULT_DEADLINE_S)
    assert not th.is_alive(), f"the router did not answer in {FAULT_DEADLINE_S}s after the decode server died"
    assert result["status"] != 200, result  # an error, not a silent success
    # The prefill side released the request: no KV held by any request, no queue holds it, the mux registry
    # dropped its state (released through the cache), and the server still answers.
    deadline = time.time() + 60
    while time.time() < deadline and not _holds_nothing(_prefill_load(pd)):
        time.sleep(0.5)
    assert _holds_nothing(_prefill_load(pd)), _prefill_load(pd)
    assert requests.get(pd.prefill.url + "/health", timeout=30).status_code == 200
    leaked = mux_stats(pd.prefill.url)["running_requests_tracked"] - tracked
    if leaked > 0:
        # Seen on 2026-11-23: the mux request registry (memory/requests.py) drops a state only when the cache
        # releases the request; PD prefill requests aborted by the transfer/bootstrap failure (the router's
        # retries included) keep theirs. SGLang itself holds nothing (asserted above).
        pytest.xfail(f"mux registry keeps {leaked} states of aborted PD requests (released only via the cache)")
