"""SLO-aware admission on a real tiny-model server (serving/admission.py, docs/pd.md "SLO-aware admission").

* ``queue``: with a TPOT objective no batch of two can meet (0.001 ms), a short request sent while a long one
  decodes is held until the long one finished (without admission control it would finish long before it), is then
  served with the same tokens as alone, and the stats count it held;
* ``shrink``: with recorded costs as a dominant prior (a decode step costs 1 ms + 0.01 ms per KV token read) and a
  10 ms objective, a 1,500-token request arriving while a 300-token one decodes is admitted with the largest budget
  that fits, 592 tokens instead of 1,024 (hand-computed below), and decodes routed within it.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from mux_test_support import SERVER_COMMON, mux_stats, wait_for, word_ids
from sglang_mux.server_process import ServerProcess

pytestmark = pytest.mark.server

class Timed(threading.Thread):
    def __init__(self, srv, ids, n, **extra):
        super().__init__(daemon=True)
        self.srv, self.ids, self.n, self.extra = srv, ids, n, extra
        self.out = self.error = self.done_at = None

    def run(self):
        try:
            self.out = self.srv.greedy_ids(self.ids, self.n, **self.extra)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        self.done_at = time.monotonic()


@pytest.fixture(scope="module")
def queue_server():
    with ServerProcess(SERVER_COMMON + ["--mux-slo-policy", "queue", "--mux-slo-tpot", "0.001"]) as srv:
        yield srv


def test_queue_holds_a_request_until_the_batch_drains(queue_server, tokenizer):
    srv = queue_server
    short = word_ids(tokenizer, 30, seed=2)
    alone = srv.greedy_ids(short, 4)
    base = mux_stats(srv.url)
    long_req = Timed(srv, word_ids(tokenizer, 60, seed=1), 80)
    long_req.start()
    # the long request decodes and its steps are timed: the model can predict from now on
    wait_for(lambda: mux_stats(srv.url)["slo_step_samples"] >= base["slo_step_samples"] + 3, what="decode steps")
    short_req = Timed(srv, short, 4)
    short_req.start()
    long_req.join(300)
    short_req.join(300)
    assert long_req.error is None and short_req.error is None, (long_req.error, short_req.error)
    assert short_req.done_at > long_req.done_at  # held: 4 tokens finished after 80
    assert short_req.out == alone                 # and served as if alone
    after = mux_stats(srv.url)
    assert after["slo_deferred_requests"] == base["slo_deferred_requests"] + 1
    assert after["slo_deferred_steps"] > base["slo_deferred_steps"]
    assert after["slo_waiting_held"] == 0 and after["slo_shrunk_requests"] == 0
    model = after["slo_tpot_model"]
    assert model["samples"] == after["slo_step_samples"] and model["fixed_ms"] > 0


COSTS = {  # a decode step: 1 ms + 0.01 ms per KV token read (per_1k_kv_tokens 10.24 ms); the rest unused here
    "prefill_fixed_ms": 1.0, "prefill_per_token_ms": 0.01, "decode_step_fixed_ms": 1.0,
    "decode_step_per_request_ms": 0.0, "transfer_fixed_ms": 1.0, "transfer_per_token_ms": 0.0,
    "decode_step_per_context_token_ms": 0.01, "source": "test_slo_admission_server",
}


@pytest.fixture(scope="module")
def shrink_server(tmp_path_factory):
    costs = tmp_path_factory.mktemp("costs") / "costs.json"
    costs.write_text(json.dumps(COSTS))
    args = ["--mux-slo-policy", "shrink", "--mux-slo-tpot", "10", "--mux-budget", "1024",
            "--mux-placement-costs", str(costs), "--mux-slo-prior-steps", "1000000000"]
    with ServerProcess(SERVER_COMMON + args) as srv:
        yield srv


def test_shrink_admits_with_the_largest_budget_that_fits(shrink_server, tokenizer):
    srv = shrink_server
    base = mux_stats(srv.url)
    first = Timed(srv, word_ids(tokenizer, 300, seed=3), 60)
    first.start()
    wait_for(lambda: mux_stats(srv.url)["decode_steps"] > base["decode_steps"] + 2, what="the first request decoding")
    # running: 1 request reading ~300+ tokens: step(2, 300 + b) = 1 + 0.01 (300 + b) <= 10  ->  b <= 600 -> 592
    # (with the first request's context grown by the tokens it decoded so far, b is 592 minus those, rounded to 16)
    second = Timed(srv, word_ids(tokenizer, 1500, seed=4), 8)
    second.start()
    first.join(300)
    second.join(300)
    assert first.error is None and second.error is None, (first.error, second.error)
    after = mux_stats(srv.url)
    assert after["slo_shrunk_requests"] == base["slo_shrunk_requests"] + 1
    assert after["slo_deferred_requests"] == base["slo_deferred_requests"]
    assert after["routed_request_steps"] >= base["routed_request_steps"] + 7  # 1500 > the shrunk budget: routed
    shrunk_pages = after["max_pages_read"]
    assert shrunk_pages <= 592 // 16 + 1 < 1024 // 16  # it read within the shrunk budget, not the server's
