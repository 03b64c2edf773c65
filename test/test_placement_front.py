"""Live placement at the cluster entry (sglang_mux/disagg/placement_front.py), against two fake upstreams that
stream like SGLang's /generate and answer /v1/loads: an "aggregated" one whose TTFT is 1 ms per prompt token (its
prefill), and a "PD" one whose TTFT is that plus 300 ms (the transfer); both 5 ms per output token. SLO: TTFT
1000 ms, TPOT 50 ms; 4 output tokens. In the placement model a request's prefill stalls the aggregated decode
(aggregated TPOT = step + prefill / output tokens) while PD pays the transfer in its TTFT:

* 400 tokens: aggregated TPOT 5 + 400/4 = 105 ms (slack -1.1), PD TTFT 705 ms (slack 0.295): PD;
* 20 tokens: aggregated slack min(1 - 25/1000, 1 - 10/50) = 0.8, PD min(1 - 325/1000, 1 - 5/50) = 0.675: aggregated.

The prior costs (right about the transfer, wrong about prefill) say prefill is nearly free, so long prompts first go
aggregated; their measured TTFTs refit the prefill cost (about 1 ms per token), and from then on long prompts go to
PD, short ones stay aggregated. (With requests of one length the fit cannot split a cost into its fixed and
per-token parts; it puts a change on the per-token term, so here the prior carries the transfer's fixed part.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import requests
from fastapi import FastAPI, Request

from sglang_mux.disagg.placement_front import (
    OnlineCosts,
    PlacementFront,
    Upstreams,
    parse_loads,
)
from sglang_mux.router.placement import SLO, Load, RecordedCosts
from sglang_mux.server_process import free_port

PRIOR = RecordedCosts(prefill_fixed_ms=1.0, prefill_per_token_ms=0.001, decode_step_fixed_ms=5.0,
                      decode_step_per_request_ms=0.0, transfer_fixed_ms=300.0, transfer_per_token_ms=0.0)


def fake_upstream(ttft_ms, tpot_ms: float, loads: dict):
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    app.state.bodies = []

    @app.get("/v1/loads")
    async def v1_loads():
        return {"loads": [loads]}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        n, m = len(body["input_ids"]), body["sampling_params"]["max_new_tokens"]
        if not body.get("stream"):
            await asyncio.sleep((ttft_ms(n) + tpot_ms * (m - 1)) / 1000)
            return {"output_ids": [1] * m, "meta_info": {"completion_tokens": m}}

        async def events():
            await asyncio.sleep(ttft_ms(n) / 1000)
            for k in range(1, m + 1):
                if k > 1:
                    await asyncio.sleep(tpot_ms / 1000)
                yield b"data: " + json.dumps({"meta_info": {"completion_tokens": k}}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(app) -> str:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(url + "/v1/loads" if "loads" in str(app.routes) else url + "/health", timeout=1)
            return url
        except requests.RequestException:
            time.sleep(0.1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def cluster():
    agg = fake_upstream(lambda n: 1.0 * n, 5.0, {"num_running_reqs": 0, "num_waiting_uncached_tokens": 0})
    pd = fake_upstream(lambda n: 1.0 * n + 300.0, 5.0, {"num_running_reqs": 0, "num_waiting_uncached_tokens": 0})
    agg_url, pd_url = serve(agg), serve(pd)
    up = Upstreams(agg_url, pd_url, {"aggregated": [agg_url], "prefill": [pd_url], "decode": [pd_url]})
    front = PlacementFront(up, SLO(ttft_ms=1000, tpot_ms=50), PRIOR, prior_requests=1.0, poll_s=0.2)
    url = serve(front.app())
    return {"url": url, "front": front, "agg": agg, "pd": pd}


def stream(url: str, n: int, m: int = 4) -> str:
    body = {"input_ids": list(range(1, n + 1)), "sampling_params": {"max_new_tokens": m}, "stream": True,
            "custom_labels": {"mux_budget": "128"}}
    with requests.post(url + "/generate", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        lines = [line for line in r.iter_lines() if line.startswith(b"data:")]
        assert lines[-1] == b"data: [DONE]" and len(lines) == m + 1
        return r.headers["x-mux-placement"]


def test_costs_recalibrate_and_long_prompts_move_to_pd(cluster):
    url, front = cluster["url"], cluster["front"]
    first = stream(url, 400)
    assert first == "aggregated"  # the prior: 400 tokens of prefill cost 0.4 ms
    paths = [stream(url, 400) for _ in range(5)]
    assert paths[-1] == "pd" and paths.count("pd") >= 3, paths
    costs = front.costs.costs()
    assert 0.7 <= costs.prefill_per_token_ms <= 2.0, costs      # measured: 1 ms per token (+ machine noise)
    assert 250 <= costs.transfer(400) <= 1000, costs             # measured: 300 ms (+ machine noise)
    assert stream(url, 20) == "aggregated"                       # a short prompt still goes aggregated
    st = requests.get(url + "/placement/stats", timeout=10).json()
    assert st["decisions"]["pd"] >= 3 and st["decisions"]["aggregated"] >= 2
    assert st["costs"]["measured_requests"] == 7 and st["load_poll_errors"] == 0
    from prometheus_client.parser import text_string_to_metric_families

    scraped = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
               for fam in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text)
               for smp in fam.samples}
    assert scraped[("sglang_mux_placement_decisions_total", (("path", "pd"),))] == st["decisions"]["pd"]
    assert scraped[("sglang_mux_placement_decisions_total", (("path", "aggregated"),))] == st["decisions"]["aggregated"]
    assert scraped[("sglang_mux_placement_measured_requests_total", ())] == 7
    # the body went through unchanged (per-request mux fields in custom_labels included)
    assert cluster["pd"].state.bodies[-1]["custom_labels"] == {"mux_budget": "128"}


def test_non_streamed_requests_are_forwarded(cluster):
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
    r = requests.post(cluster["url"] + "/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["output_ids"] == [1, 1]
    assert r.headers["x-mux-placement"] == "aggregated"


@pytest.mark.parametrize("body, field", [
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
    ({"text": ["a", "b"]}, "text"),
])
def test_bad_request_is_a_400_naming_the_field(cluster, body, field):
    r = requests.post(cluster["url"] + "/generate", json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(field + ":"), r.text


def test_online_costs_fit_known_numbers():
    oc = OnlineCosts(PRIOR, prior_requests=0.001)
    for n in (100, 200, 400, 800):
        for _ in range(3):
            # aggregated: TTFT = 2 + 0.5 n + step(1) (5 ms); PD: TTFT = prefill + 30 + 0.01 n + step
            oc.observe("aggregated", n, Load(), 2 + 0.5 * n + 5, 5.0)
            oc.observe("pd", n, Load(), 2 + 0.5 * n + 30 + 0.01 * n + 5, 5.0)
    c = oc.costs()
    assert c.prefill_per_token_ms == pytest.approx(0.5, rel=0.02) and c.prefill_fixed_ms == pytest.approx(2, abs=0.5)
    assert c.transfer_fixed_ms == pytest.approx(30, abs=1) and c.transfer_per_token_ms == pytest.approx(0.01, abs=0.002)
    assert c.decode_step_fixed_ms == pytest.approx(5, rel=0.01)


def test_parse_loads_sums_dp_ranks():
    assert parse_loads({"loads": [{"num_running_reqs": 2, "num_waiting_uncached_tokens": 10},
                                  {"num_running_reqs": 1, "num_waiting_uncached_tokens": 5}]}) == (3, 15)
    assert parse_loads({"num_running_reqs": 4}) == (4, 0)


def test_cli_bad_flag_is_one_line(capsys):
    from sglang_mux.disagg.placement_front import main

    assert main(["--aggregated", "http://a", "--pd", "http://b", "--mux-slo-tpot", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mux-slo-tpot" in err[0]
