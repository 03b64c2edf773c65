"""Routed decode on CPU against float64 oracles, on real SGLang pools (no server).

* ``attend`` over any random selection == float64 attention restricted to the selected positions.
* The backend's routed step (leaf selection + attention) == float64 reference over the pages it chose, and the
  choice obeys the grant: tail page, sinks and window always read, total <= budget / P + 1, the page holding a
  planted "needle" key found by retrieval.
* A request whose context fits its budget is attended exactly (== float64 full attention).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cpu_pools import kv_pool, req_to_token_pool
from mux_kernels.reference import routed_decode as ref_routed_decode
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_mux.attention.backend import MuxAttentionBackend
from sglang_mux.attention.step_planner import RequestPlan
from sglang_mux.attention.routed_decode import (
    attend,
    combine_head_bounds,
    grouped_quest_page_scores,
    page_positions,
    quest_page_scores,
    quest_page_scores_head_major,
)
from sglang_mux.config import MuxConfig
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.memory.requests import RequestMemory, RequestRegistry
from sglang_mux.router.spine import StaticSpineRouter

HQ, HKV, D = 4, 2, 16


def ref_attention(q, k, v, scale):
    g = q.shape[0] // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q.double(), kk) * scale, dim=-1)
    return torch.einsum("ht,thd->hd", p, vv)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("seed", range(5))
def test_attend_equals_float64_on_random_selections(dtype, tol, seed):
    g = torch.Generator().manual_seed(seed)
    L = 200
    k = torch.randn(L, HKV, D, generator=g).to(dtype)
    v = torch.randn(L, HKV, D, generator=g).to(dtype)
    q = torch.randn(HQ, D, generator=g).to(dtype)
    sel = torch.randperm(L, generator=g)[: int(torch.randint(1, L, (1,), generator=g))].sort().values
    out, probs = attend(q, k[sel], v[sel], 0.25)
    ref = ref_attention(q, k[sel], v[sel], 0.25)
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)
    assert torch.allclose(probs.sum(-1), torch.ones(HQ), atol=1e-5)


def test_quest_score_bounds_every_key_in_the_page():
    g = torch.Generator().manual_seed(1)
    P, n = 8, 12
    keys = torch.randn(n * P, HKV, D, generator=g)
    q = torch.randn(HQ, D, generator=g)
    kp = keys.view(n, P, HKV, D)
    scores = quest_page_scores(q, kp.amin(1), kp.amax(1))
    exact = torch.einsum("hd,nphd->nph", q, kp.repeat_interleave(HQ // HKV, dim=2)).amax(dim=(1, 2))
    assert torch.all(scores >= exact - 1e-5)


def make_backend(cfg: MuxConfig, L: int, seed: int = 0, *, hq: int = HQ, hkv: int = HKV, d: int = D):
    """A mux backend (no wrapped backend) over a one-layer float32 SGLang pool holding one request of ``L``
    random tokens in req_to_token row 1, its page summaries built; ``hq`` / ``hkv`` / ``d`` are the head shapes.
    Returns (backend, layer, kv pool, req_to_token pool, the request's slots)."""
    P = cfg.page_size
    g = torch.Generator().manual_seed(seed)
    kv = kv_pool(4096, P, hkv, d)
    r2t = req_to_token_pool(4, 4096)
    # page-aligned slots, scattered pages (as a paged allocator hands them out)
    pages = torch.randperm(4096 // P - 1, generator=g)[: (L + P - 1) // P] + 1
    slots = (pages.view(-1, 1) * P + torch.arange(P)).flatten()[:L]
    r2t.req_to_token[1, :L] = slots.to(torch.int32)
    kv.get_key_buffer(0)[slots] = torch.randn(L, hkv, d, generator=g)
    kv.get_value_buffer(0)[slots] = torch.randn(L, hkv, d, generator=g)
    runner = SimpleNamespace(req_to_token_pool=r2t, token_to_kv_pool=kv)
    be = MuxAttentionBackend(runner, inner=None, mux_config=cfg)
    be.summaries.rebuild_from_keys(0, r2t.req_to_token[1], 0, L)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d,
                            scaling=d**-0.5, is_cross_attention=False)
    return be, layer, kv, r2t, slots


def decode_request(be, L: int, seed: int):
    """Request "r" of ``L`` tokens in req_to_token row 1, in a fresh registry of ``be``: it owns every page (no shared
    prefix), its summaries are built, its heavy-hitter scores random (as a prefill leaves them). Returns its state,
    a decode batch of it alone and the generator that drew the scores (seeded with ``seed``)."""
    be.registry = RequestRegistry()
    st = be.registry.get("r")
    st.protected_len, st.summarized = 0, True
    n = (L + be.page_size - 1) // be.page_size
    g = torch.Generator().manual_seed(seed)
    st.scores(1, n, "cpu")[0, :n] = torch.rand(n, generator=g)
    fb = SimpleNamespace(rids=["r"], forward_mode=ForwardMode.DECODE, seq_lens_cpu=torch.tensor([L]),
                         seq_lens=torch.tensor([L]), req_pool_indices=torch.tensor([1]))
    return st, fb, g


def test_routed_step_matches_reference_and_obeys_grant():
    cfg = MuxConfig(budget=128, page_size=8, leaves="sink=16,recent=32,heavy=16,retrieval=rest")
    L = 1003
    be, layer, kv, r2t, slots = make_backend(cfg, L)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(5))
    # plant a needle: page 40's keys align with q, so retrieval must find it
    needle = slots[40 * 8 : 41 * 8]
    kv.get_key_buffer(0)[needle] = 3.0 * q[0].view(HKV, HQ // HKV, D).mean(1)
    be.summaries.rebuild_from_keys(0, r2t.req_to_token[1], 40 * 8, 41 * 8)
    st = RequestMemory()
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    plan = [RequestPlan("r", 1, L, grant, st)]
    pages, by_leaf, *_ = be.planner.select(plan[0], 0, q[0], r2t.req_to_token[1])
    n_pages = (L + 7) // 8
    assert pages.tolist() == sorted(set(pages.tolist()))
    assert pages.numel() <= cfg.budget // 8 + 1
    assert {0, 1} <= set(pages.tolist())  # sinks
    assert set(range(n_pages - 4, n_pages)) <= set(pages.tolist())  # window incl. the tail page
    assert 40 in pages.tolist()  # retrieval found the needle
    assert by_leaf["retrieval"] == grant["retrieval"]
    out = be._routed_decode(q.reshape(1, -1), layer, plan)
    ref = ref_routed_decode(q, kv.get_key_buffer(0), kv.get_value_buffer(0), r2t.req_to_token, torch.tensor([1]),
                            torch.tensor([L]), pages.view(1, -1), torch.tensor([pages.numel()]), 8, layer.scaling)
    assert torch.allclose(out.view(1, HQ, D).double(), ref, rtol=1e-5, atol=1e-5)


def test_request_that_fits_its_budget_is_exact():
    cfg = MuxConfig(budget=2048, page_size=8)
    L = 300
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=3)
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    assert grant.exact
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(9))
    out = be._routed_decode(q.reshape(1, -1), layer, [RequestPlan("r", 1, L, grant, RequestMemory())])
    ref = ref_attention(q[0], kv.get_key_buffer(0)[slots], kv.get_value_buffer(0)[slots], layer.scaling)
    assert torch.allclose(out.view(HQ, D).double(), ref, rtol=1e-5, atol=1e-5)


