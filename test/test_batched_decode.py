"""The batched routed decode (one attention call per layer for the whole batch) against the per-request path.

* ``batched_attend`` == ``attend`` per request and float64 softmax attention, for ragged masks and GQA; a row
  with nothing to read gives zeros.
* ``routed_batch_attention`` on a real SGLang pool == per request: gather the pages' positions, ``attend``,
  ``accumulate_decode_mass`` (output and heavy scores), for ragged page lists and a request reading only its
  tail page.
* The backend's routed step on a mixed batch: routed rows == the per-request reference over the pages
  the planner's ``select`` chooses, exact rows == per-request SDPA over the whole context.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cpu_pools import kv_pool, req_to_token_pool
from torch.nn.functional import scaled_dot_product_attention

from sglang_mux.attention.backend import MuxAttentionBackend
from sglang_mux.attention.step_planner import RequestPlan
from sglang_mux.attention.batched_decode import (
    batched_attend,
    exact_slots,
    padded_exact_attention,
    routed_batch_attention,
)
from sglang_mux.attention.importance import accumulate_decode_mass
from sglang_mux.attention.routed_decode import attend, page_positions
from sglang_mux.config import MuxConfig
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.memory.requests import RequestMemory
from sglang_mux.router.spine import StaticSpineRouter

HQ, HKV, D, P = 6, 2, 16, 8


def ref64(q, k, v, scale):
    g = q.shape[0] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q.double(), kk) * scale, dim=-1)
    return torch.einsum("ht,thd->hd", p, vv)


@pytest.mark.parametrize("seed", range(3))
def test_batched_attend_equals_attend_per_request_and_float64(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 4, 50
    q = torch.randn(B, HQ, D, generator=g)
    k, v = torch.randn(B, N, HKV, D, generator=g), torch.randn(B, N, HKV, D, generator=g)
    valid = torch.rand(B, N, generator=g) > 0.4
    valid[:, 0] = True
    valid[3] = False
    valid[3, 7] = True  # one token only
    out, probs = batched_attend(q, k, v, valid, 0.3)
    for b in range(B):
        o_ref, p_ref = attend(q[b], k[b, valid[b]], v[b, valid[b]], 0.3)
        assert torch.allclose(out[b], o_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(probs[b][:, valid[b]], p_ref, rtol=1e-5, atol=1e-7)
        assert torch.all(probs[b][:, ~valid[b]] == 0)
        assert torch.allclose(out[b].double(), ref64(q[b], k[b, valid[b]], v[b, valid[b]], 0.3), rtol=1e-5, atol=1e-5)


def test_a_row_with_nothing_to_read_gives_zeros():
    q, k, v = torch.randn(2, HQ, D), torch.randn(2, 5, HKV, D), torch.randn(2, 5, HKV, D)
    valid = torch.tensor([[True] * 5, [False] * 5])
    out, probs = batched_attend(q, k, v, valid, 0.25)
    assert torch.all(out[1] == 0) and torch.all(probs[1] == 0) and torch.isfinite(out).all()


def make_pool(lens, seed=0, layers=1):
    g = torch.Generator().manual_seed(seed)
    kv = kv_pool(8192, P, HKV, D, layers)
    r2t = req_to_token_pool(len(lens) + 2, 2048)
    phys = torch.randperm(8192 // P - 1, generator=g) + 1  # scattered pages, as a paged allocator hands them out
    used = 0
    for i, L in enumerate(lens):
        n = (L + P - 1) // P
        slots = (phys[used : used + n].view(-1, 1) * P + torch.arange(P)).flatten()[:L]
        used += n
        r2t.req_to_token[i + 1, :L] = slots.to(torch.int32)
        for l in range(layers):
            kv.get_key_buffer(l)[slots] = torch.randn(L, HKV, D, generator=g)
            kv.get_value_buffer(l)[slots] = torch.randn(L, HKV, D, generator=g)
    return kv, r2t


def test_routed_batch_attention_equals_the_per_request_path_with_heavy_scores():
    lens = [203, 64, 97, 150]
    kv, r2t = make_pool(lens, seed=1)
    k_buf, v_buf = kv.get_key_buffer(0), kv.get_value_buffer(0)
    g = torch.Generator().manual_seed(2)
    pages = [
        torch.tensor([0, 3, 7, 11, 25]),  # ragged lists, the tail page (25) partial
        torch.tensor([7]),  # nothing beyond the (full) tail page
        torch.tensor([0, 1, 2, 12]),
        torch.tensor([2, 5, 18]),
    ]
    q = torch.randn(len(lens), HQ, D, generator=g)
    rows, seq_lens = torch.arange(1, len(lens) + 1), torch.tensor(lens)
    heavy = [torch.rand(40, generator=g) for _ in lens]
    heavy_ref = [h.clone() for h in heavy]
    heavy[2] = heavy_ref[2] = None  # a request without heavy scores
    out = routed_batch_attention(q, k_buf, v_buf, r2t.req_to_token, rows, seq_lens, pages, 0.25, P, heavy)
    for b, L in enumerate(lens):
        pos = page_positions(pages[b], L, P)
        slots = r2t.req_to_token[b + 1, pos].long()
        o_ref, probs = attend(q[b], k_buf[slots], v_buf[slots], 0.25)
        assert torch.allclose(out[b], o_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(out[b].double(), ref64(q[b], k_buf[slots], v_buf[slots], 0.25), rtol=1e-5, atol=1e-5)
        if heavy_ref[b] is not None:
            accumulate_decode_mass(heavy_ref[b], pos, probs, P)
            assert torch.allclose(heavy[b], heavy_ref[b], rtol=1e-5, atol=1e-6)
    # one request alone takes the unpadded path: the same numbers
    one = routed_batch_attention(q[:1], k_buf, v_buf, r2t.req_to_token, rows[:1], seq_lens[:1], pages[:1], 0.25, P)
    assert torch.allclose(one[0], out[0], rtol=1e-5, atol=1e-6)


def test_padded_exact_attention_equals_sdpa_per_request():
    lens = [37, 120, 5]
    kv, r2t = make_pool(lens, seed=3)
    k_buf, v_buf = kv.get_key_buffer(0), kv.get_value_buffer(0)
    q = torch.randn(len(lens), HQ, D, generator=torch.Generator().manual_seed(4))
    slots, valid = exact_slots(r2t.req_to_token, torch.arange(1, 4), torch.tensor(lens))
    out = padded_exact_attention(q, k_buf, v_buf, slots, valid, 0.25)
    for b, L in enumerate(lens):
        s = r2t.req_to_token[b + 1, :L].long()
        ref = scaled_dot_product_attention(q[b].view(1, HQ, 1, D), k_buf[s].movedim(0, 1).unsqueeze(0),
                                           v_buf[s].movedim(0, 1).unsqueeze(0), scale=0.25, enable_gqa=True)
        assert torch.allclose(out[b], ref.view(HQ, D), rtol=1e-5, atol=1e-6)


def test_mixed_batch_routed_step_equals_the_per_request_reference():
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=8,recent=16,heavy=8,retrieval=rest")
    lens = [300, 40, 181, 57]  # routed, exact, routed, exact
    kv, r2t = make_pool(lens, seed=5)
    be = MuxAttentionBackend(SimpleNamespace(req_to_token_pool=r2t, token_to_kv_pool=kv), inner=None, mux_config=cfg)
    for i, L in enumerate(lens):
        be.summaries.rebuild_from_keys(0, r2t.req_to_token[i + 1], 0, L)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=D, v_head_dim=D,
                            scaling=D**-0.5, is_cross_attention=False)
    router = StaticSpineRouter(cfg)
    states = [RequestMemory() for _ in lens]
    states[0].scores(1, 64, "cpu")[0, 9] = 3.0  # heavy scores for the first routed request
    plan = [RequestPlan(f"r{i}", i + 1, L, router.grant(L, MuxRequestOptions()), st) for i, (L, st) in enumerate(zip(lens, states))]
    assert [p.grant.exact for p in plan] == [False, True, False, True]
    q = torch.randn(len(lens), HQ * D, generator=torch.Generator().manual_seed(6))
    qv = q.view(-1, HQ, D)
    k_buf, v_buf = kv.get_key_buffer(0), kv.get_value_buffer(0)
    # the per-request reference first (selection does not depend on the heavy scores' decode mass of this step)
    ref_heavy = states[0].heavy_scores.clone()
    want = []
    for i, p in enumerate(plan):
        row = r2t.req_to_token[p.row]
        if p.grant.exact:
            s = row[: p.seq_len].long()
            want.append(ref64(qv[i], k_buf[s], v_buf[s], layer.scaling))
            continue
        pages, *_ = be.planner.select(p, 0, qv[i], row, layer.scaling)
        pos = page_positions(pages, p.seq_len, P)
        s = row[pos].long()
        want.append(ref64(qv[i], k_buf[s], v_buf[s], layer.scaling))
        if i == 0:
            accumulate_decode_mass(ref_heavy[0], pos, attend(qv[i], k_buf[s], v_buf[s], layer.scaling)[1], P)
    got = be._routed_decode(q, layer, plan).view(-1, HQ, D)
    for i in range(len(lens)):
        assert torch.allclose(got[i].double(), want[i], rtol=1e-5, atol=1e-5), i
    assert torch.allclose(states[0].heavy_scores, ref_heavy, rtol=1e-5, atol=1e-6)
    # the next layer of the same step reuses the step's tensors
    step = be._step
    be._routed_decode(q, layer, plan)
    assert be._step is step and step.positions.tolist() == [L - 1 for L in lens]
