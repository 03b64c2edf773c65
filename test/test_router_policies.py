"""Router policies (router/spine.py, router/adaptive.py): hysteresis, budgets that sum to the grant, the trigger,
the fallback, the signals the planner measures, and a real server routing with the adaptive policy.

Oracles: hand-computed splits; the float64 attention over the selected pages (the bucket masses and the output);
counters of the page scorings the trigger saves.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import requests
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from test_routed_decode import HKV, HQ, D, make_backend, ref_attention

from sglang_mux.attention.routed_decode import page_positions
from sglang_mux.config import MuxConfig, MuxConfigError
from sglang_mux.memory.requests import RequestMemory, RequestRegistry
from sglang_mux.metrics import STATS
from sglang_mux.request_options import MuxRequestError, MuxRequestOptions, parse_request_options
from sglang_mux.router.adaptive import AdaptiveRouter, AdaptiveState, buckets, rescale
from sglang_mux.router.spine import MuxRouter, StaticSpineRouter, router_policies

BUCKETS = buckets()


def signal(num_layers: int = 2, **mass) -> list[list[float]]:
    """Per-layer bucket masses with the given values (others 0), the same at every layer."""
    row = [mass.get(b, 0.0) for b in BUCKETS]
    return [list(row) for _ in range(num_layers)]


def adaptive(**kw) -> tuple[AdaptiveRouter, RequestMemory, MuxConfig]:
    cfg = MuxConfig(budget=256, page_size=16, leaves="sink=16,recent=64,heavy=32,retrieval=rest", router="adaptive",
                    **kw)
    return AdaptiveRouter(cfg), RequestMemory(), cfg


def step(router, st, seq_len=4096, room=False, prefill=None, obs=None):
    d = router.decide(st, seq_len, room, lambda: prefill)
    if obs is not None:
        router.observe(st, obs, d.grant)
    return d


def test_registry_and_static_is_todays_split():
    assert set(router_policies()) >= {"static", "adaptive", "learned"}
    cfg = MuxConfig(budget=256, page_size=16)
    r = MuxRouter(cfg)
    assert r.policy(MuxRequestOptions()).name == "static"
    assert r.policy(MuxRequestOptions(router="adaptive")).name == "adaptive"
    st = RequestMemory()
    d = r.default.decide(st, 4096, False, lambda: None)
    assert d.refresh and d.layer_factors is None and d.grant == StaticSpineRouter(cfg).grant(4096, MuxRequestOptions())
    assert r.default.decide(st, 100, False, lambda: None).grant.exact


def test_bad_router_flags_and_fields_are_one_line_errors():
    with pytest.raises(MuxConfigError, match=r"^--mux-router: allowed: static, adaptive, learned; got 'smart'$"):
        MuxConfig(router="smart")
    for kw, flag in ((dict(router_ema=0.0), "--mux-router-ema"), (dict(router_hysteresis=1.5), "--mux-router-hysteresis"),
                     (dict(router_interval=0), "--mux-router-interval"), (dict(router_boost=0.5), "--mux-router-boost"),
                     (dict(router_trigger_mass=-1.0), "--mux-router-trigger-mass")):
        with pytest.raises(MuxConfigError, match=f"^{flag}: ") as e:
            MuxConfig(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(MuxRequestError, match=r"mux_router: allowed: static, adaptive, learned; got 'x'"):
        parse_request_options({"mux_router": "x"})
    assert parse_request_options({"mux_router": "adaptive"}).router == "adaptive"


def test_worked_example_of_the_docstring():
    static = {"recent": 4, "heavy": 2, "retrieval": 8}
    mass = {"recent": 0.05, "heavy": 0.30, "retrieval": 0.45}
    mean = sum(mass.values()) / sum(static.values())
    targets = {s: static[s] * (mass[s] / static[s] / mean) ** 0.5 for s in static}
    assert [round(targets[s], 1) for s in static] == [1.9, 3.2, 7.9]
    lo = {"recent": 1, "heavy": 0.5, "retrieval": 2}
    hi = {s: 3 * v for s, v in static.items()}
    assert rescale(static, targets, lo, hi) == {"recent": 2, "heavy": 3, "retrieval": 9}


def test_flipping_signal_never_changes_the_split():
    router, st, cfg = adaptive(router_interval=1, router_ema=1.0, router_hysteresis=0.0)
    before = STATS.router_split_changes
    first = step(router, st).grant
    for i in range(60):  # the mass jumps between the window and retrieval every step
        obs = signal(recent=0.9, retrieval=0.05) if i % 2 else signal(recent=0.05, retrieval=0.9)
        d = step(router, st, obs=obs)
        assert d.grant == first
    assert STATS.router_split_changes == before and st.router_state.pages is None


def test_steady_signal_moves_pages_after_two_agreeing_proposals():
    router, st, cfg = adaptive(router_interval=1, router_ema=1.0)
    static = step(router, st).grant
    obs = signal(sink=0.05, recent=0.05, heavy=0.1, retrieval=0.8)
    step(router, st, obs=obs)  # first proposal: pending
    assert st.router_state.pages is None
    d = step(router, st, obs=obs)  # second agrees: applied at the next decision
    d = step(router, st)
    g = d.grant
    assert g["retrieval"] > static["retrieval"] and g["recent"] < static["recent"]
    assert g["sink"] == static["sink"] and sum(g.pages.values()) == sum(static.pages.values())


def test_budgets_always_sum_to_the_grant_and_stay_in_bounds():
    rng = random.Random(0)
    for trial in range(20):
        budget = rng.choice([128, 256, 512, 1024])
        spec = rng.choice(["", "sink=16,recent=64,heavy=32,retrieval=rest", "sink=16,recent=32,chunk=64,retrieval=rest",
                           "sink=0,recent=16,heavy=rest"])
        cfg = MuxConfig(budget=budget, page_size=16, leaves=spec, router="adaptive", router_interval=rng.randint(1, 3),
                        router_ema=rng.uniform(0.2, 1.0), router_hysteresis=rng.uniform(0, 0.3))
        router, st = AdaptiveRouter(cfg), RequestMemory()
        static = router.grant(4 * budget, MuxRequestOptions()).pages
        total = sum(static.values())
        for _ in range(40):
            raw = [rng.random() ** 3 for _ in BUCKETS]
            s = sum(raw)
            d = step(router, st, seq_len=4 * budget, obs=[[x / s for x in raw]] * 3)
            g = d.grant.pages
            assert sum(g.values()) == total, (spec, g, static)
            assert g["sink"] == static["sink"]
            for share, v in g.items():
                if static.get(share, 0) == 0:
                    assert v == 0
                else:
                    assert static[share] * 0.25 - 1 <= v <= static[share] * 3
            assert g["recent"] >= 1
            f = d.layer_factors
            assert f is None or (len(f) == 3 and abs(sum(f) / 3 - 1) < 1e-6 and min(f) > 0)


def test_trigger_and_staleness():
    router, st, cfg = adaptive(router_trigger_mass=0.3, router_max_stale=3, router_ema=1.0)
    # the prefill said most attention stays in the hot pages: no refresh at first
    d = step(router, st, prefill=[0.1, 0.1])
    assert not d.refresh
    refreshes = [step(router, st, obs=signal(sink=0.5, recent=0.45, retrieval=0.05)).refresh for _ in range(8)]
    assert refreshes == [False, False, True, False, False, False, True, False]  # every 4th step (max stale 3)
    step(router, st, obs=signal(recent=0.3, retrieval=0.7))
    assert step(router, st).refresh  # mass left the hot pages: fires
    router, st, cfg = adaptive(router_trigger_mass=0.3)
    assert step(router, st, prefill=[0.9, 0.5]).refresh  # the prefill's mass outside the hot pages: fires at once
    assert step(router, st, prefill=None).refresh


def test_fallback_flags_once_and_boosts_only_with_room():
    router, st, cfg = adaptive(router_fail_mass=0.6, router_fail_steps=3, router_boost=2.0, router_ema=1.0)
    static = step(router, st).grant
    flagged = STATS.router_flagged_requests
    for _ in range(5):
        step(router, st, obs=signal(recent=0.1, retrieval=0.9))
    assert STATS.router_flagged_requests == flagged + 1 and st.router_state.flagged
    no_room = step(router, st, room=False).grant
    assert sum(no_room.pages.values()) == sum(static.pages.values())
    boosted = step(router, st, room=True).grant
    assert boosted["sink"] == static["sink"] and boosted["recent"] == no_room["recent"]
    assert boosted["retrieval"] == 2 * no_room["retrieval"] and boosted["heavy"] == 2 * no_room["heavy"]
    step(router, st, obs=signal(sink=0.5, recent=0.5))  # back under the threshold: no more boost
    assert step(router, st, room=True).grant == no_room


# ---------------------------------------------------------------------------------------------- through the backend
P, L = 8, 600


def backend_case(cfg: MuxConfig, seed: int = 0):
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=seed)
    be.registry = RequestRegistry()
    st = be.registry.get("r")
    st.protected_len, st.summarized = 0, True
    n = (L + P - 1) // P
    g = torch.Generator().manual_seed(50 + seed)
    st.scores(1, n, "cpu")[0, :n] = torch.rand(n, generator=g)
    fb = SimpleNamespace(rids=["r"], forward_mode=ForwardMode.DECODE, seq_lens_cpu=torch.tensor([L]),
                         seq_lens=torch.tensor([L]), req_pool_indices=torch.tensor([1]))
    return be, layer, kv, r2t, slots, st, fb, g


def decode_step(be, layer, kv, r2t, slots, st, fb, q):
    """Plan and attend one step; returns the pages the step read and checks the output against float64."""
    be._plan_step(fb)
    (p,) = be._plan
    pages, _, _ = be.planner.select(p, 0, q.view(HQ, D), r2t.req_to_token[1], layer.scaling)
    out = be._routed_decode(q, layer, be._plan)
    pos = page_positions(pages, L, P)
    want = ref_attention(q.view(HQ, D), kv.get_key_buffer(0)[slots[pos]], kv.get_value_buffer(0)[slots[pos]],
                         layer.scaling)
    torch.testing.assert_close(out.view(HQ, D).double(), want, rtol=1e-5, atol=1e-5)
    return p, pages


@pytest.mark.parametrize("trigger, scored", [(2.0, False), (0.0, True)], ids=["never", "always"])
def test_a_trigger_that_never_fires_costs_no_page_scoring(trigger, scored):
    cfg = MuxConfig(budget=96, page_size=P, leaves="sink=8,recent=16,heavy=16,retrieval=rest", router="adaptive",
                    router_trigger_mass=trigger, router_max_stale=0)
    be, layer, kv, r2t, slots, st, fb, g = backend_case(cfg)
    before, refresh, reuse = STATS.page_scorings, STATS.router_refresh_request_steps, STATS.router_reuse_request_steps
    steps = 5
    chosen, kept = [], []
    for _ in range(steps):
        p, pages = decode_step(be, layer, kv, r2t, slots, st, fb, torch.randn(1, HQ * D, generator=g))
        chosen.append(set(pages.tolist()))
        kept.append(be.planner._reused["r"][(0, "retrieval")][1].tolist())
    # each step plans once and the test's select + the backend's select both read layer 0
    assert STATS.page_scorings - before == (2 * steps if scored else 0)
    assert (STATS.router_refresh_request_steps - refresh, STATS.router_reuse_request_steps - reuse) == (
        (steps, 0) if scored else (0, steps))
    # every step reads retrieval's pages (those another leaf took are read anyway); without scoring they are the
    # heavy-ranked choice of the first step, kept step after step (heavy scores move with the attention paid)
    assert all(set(k) <= c for k, c in zip(kept, chosen)) and all(len(k) > 0 for k in kept)
    if not scored:
        assert all(k == kept[0] for k in kept)


def test_signals_are_the_attention_mass_of_each_bucket():
    cfg = MuxConfig(budget=96, page_size=P, leaves="sink=8,recent=16,heavy=16,retrieval=rest", router="adaptive",
                    router_ema=1.0)
    be, layer, kv, r2t, slots, st, fb, g = backend_case(cfg, seed=1)
    q = torch.randn(1, HQ * D, generator=g)
    be._plan_step(fb)
    (p,) = be._plan
    sel = be.planner.select(p, 0, q.view(HQ, D), r2t.req_to_token[1], layer.scaling)
    be._routed_decode(q, layer, be._plan)
    be.planner.hand_signals_to_router()  # what the next plan does first
    # float64 oracle: softmax over the selected tokens, mean over heads, summed per page and per bucket
    pos = page_positions(sel.pages, L, P)
    k = kv.get_key_buffer(0)[slots[pos]].double()
    qh = q.view(HKV, HQ // HKV, D).double()
    probs = torch.softmax(torch.einsum("hgd,nhd->hgn", qh, k) * layer.scaling, dim=-1).reshape(HQ, -1).mean(0)
    per_page = torch.zeros(sel.pages.numel(), dtype=torch.float64).index_add_(
        0, torch.searchsorted(sel.pages, pos // P), probs)
    want = torch.zeros(len(BUCKETS), dtype=torch.float64).index_add_(0, sel.buckets, per_page)
    got = torch.tensor([st.router_state.mass[b] for b in BUCKETS], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(got.sum()) - 1) < 1e-5
    n = (L + P - 1) // P
    assert sel.buckets[sel.pages < 1].eq(0).all() and sel.buckets[sel.pages >= n - 2].eq(1).all()
    assert set(sel.buckets.tolist()) <= {0, 1, BUCKETS.index("heavy"), BUCKETS.index("retrieval")}


def test_reused_pages_are_the_last_scored_ones():
    cfg = MuxConfig(budget=96, page_size=P, leaves="sink=8,recent=16,heavy=16,retrieval=rest", router="adaptive",
                    router_trigger_mass=0.0, router_max_stale=0, router_ema=1.0)
    be, layer, kv, r2t, slots, st, fb, g = backend_case(cfg, seed=2)
    q = torch.randn(1, HQ * D, generator=g)
    p, scored = decode_step(be, layer, kv, r2t, slots, st, fb, q)
    last_scored = be.planner._reused["r"][(0, "retrieval")][1].tolist()
    assert set(last_scored) <= set(scored.tolist()) and last_scored
    quiet = cfg.replace(router_trigger_mass=2.0)
    be.planner.router = MuxRouter(quiet)
    st.router_state = AdaptiveState(started=True, mass={"sink": 0.5, "recent": 0.5})
    before = STATS.page_scorings
    p, reused = decode_step(be, layer, kv, r2t, slots, st, fb, torch.randn(1, HQ * D, generator=g))
    assert STATS.page_scorings == before and not p.refresh
    # another query, retrieval's last scored choice: all read (those another leaf took now are read anyway)
    assert set(last_scored) <= set(reused.tolist()) and be.planner._reused["r"][(0, "retrieval")][1].tolist() == last_scored


# ---------------------------------------------------------------------------------------------- a real server
@pytest.mark.server
def test_server_routes_with_the_adaptive_policy(mux_server, tokenizer):
    words = "the blue river and green mountain under a quiet morning sky with old stone garden".split()
    rng = random.Random(3)
    ids = tokenizer(" ".join(rng.choice(words) for _ in range(1200)))["input_ids"][:1200]

    def stats():
        return requests.get(mux_server.url + "/mux/stats", timeout=30).json()["mux"]

    before = stats()
    params = {"custom_params": {"mux_budget": 256, "mux_router": "adaptive"}}
    out = mux_server.greedy_ids(ids, 24, sampling_params=params)
    again = mux_server.greedy_ids(ids, 24, sampling_params=params)
    after = stats()
    assert len(out) == 24 and out == again  # deterministic across runs
    observed = after["router_observed_request_steps"] - before["router_observed_request_steps"]
    decided = (after["router_refresh_request_steps"] + after["router_reuse_request_steps"]
               - before["router_refresh_request_steps"] - before["router_reuse_request_steps"])
    assert decided >= 2 * 20 and observed >= 2 * 20
    bad = requests.post(mux_server.url + "/generate", json={"input_ids": ids[:50], "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"mux_router": "smart"}}}, timeout=60)
    assert bad.status_code == 400 and "mux_router" in bad.text