def test_heavy_hitters_come_from_scores():
    cfg = MuxConfig(budget=64, page_size=8, leaves="sink=8,recent=8,heavy=16,retrieval=rest")
    L = 400
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=4)
    st = RequestMemory()
    table = st.scores(1, (L + 7) // 8, "cpu")
    table[0, 17], table[0, 23] = 5.0, 4.0
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    pages, by_leaf, *_ = be.planner.select(RequestPlan("r", 1, L, grant, st), 0, torch.zeros(HQ, D),
                                           r2t.req_to_token[1])
    assert by_leaf["sink_heavy"] == 1 + 2 and {0, 17, 23} <= set(pages.tolist())


def test_page_positions_worked_example():
    assert page_positions(torch.tensor([0, 2]), 10, 4).tolist() == [0, 1, 2, 3, 8, 9]


def test_a_failing_request_is_marked_and_the_batch_goes_on():
    cfg = MuxConfig(budget=64, page_size=8)
    L = 300
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=6)
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    good, bad = RequestMemory(), RequestMemory()
    bad.demoted = {5: ("gone", 5)}  # a page said to be off the device, with no tier behind it
    q = torch.randn(2, HQ * D, generator=torch.Generator().manual_seed(1))
    plan = [RequestPlan("bad", 1, L, grant, bad), RequestPlan("good", 1, L, grant, good)]
    out = be._routed_decode(q, layer, plan)
    assert bad.error is not None and "bad" not in (good.error or "")
    assert torch.all(out[0] == 0) and torch.isfinite(out[1]).all() and out[1].abs().sum() > 0


