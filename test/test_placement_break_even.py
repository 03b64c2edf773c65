"""Where PD stops paying (router/placement.py ``aggregated_workers`` / ``pd_break_even``), on hand-computed cases."""

from __future__ import annotations

import pytest

from sglang_mux.router.placement import SLO, Load, PlacementPolicy, RecordedCosts


def costs(**kw):
    base = dict(prefill_fixed_ms=0.0, prefill_per_token_ms=1.0, decode_step_fixed_ms=10.0,
                decode_step_per_request_ms=0.0, transfer_fixed_ms=0.0, transfer_per_token_ms=0.0)
    base.update(kw)
    return RecordedCosts(**base)


# 11 requests over 10 s (1.1 req/s), prompt 100 tokens (100 ms of prefill each), 10 output tokens
TRACE = [(float(i), 100, 10) for i in range(11)]


def test_aggregated_workers_prefill_stalls_decode():
    # 1,100 ms of prefill in 10 s: u = 0.11 on one worker, TPOT = 10 / 0.89 = 11.24 ms
    pol = PlacementPolicy(costs(), SLO(ttft_ms=1e5, tpot_ms=12.5))
    one = pol.aggregated_workers(TRACE)
    assert one["workers"] == 1 and one["tpot_ms"] == pytest.approx(10 / 0.89)
    # 4x the rate: u = 0.44 on one worker -> 17.9 ms; two: 0.22 -> 12.82 ms; three: 0.1467 -> 11.72 ms <= 12.5
    fast = [(a / 4, n, m) for a, n, m in TRACE]
    three = pol.aggregated_workers(fast)
    assert three["workers"] == 3 and three["prefill_utilisation"] == pytest.approx(0.44 / 3)
    # an objective below one decode step: no aggregated deployment
    assert PlacementPolicy(costs(), SLO(1e5, 9.0)).aggregated_workers(TRACE)["feasible"] is False


def test_break_even_rate():
    """PD = 1 prefill (u <= 0.7) + 1 decode worker (decode is free of prefill and batches without limit here);
    aggregated needs prefill share x / N <= 0.2 (10 / (1 - x/N) <= 12.5), x = prefill seconds per second = 0.1 *
    rate: N = ceil(5x). PD pays when 2 < ceil(5x), i.e. x > 0.4: from 4 req/s. The trace runs at 1.1 req/s."""
    pol = PlacementPolicy(costs(), SLO(ttft_ms=1e5, tpot_ms=12.5))
    be = pol.pd_break_even(TRACE)
    assert (be["pd_workers"], be["aggregated_workers"], be["pd_pays"]) == (2, 1, False)
    assert be["trace_rate_rps"] == pytest.approx(1.1)
    assert 4.0 < be["pd_pays_from_rate_rps"] <= 4.0 * 1.0101
    # at 5 req/s (x = 0.5: aggregated 3 workers) PD pays
    at5 = pol.pd_break_even([(a * 1.1 / 5, n, m) for a, n, m in TRACE])
    assert (at5["pd_workers"], at5["aggregated_workers"], at5["pd_pays"]) == (2, 3, True)
    assert pol.stats.recommendation is None  # the comparison leaves the policy's last recommendation alone


def test_break_even_never_when_decode_is_not_slowed_by_prefill():
    # a loose objective: one aggregated worker always suffices until prefill alone fills it (u <= 0.7), and then
    # PD needs as many prefill workers plus a decode one
    be = PlacementPolicy(costs(), SLO(ttft_ms=1e5, tpot_ms=1e4)).pd_break_even(TRACE)
    assert be["pd_pays"] is False and be["pd_pays_from_rate_rps"] is None


def test_break_even_prompt_length():
    """One request, nothing else running, 10 output tokens, SLO 1000 ms / 20 ms, PD transfer 600 ms:
    aggregated slack = min(1 - (n + 10)/1000, 1 - (10 + n/10)/20) = 0.5 - n/200;
    PD slack = min(1 - (n + 610)/1000, 1 - 10/20) = 0.39 - n/1000;
    PD wins (by more than the 0.02 margin) when 0.39 - n/1000 > 0.52 - n/200, i.e. n > 32.5: from 33 tokens."""
    pol = PlacementPolicy(costs(transfer_fixed_ms=600.0), SLO(ttft_ms=1000, tpot_ms=20))
    be = pol.pd_break_even(TRACE)
    assert be["pd_pays_from_prompt_tokens"] == 33
    assert pol.decide(33, 10, Load()).path == "pd"
    assert pol.decide(32, 10, Load()).path == "aggregated"


def test_live_window_carries_the_break_even(tmp_path):
    """``/mux/stats`` ``placement`` (router/placement_live.py) carries ``pd_break_even`` for the finished window,
    the same as the policy computes for that trace."""
    import json

    from sglang_mux.config import MuxConfig
    from sglang_mux.router.placement import mux_device_kv
    from sglang_mux.router.placement_live import FinishedWindow

    c = costs()
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"costs": {k: getattr(c, k) for k in (
        "prefill_fixed_ms", "prefill_per_token_ms", "decode_step_fixed_ms", "decode_step_per_request_ms",
        "transfer_fixed_ms", "transfer_per_token_ms")}}))
    cfg = MuxConfig(budget=512, placement_costs=str(path), slo_tpot=12.5, slo_ttft=1e5)
    win = FinishedWindow()
    for t, n, m in TRACE:
        win.record(n, m, now=t)
    got = win.recommendation(cfg)["pd_break_even"]
    want = PlacementPolicy(c, SLO(1e5, 12.5)).pd_break_even(TRACE, device_kv_tokens_per_request=mux_device_kv(512))
    assert got == want and 4.0 < got["pd_pays_from_rate_rps"] <= 4.0 * 1.0101
