"""Retraction in a real mux server on CPU (issue 40): a request SGLang retracts keeps its mux options.

When the KV pool runs out during decode, SGLang retracts running requests: it frees their KV and queues them
again, to be prefilled anew (prompt + the tokens generated so far). The pool here is small on purpose
(``POOL`` tokens, three requests of up to ``PROMPT + NEW`` tokens each), so three requests decoding together run
out of room and SGLang retracts one (``meta_info.num_retractions``). SGLang admits a request when its prompt plus
all its new tokens fit next to the running requests' estimated remaining tokens (a fraction of them, set by
``SGLANG_INIT_NEW_TOKEN_RATIO``; ``ignore_eos`` would count them all), and stops trying after a refusal until a
request finishes: so each request is sent once the one before it streams its first tokens, without ``ignore_eos`` (the seeds below decode
``NEW`` tokens without an end token; the test checks it).

Each request asks for its own ``mux_budget`` and ``mux_leaves`` (sink + recent window only: a routed step reads
a fixed set of pages, so the output is a function of the tokens alone), while the server's default budget is
larger than any context (exact attention). The budget is above every context length the pool lets a request
reach before a retraction (about POOL / 3), and below its final length: a request is exact before it could be
retracted and routed after. Its re-prefill recomputes exactly the KV it had, so its greedy tokens must equal
those of the same request served alone; had the retraction lost its options, its steps past the budget would be
exact (the server's default), not routed.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from mux_test_support import mux_stats, word_ids

from sglang_mux.server_process import ServerProcess

SEEDS, PROMPT, NEW = (4, 1, 0), 32, 320  # SGLang retracts the request with the fewest tokens out: the last
N_REQUESTS = len(SEEDS)
POOL = 704  # admits the three requests one by one; fills when each holds ~POOL / 3 tokens
BUDGET = 300  # above POOL / 3, below PROMPT + NEW: exact until retraction, routed after
OPTIONS = {"mux_budget": BUDGET, "mux_leaves": "sink=16,recent=16"}
def generate(srv, ids: list[int], custom_params: dict | None, full_length: bool = True) -> dict:
    sp = {"temperature": 0.0, "max_new_tokens": NEW}
    if custom_params is not None:
        sp["custom_params"] = custom_params
    r = srv.generate({"input_ids": ids, "sampling_params": sp}, timeout=600)
    r.raise_for_status()
    out = r.json()
    if full_length:
        assert len(out["output_ids"]) == NEW, "an end token came early: pick other seeds"
    return out


def generate_streamed(srv, ids: list[int], custom_params: dict, started: threading.Event) -> dict:
    """As :func:`generate`, streamed: ``started`` is set when the first tokens arrive (the request is running)."""
    sp = {"temperature": 0.0, "max_new_tokens": NEW, "custom_params": custom_params}
    last = None
    try:
        with requests.post(srv.url + "/generate", json={"input_ids": ids, "sampling_params": sp, "stream": True},
                           stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    last = json.loads(line[5:])
                    started.set()
    finally:
        started.set()
    assert last is not None and len(last["output_ids"]) == NEW, "an end token came early: pick other seeds"
    return last


def flush(srv) -> None:
    requests.post(srv.url + "/flush_cache", timeout=60).raise_for_status()


def test_readmit_hook_records_options_only_for_queued_requests(monkeypatch):
    """The hook on ``Req.reset_for_retract``: a request queued again gets its options back; one being aborted
    (``to_finish`` set) gets no state (nothing would release it); a request whose state was kept is left alone."""
    from types import SimpleNamespace

    from sglang_mux.router import hooks
    from sglang_mux.router.hooks import readmit_retracted_request
    from sglang_mux.memory.requests import RequestRegistry

    def req(rid, to_finish=None):
        sp = SimpleNamespace(custom_params={"mux_budget": 64, "mux_leaves": "sink=16,recent=16"})
        return SimpleNamespace(rid=rid, to_finish=to_finish, finished=lambda: False, sampling_params=sp)

    registry = RequestRegistry()
    monkeypatch.setattr(hooks, "REGISTRY", registry)
    readmit_retracted_request(None, req("queued"))
    readmit_retracted_request(None, req("aborted", to_finish=object()))
    registry.get("kept").dropped_pages.add(3)
    readmit_retracted_request(None, req("kept"))
    assert registry.peek("queued").options.budget == 64
    assert registry.peek("queued").options.leaves == "sink=16,recent=16"
    assert registry.peek("aborted") is None
    assert registry.peek("kept").dropped_pages == {3} and registry.peek("kept").options.budget is None
    assert registry.readmitted == 1


@pytest.fixture(scope="module")
def small_pool_server():
    args = [
        "--dtype", "float32", "--log-level", "warning",
        "--max-total-tokens", str(POOL), "--max-running-requests", "16",
        "--mux-budget", "4096", "--mux-page-size", "16",
    ]
    with ServerProcess(args, env={"SGLANG_INIT_NEW_TOKEN_RATIO": "0.3"}) as srv:
        yield srv


@pytest.mark.server
def test_retracted_request_keeps_its_options(small_pool_server, tokenizer):
    srv = small_pool_server
    prompts = [word_ids(tokenizer, PROMPT, seed) for seed in SEEDS]
    flush(srv)
    idle = mux_stats(srv)

    # Served one at a time: each fits the pool alone, no retraction.
    alone = []
    for ids in prompts:
        out = generate(srv, ids, OPTIONS)
        assert out["meta_info"]["num_retractions"] == 0
        alone.append(out["output_ids"])
    mid = mux_stats(srv)
    flush(srv)

    # The same requests decoding together: the pool runs out and SGLang retracts at least one.
    started = [threading.Event() for _ in prompts]

    def send(i: int) -> dict:
        if i:  # each admitted while the others decode (see the module docstring)
            assert started[i - 1].wait(300)
        return generate_streamed(srv, prompts[i], OPTIONS, started[i])

    with ThreadPoolExecutor(N_REQUESTS) as pool:
        together = list(pool.map(send, range(N_REQUESTS)))
    end = mux_stats(srv)
    retractions = [out["meta_info"]["num_retractions"] for out in together]
    assert sum(retractions) >= 1, f"no request was retracted: {retractions}"

    # Greedy tokens equal those served alone, retracted requests included.
    for i, (out, want) in enumerate(zip(together, alone)):
        assert out["output_ids"] == want, f"request {i} (retracted {retractions[i]}x) differs from its run alone"

    # Per-request evidence: every context past the request's own budget was routed, in both runs alike (a
    # retracted request re-served with the server's default budget would decode those steps exactly).
    routed_alone = mid["routed_request_steps"] - idle["routed_request_steps"]
    routed_together = end["routed_request_steps"] - mid["routed_request_steps"]
    assert routed_alone == N_REQUESTS * (PROMPT + NEW - 1 - BUDGET)
    assert routed_together == routed_alone
    assert end["retracted_requests"] - mid["retracted_requests"] == sum(retractions)

    # That equality can fail: served with the server's defaults (what a retraction used to leave a request
    # with), each retracted prompt gives other tokens than with its own options.
    flush(srv)
    for i in (i for i, n in enumerate(retractions) if n):
        assert generate(srv, prompts[i], None, full_length=False)["output_ids"] != alone[i]

    # Nothing a retraction freed stays held: no request state, no staging, every pool slot back once the cache
    # is flushed.
    flush(srv)
    after = mux_stats(srv)
    assert after["running_requests_tracked"] == 0
    assert after["staging_bytes"] == 0
    assert after["pool_free_tokens"] == idle["pool_free_tokens"]