@pytest.mark.parametrize("mode", ["wait", "skip"])
def test_demoted_pages_are_read_through_staging(mode):
    """Tiered routed step: demoted pages give the same attention as resident ones (wait), or are left out this step
    and fetched in the background (skip), and then served from staging."""
    import time

    from sglang_mux.memory.staging import StagingArea
    from sglang_mux.memory.tiers import TierManager
    from sglang_mux.metrics import STATS

    cfg = MuxConfig(budget=64, page_size=8, leaves="sink=8,recent=8,retrieval=rest", host_bytes=1 << 20,
                    missing_page=mode)
    L = 400
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=7)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(2))
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    ref_state = RequestMemory()
    pages, *_ = be.planner.select(RequestPlan("r", 1, L, grant, ref_state), 0, q[0], r2t.req_to_token[1])
    want = be._routed_decode(q.reshape(1, -1), layer, [RequestPlan("r", 1, L, grant, ref_state)])

    # demote every chosen retrieval page by hand (what ColdPageMover.demote does), then poison its device slots
    be.cold.tiers = be.tiers = TierManager(host_bytes=1 << 20)
    st = RequestMemory()
    st.staging = StagingArea(8, "cpu")
    retrieved = [int(x) for x in pages.tolist() if 1 <= x < (L // 8) - 1]
    be.cold._grow_cold_summaries(st, (L + 7) // 8, "cpu")
    for page in retrieved:
        s = slots[page * 8 : (page + 1) * 8]
        rec = torch.stack([torch.stack([kv.get_key_buffer(0)[s], kv.get_value_buffer(0)[s]])])
        be.tiers.demote(("r", page), rec)
        st.demoted[page] = ("r", page)
        kmin, kmax = be.summaries.get(0, s[:1])
        st.cold_kmin[0, page], st.cold_kmax[0, page] = kmin[0], kmax[0]
        kv.get_key_buffer(0)[s] = 1e3  # the device page is reused by someone else
    plan = [RequestPlan("r", 1, L, grant, st)]
    before = (STATS.staging_waited, STATS.staging_skipped)
    got = be._routed_decode(q.reshape(1, -1), layer, plan)
    if mode == "wait":
        assert torch.allclose(got, want, atol=1e-5) and STATS.staging_waited > before[0]
    else:
        assert STATS.staging_skipped >= before[1] + len(retrieved)
        deadline = time.time() + 10
        while len(st.staging) < len(retrieved) and time.time() < deadline:
            time.sleep(0.05)
        again = be._routed_decode(q.reshape(1, -1), layer, plan)
        assert torch.allclose(again, want, atol=1e-5)


@pytest.mark.parametrize("group_pages", [1, 4])
@pytest.mark.parametrize("rule", ["mass", "bound"])
def test_summary_cache_chooses_what_the_pool_gather_chooses_step_after_step(group_pages, rule):
    """Keep mode scores completed pages from the request's contiguous summary cache (appended as pages fill);
    drop and tier modes gather them from the pool. Over 40 decode steps with new keys written as the backend
    writes them, every layer's page choice and every Quest score must be the same in both, flat and two-level
    (groups of 4 pages: steps that complete a page and a group included)."""
    cfg = MuxConfig(budget=64, page_size=8, leaves="sink=8,recent=16,retrieval=rest", retrieval_group_pages=group_pages,
                    retrieval_score=rule)
    L0 = 500
    be, layer, kv, r2t, slots = make_backend(cfg, L0 + 40, seed=11)
    row = r2t.req_to_token[1]
    cached, gathered = RequestMemory(), RequestMemory()
    g = torch.Generator().manual_seed(12)
    be.summaries.rebuild_from_keys(0, row, 0, L0)
    for L in range(L0 + 1, L0 + 41):
        # the step's token: its key is in the pool before attention, its summary is folded in after it
        kv.get_key_buffer(0)[slots[L - 1]] = 5 * torch.randn(HKV, D, generator=g)
        grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
        q = torch.randn(HQ, D, generator=g)
        a = be.planner.select(RequestPlan("a", 1, L, grant, cached), 0, q, row)
        scores_a = be.planner.page_scores(RequestPlan("a", 1, L, grant, cached), 0, q, row)
        be.planner.uses_summary_cache = lambda p: False
        b = be.planner.select(RequestPlan("b", 1, L, grant, gathered), 0, q, row)
        scores_b = be.planner.page_scores(RequestPlan("b", 1, L, grant, gathered), 0, q, row)
        del be.planner.uses_summary_cache
        assert torch.equal(a[0], b[0]) and a[1] == b[1], L
        # the page holding this step's token is stale in both (folded in after attention) and always read
        # by the recent leaf; every completed page must score the same
        torch.testing.assert_close(scores_a[:-1], scores_b[:-1], rtol=1e-5, atol=1e-5)
        be.summaries.update_decode(0, slots[L - 1 : L], torch.tensor([L - 1]), kv.get_key_buffer(0)[slots[L - 1 : L]])
    assert cached.summary_cache is not None and cached.summary_cache.count[0] == (L0 + 40 - 1) // 8
    # the gather path copies no page summaries (flat: it keeps nothing per request)
    assert gathered.summary_cache is None if group_pages == 1 else gathered.summary_cache.count[0] == 0
    if group_pages > 1:  # both keep the same group summaries
        for st in (cached, gathered):
            assert st.summary_cache.group_count[0] == ((L0 + 40 - 1) // 8) // group_pages
        torch.testing.assert_close(cached.summary_cache.gmin[0][:, :16], gathered.summary_cache.gmin[0][:, :16])


def group_bound_oracle(q, keys, tokens_per_group):
    """Float64 Quest bound of each group of ``tokens_per_group`` keys, from the raw keys."""
    n = keys.shape[0] // tokens_per_group
    kg = keys[: n * tokens_per_group].double().view(n, tokens_per_group, HKV, D)
    lo, hi = kg.amin(1), kg.amax(1)
    qq = q.double().view(HKV, HQ // HKV, D)
    return torch.maximum(torch.einsum("hgd,nhd->nhgd", qq, lo), torch.einsum("hgd,nhd->nhgd", qq, hi)).sum(-1).amax(
        dim=(1, 2)
    )


@pytest.mark.parametrize("seed", range(4))
def test_grouped_scores_keep_the_exact_bound_of_the_best_groups_pages(seed):
    """Two-level retrieval: the pages of the ``keep`` groups whose float64 group bound is highest (and the pages
    after the last complete group) carry their exact page bound; every other page ranks below all of them."""
    g = torch.Generator().manual_seed(seed)
    P, G, n, keep = 4, 8, 83, 3  # 10 complete groups + 3 loose pages
    keys = torch.randn(n * P, HKV, D, generator=g)
    q = torch.randn(HQ, D, generator=g)
    kp = keys.view(n, P, HKV, D)
    kmin, kmax = kp.amin(1).transpose(0, 1), kp.amax(1).transpose(0, 1)  # [Hkv, n, D]
    m = n // G
    gmin = kmin[:, : m * G].reshape(HKV, m, G, D).amin(2)
    gmax = kmax[:, : m * G].reshape(HKV, m, G, D).amax(2)
    def pages_of(idx):
        return (kmin, kmax) if idx is None else (kmin.index_select(1, idx), kmax.index_select(1, idx))

    got = grouped_quest_page_scores(q, n, gmin, gmax, G, keep, pages_of)
    flat = quest_page_scores_head_major(q, kmin, kmax)
    best = set(torch.topk(group_bound_oracle(q, keys, G * P), keep).indices.tolist())
    cand = sorted({gi * G + j for gi in best for j in range(G)} | set(range(m * G, n)))
    torch.testing.assert_close(got[cand], flat[cand], rtol=1e-5, atol=1e-5)
    others = sorted(set(range(n)) - set(cand))
    assert len(others) == (m - keep) * G and bool((got[others] < got[cand].min()).all())
    # a group's bound is >= the bound of each of its pages
    gb = group_bound_oracle(q, keys, G * P)
    assert bool((flat[: m * G].view(m, G).double() <= gb.view(m, 1) + 1e-4).all())
    # with at least as many groups kept as there are, it is the flat bound
    torch.testing.assert_close(grouped_quest_page_scores(q, n, gmin, gmax, G, m, pages_of), flat)
    # no complete group yet: flat
    torch.testing.assert_close(grouped_quest_page_scores(q, n, None, None, G, keep, pages_of), flat)


def test_two_level_retrieval_finds_a_needle_and_keeps_group_summaries_current():
    """Backend, keep mode, long context: with groups of 8 pages the retrieval leaf still finds the page holding a
    planted needle, reads exactly its grant, and the request's group summaries equal the min/max of the raw keys
    of each complete group after decode steps that complete pages and groups."""
    cfg = MuxConfig(budget=128, page_size=8, leaves="sink=16,recent=32,retrieval=rest", retrieval_group_pages=8)
    L0 = 3000
    be, layer, kv, r2t, slots = make_backend(cfg, L0 + 70, seed=3)
    row = r2t.req_to_token[1]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(HQ, D, generator=g)
    needle = slots[200 * 8 : 201 * 8]
    kv.get_key_buffer(0)[needle] = 3.0 * q.view(HKV, HQ // HKV, D).mean(1)
    be.summaries.rebuild_from_keys(0, row, 0, L0)
    st = RequestMemory()
    for L in range(L0 + 1, L0 + 71):
        kv.get_key_buffer(0)[slots[L - 1]] = torch.randn(HKV, D, generator=g)
        grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
        pages, by_leaf, *_ = be.planner.select(RequestPlan("r", 1, L, grant, st), 0, q, row)
        assert 200 in pages.tolist(), L
        assert by_leaf["retrieval"] == grant["retrieval"]
        be.summaries.update_decode(0, slots[L - 1 : L], torch.tensor([L - 1]), kv.get_key_buffer(0)[slots[L - 1 : L]])
    cache = st.summary_cache
    assert cache is not None and cache.group_pages == 8
    m = cache.count[0] // 8
    gmin, gmax = cache.gmin[0][:, :m], cache.gmax[0][:, :m]
    assert gmin.shape == (HKV, m, D) and m == ((L0 + 70 - 1) // 8) // 8
    keys = kv.get_key_buffer(0)[slots[: m * 64]].view(m, 64, HKV, D)
    torch.testing.assert_close(gmin, keys.amin(1).transpose(0, 1))
    torch.testing.assert_close(gmax, keys.amax(1).transpose(0, 1))


def test_drop_mode_scores_every_page_and_keeps_nothing_per_request():
    """Drop mode is flat Quest whatever --mux-retrieval-group-pages says: dropped pages' summaries go stale, and
    it keeps no per-request summaries (its device memory must not grow with context)."""
    cfg = MuxConfig(budget=128, page_size=8, leaves="sink=16,recent=32,retrieval=rest", drop_cold=True)
    assert cfg.retrieval_group_pages == 8
    L = 1003
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=7)
    row = r2t.req_to_token[1]
    q = torch.randn(HQ, D, generator=torch.Generator().manual_seed(8))
    st = RequestMemory()
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    got = be.planner.page_scores(RequestPlan("d", 1, L, grant, st), 0, q, row)
    n = (L + 7) // 8
    keys = kv.get_key_buffer(0)[slots]
    pad = torch.cat([keys, keys[-1:].expand(n * 8 - L, HKV, D)]).view(n, 8, HKV, D)
    torch.testing.assert_close(got, mass_oracle(q, pad.amin(1), pad.amax(1), D**-0.5 / cfg.retrieval_temperature).float(), rtol=1e-4, atol=1e-4)
    assert st.summary_cache is None


def head_bounds_oracle(q, kmin, kmax):
    """float64 per-head Quest bound ``[Hq, n]`` from page summaries ``[n, Hkv, D]`` (GQA: head h reads h // G)."""
    g = q.shape[0] // kmin.shape[1]
    lo = kmin.double().repeat_interleave(g, dim=1)  # [n, Hq, D]
    hi = kmax.double().repeat_interleave(g, dim=1)
    qq = q.double().unsqueeze(0)
    return torch.maximum(qq * lo, qq * hi).sum(-1).T


def mass_oracle(q, kmin, kmax, scale):
    """float64 ``mass`` score: log of the sum over heads of each head's softmax of ``bound * scale`` over pages."""
    return torch.log(torch.softmax(head_bounds_oracle(q, kmin, kmax) * scale, dim=-1).sum(0))


@pytest.mark.parametrize("seed", range(3))
def test_score_rules_match_float64(seed):
    g = torch.Generator().manual_seed(seed)
    n, P = 57, 8
    kp = 3 * torch.randn(n, P, HKV, D, generator=g)
    q = torch.randn(HQ, D, generator=g)
    kmin, kmax = kp.amin(1), kp.amax(1)
    bounds = quest_page_scores_head_major(q, kmin.transpose(0, 1), kmax.transpose(0, 1), "bound")
    torch.testing.assert_close(bounds.double(), head_bounds_oracle(q, kmin, kmax).amax(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bounds, quest_page_scores(q, kmin, kmax))
    mass = quest_page_scores_head_major(q, kmin.transpose(0, 1), kmax.transpose(0, 1), "mass", 0.3)
    torch.testing.assert_close(mass.double(), mass_oracle(q, kmin, kmax, 0.3), rtol=1e-5, atol=1e-5)
    # far-off pages keep distinct finite scores (no underflow to a tie at -inf)
    far = combine_head_bounds(torch.tensor([[0.0, -500.0, -900.0]]), "mass", 1.0)
    assert bool(torch.isfinite(far).all()) and far[0] > far[1] > far[2]
    with pytest.raises(ValueError, match="allowed: mass, bound"):
        combine_head_bounds(torch.zeros(HQ, 3), "max")


@pytest.mark.parametrize("group_pages", [1, 8])
def test_mass_rule_finds_a_needle_that_a_flat_loud_head_hides_from_the_bound_rule(group_pages):
    """q heads 0-1 (kv head 0) have large logits on every page, varying a little; q heads 2-3 (kv head 1) peak on
    one needle page whose bound is well below head 0's everywhere. ``bound`` (max over heads) ranks pages by the
    loud head's noise and misses the needle; ``mass`` (each head's softmax over pages, summed) finds it."""
    L, P = 1003, 8
    needle = 60
    for rule, found in (("bound", False), ("mass", True)):
        cfg = MuxConfig(budget=128, page_size=P, leaves="sink=16,recent=32,retrieval=rest",
                        retrieval_group_pages=group_pages, retrieval_score=rule)
        be, layer, kv, r2t, slots = make_backend(cfg, L, seed=21)
        g = torch.Generator().manual_seed(22)
        keys = kv.get_key_buffer(0)
        keys[slots] = 0.5 * torch.randn(L, HKV, D, generator=g)
        keys[slots, 0, 0] = 5.0 + 0.3 * torch.randn(L, generator=g)  # the loud head's key dimension
        keys[slots[needle * P : needle * P + P], 0, 0] = 4.0  # the needle page is its quietest
        keys[slots[needle * P : needle * P + P], 1, 1] = 8.0  # ... and where heads 2-3 look
        be.summaries.rebuild_from_keys(0, r2t.req_to_token[1], 0, L)
        q = torch.zeros(HQ, D)
        q[0:2, 0] = 10.0
        q[2:4, 1] = 3.0
        grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
        pages, by_leaf, *_ = be.planner.select(RequestPlan("n", 1, L, grant, RequestMemory()), 0, q,
                                               r2t.req_to_token[1])
        assert by_leaf["retrieval"] == grant["retrieval"] > 0
        assert (needle in pages.tolist()) is found, rule
