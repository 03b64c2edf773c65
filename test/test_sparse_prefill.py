"""The sparse_prefill leaf (sglang_mux.attention.sparse_prefill) against float64 oracles, no server.

Oracles: dense masked softmax over the token mask built from the same block pattern; dense causal attention
for the full pattern; a one-shot prefill for a two-chunk prefill; NaN keys in skipped blocks for "really
skipped"; counts of key blocks computed against the dense count.
"""

from __future__ import annotations

import pytest
import torch

from sglang_mux.attention.sparse_prefill import (
    PATTERNS,
    SparsePrefillParams,
    block_grid,
    block_sparse_attention,
    causal_blocks,
    dense_block_count,
    estimate_pattern,
    fixed_blocks,
    sparse_prefill_attention,
    sparse_prefill_rows,
)

F64 = torch.float64


def qkv(n_q: int, L: int, hq: int = 4, hk: int = 2, d: int = 16, dv: int = 8, seed: int = 0):
    """Random queries with some structure: a sink key, and a few keys the queries strongly agree with."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, hq, d, generator=g, dtype=F64)
    k = torch.randn(L, hk, d, generator=g, dtype=F64)
    v = torch.randn(L, hk, dv, generator=g, dtype=F64)
    shared = torch.randn(hk, d, generator=g, dtype=F64)
    q += 2.0 * shared.repeat_interleave(hq // hk, 0)
    for pos in (0, L // 3, L // 2):  # "needles" every query likes
        k[pos] += 3.0 * shared
    return q, k, v


def token_mask(pattern: torch.Tensor, prefix: int, n: int, block: int, hq: int) -> torch.Tensor:
    """``[Hq, n, L]`` bool: the pattern's blocks, expanded to tokens, intersected with causality."""
    L = prefix + n
    qb0 = prefix // block
    qblk = torch.arange(prefix, L) // block - qb0
    kblk = torch.arange(L) // block
    m = pattern[:, qblk][:, :, kblk]  # [Hk, n, L]
    causal = torch.arange(L).view(1, -1) <= torch.arange(prefix, L).view(-1, 1)
    return (m & causal).repeat_interleave(hq // pattern.shape[0], dim=0)


def masked_attention(q, k, v, mask, scale):
    """Dense reference: every score computed, then masked (what the sparse path must never do)."""
    hq, hk = q.shape[1], k.shape[1]
    kk, vv = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = torch.einsum("nhd,lhd->hnl", q, kk) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hnl,lhd->nhd", p, vv)


def dense_causal(q, k, v, prefix, scale):
    L = k.shape[0]
    causal = torch.arange(L).view(1, -1) <= torch.arange(prefix, L).view(-1, 1)
    return masked_attention(q, k, v, causal.expand(q.shape[1], -1, -1), scale)


def test_block_grid_and_fixed_blocks_worked_examples():
    assert block_grid(100, 60, 64) == (1, 2, 3)
    p = SparsePrefillParams(block=64, sink_tokens=64, window_tokens=192)
    fixed = fixed_blocks(0, 512, p)
    assert torch.nonzero(fixed[7]).flatten().tolist() == [0, 5, 6, 7]
    assert torch.nonzero(fixed[1]).flatten().tolist() == [0, 1]
    assert torch.equal(causal_blocks(0, 512, 64), torch.ones(8, 8, dtype=torch.bool).tril())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("prefix, n", [(0, 300), (100, 200), (96, 161)])
def test_sparse_extend_equals_dense_attention_restricted_to_its_pattern(pattern, prefix, n):
    q, k, v = qkv(n, prefix + n)
    params = SparsePrefillParams(block=16, sink_tokens=16, window_tokens=32, keep=0.5, pattern=pattern)
    out, pat, computed = sparse_prefill_attention(q, k, v, prefix, 0.25, params)
    causal = causal_blocks(prefix, n, 16)
    assert pat.shape == (2, *causal.shape)
    assert not bool((pat & ~causal).any()), "a block after the diagonal was chosen"
    assert int(pat.sum()) < 2 * int(causal.sum()), "the test pattern must really be sparse"
    ref = masked_attention(q, k, v, token_mask(pat, prefix, n, 16, 4), 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert int(pat.sum()) == computed


def test_arbitrary_pattern_per_head_equals_masked_oracle():
    prefix, n, B = 32, 200, 16
    q, k, v = qkv(n, prefix + n, seed=3)
    causal = causal_blocks(prefix, n, B)
    g = torch.Generator().manual_seed(1)
    pat = (torch.rand(2, *causal.shape, generator=g) < 0.4) & causal
    pat |= causal & (torch.arange(causal.shape[1]).view(1, -1) == torch.arange(2, 2 + causal.shape[0]).view(-1, 1))
    out, _ = block_sparse_attention(q, k, v, prefix, 0.3, pat, B)
    torch.testing.assert_close(out, masked_attention(q, k, v, token_mask(pat, prefix, n, B, 4), 0.3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_full_pattern_equals_dense_causal_attention(pattern):
    prefix, n = 48, 250
    q, k, v = qkv(n, prefix + n, seed=5)
    params = SparsePrefillParams(block=32, keep=1.0, pattern=pattern)
    out, pat, computed = sparse_prefill_attention(q, k, v, prefix, 0.25, params)
    assert torch.equal(pat[0], causal_blocks(prefix, n, 32)) and torch.equal(pat[1], pat[0])
    torch.testing.assert_close(out, dense_causal(q, k, v, prefix, 0.25), rtol=1e-12, atol=1e-12)
    assert computed == dense_block_count(prefix, n, 32, 2)


def test_two_chunks_equal_one_shot():
    """topk chooses per query block from that block's queries and the keys before it: a chunk boundary on a
    block boundary changes nothing."""
    L, cut, B = 512, 192, 16
    q, k, v = qkv(L, L, seed=7)
    params = SparsePrefillParams(block=B, sink_tokens=16, window_tokens=32, keep=0.6, pattern="topk")
    one, pat_one, _ = sparse_prefill_attention(q, k, v, 0, 0.25, params)
    first, pat_a, _ = sparse_prefill_attention(q[:cut], k[:cut], v[:cut], 0, 0.25, params)
    second, pat_b, _ = sparse_prefill_attention(q[cut:], k, v, cut, 0.25, params)
    assert int(pat_one.sum()) < 2 * int(causal_blocks(0, L, B).sum())
    nq_a = cut // B
    assert torch.equal(pat_a, pat_one[:, :nq_a, :nq_a]) and torch.equal(pat_b, pat_one[:, nq_a:])
    torch.testing.assert_close(torch.cat([first, second]), one, rtol=1e-12, atol=1e-12)


def test_skipped_blocks_are_never_read():
    """NaN keys/values in a block the pattern skips for every query block: the output stays finite."""
    prefix, n, B = 0, 160, 16
    q, k, v = qkv(n, n, seed=9)
    causal = causal_blocks(prefix, n, B)
    pat = causal.expand(2, -1, -1).clone()
    pat[0, :, 3] = False  # head 0 never reads key block 3 (positions 48..63); its queries still see block 0
    k[48:64, 0], v[48:64, 0] = float("nan"), float("nan")
    out, _ = block_sparse_attention(q, k, v, prefix, 0.25, pat, B)
    assert torch.isfinite(out).all()
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    torch.testing.assert_close(out, masked_attention(q, k0, v0, token_mask(pat, prefix, n, B, 4), 0.25), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_work_skipped_is_real(pattern):
    L, B = 2048, 64
    q, k, v = qkv(L, L, d=32, dv=32, seed=11)
    params = SparsePrefillParams(block=B, sink_tokens=64, window_tokens=128, keep=0.5, pattern=pattern)
    out, pat, computed = sparse_prefill_attention(q, k, v, 0, 32**-0.5, params)
    dense = dense_block_count(0, L, B, 2)
    assert computed == int(pat.sum())  # exactly the chosen blocks, no padding
    assert computed < dense, (computed, dense)
    assert torch.isfinite(out).all()


def test_unknown_pattern_names_the_allowed_values():
    q, k, v = qkv(32, 32)
    with pytest.raises(ValueError, match="allowed: topk, vertical_slash"):
        estimate_pattern(q, k, 0, 0.25, SparsePrefillParams(pattern="dense"))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_finds_the_needle_block_far_outside_the_window(pattern):
    L, B = 2048, 64
    q, k, v = qkv(L, L, d=32, dv=32, seed=13)
    params = SparsePrefillParams(block=B, sink_tokens=64, window_tokens=128, keep=0.5, pattern=pattern)
    pat = estimate_pattern(q, k, 0, 32**-0.5, params)
    last = pat[:, -1]
    assert bool(last[:, (L // 3) // B].all()), "the needle's block must be read by the last query block"
    assert int(last.sum(dim=1).max()) < L // B // 2, "and far from every block"


# ---------------------------------------------------------------------------------------------- in the backend
def _backend_setup(cfg, lens, prefixes, seed=0, hq=4, hk=2, d=16):
    """A MuxAttentionBackend over real SGLang pools wrapping SGLang's torch_native backend; one request per entry of
    ``lens`` (its total tokens) whose first ``prefixes[i]`` tokens' KV is already in the pool."""
    from types import SimpleNamespace

    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from cpu_pools import kv_pool, req_to_token_pool

    from sglang_mux.attention.backend import MuxAttentionBackend

    g = torch.Generator().manual_seed(seed)
    P = cfg.page_size
    kv = kv_pool(8192, P, hk, d)
    r2t = req_to_token_pool(8, 4096)
    runner = SimpleNamespace(req_to_token_pool=r2t, token_to_kv_pool=kv, device="cpu")
    be = MuxAttentionBackend(runner, inner=TorchNativeAttnBackend(runner), mux_config=cfg)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=hq, tp_k_head_num=hk, qk_head_dim=d, v_head_dim=d,
                            scaling=d**-0.5, is_cross_attention=False, attn_type=AttentionType.DECODER,
                            sliding_window_size=-1)
    free = (torch.randperm(8192 // P - 1, generator=g) + 1)
    out_locs, qs, ks, vs, full_k, full_v = [], [], [], [], [], []
    page = 0
    for row, (L, pre) in enumerate(zip(lens, prefixes), start=1):
        n_pages = -(-L // P)
        slots = (free[page : page + n_pages].view(-1, 1) * P + torch.arange(P)).flatten()[:L]
        page += n_pages
        r2t.req_to_token[row, :L] = slots.to(torch.int32)
        kk, vv = torch.randn(L, hk, d, generator=g), torch.randn(L, hk, d, generator=g)
        kk[L // 3] += 4.0  # a key the queries agree with, far from the end
        kv.get_key_buffer(0)[slots[:pre]] = kk[:pre]
        kv.get_value_buffer(0)[slots[:pre]] = vv[:pre]
        out_locs.append(slots[pre:])
        qs.append(torch.randn(L - pre, hq, d, generator=g) + 1.0)
        ks.append(kk[pre:]), vs.append(vv[pre:]), full_k.append(kk), full_v.append(vv)
    fb = SimpleNamespace(
        rids=[f"sp-{seed}-{i}" for i in range(len(lens))],
        seq_lens=torch.tensor(lens), seq_lens_cpu=torch.tensor(lens),
        req_pool_indices=torch.arange(1, len(lens) + 1),
        extend_prefix_lens=torch.tensor(prefixes), extend_prefix_lens_cpu=list(prefixes),
        extend_seq_lens=torch.tensor([L - p for L, p in zip(lens, prefixes)]),
        extend_seq_lens_cpu=[L - p for L, p in zip(lens, prefixes)],
        out_cache_loc=torch.cat(out_locs), encoder_lens=None,
    )
    q = torch.cat(qs).reshape(-1, hq * d)
    return be, layer, fb, q, torch.cat(ks), torch.cat(vs), full_k, full_v, kv, r2t


def _admit(fb, *params):
    from sglang_mux.memory.requests import REGISTRY

    for rid, p in zip(fb.rids, params):
        REGISTRY.admit(rid, p)


def _release(fb):
    from sglang_mux.memory.requests import REGISTRY

    for rid in fb.rids:
        REGISTRY.release(rid)


def test_backend_off_by_default_delegates_and_on_matches_the_module():
    from sglang_mux.config import MuxConfig

    lens, prefixes = [700, 300], [128, 0]
    cfg_off = MuxConfig(budget=256, page_size=16)
    cfg_on = cfg_off.replace(sparse_prefill_min_tokens=512, sparse_prefill_block=32, sparse_prefill_keep=0.5,
                             sparse_prefill_sink_tokens=32, sparse_prefill_window_tokens=64)
    outs, tables, summaries, pools = {}, {}, {}, {}
    for name, cfg in (("off", cfg_off), ("on", cfg_on)):
        be, layer, fb, q, k, v, full_k, full_v, kv, r2t = _backend_setup(cfg, lens, prefixes, seed=21)
        _admit(fb, {}, {})
        try:
            outs[name] = be.forward_extend(q, k, v, layer, fb)
            st = be.registry.get(fb.rids[0])
            tables[name] = None if st.heavy_scores is None else st.heavy_scores.clone()
        finally:
            _release(fb)
        slots = r2t.req_to_token[1, :700].long()
        pools[name] = (kv.get_key_buffer(0)[slots].clone(), kv.get_value_buffer(0)[slots].clone())
        summaries[name] = be.summaries.get(0, r2t.req_to_token[1, 128:700:16].long())  # pages this extend wrote
        blocks = be.__dict__.get("sparse_prefill_blocks")
        if name == "on":
            assert blocks is not None and 0 < blocks[0] < blocks[1], blocks
        else:
            assert blocks is None, "off by default: nothing computed by the sparse path"
    # KV written to the pool either way, equal to the given K/V
    assert torch.equal(pools["on"][0], full_k[0]) and torch.equal(pools["off"][0], pools["on"][0])
    assert torch.equal(pools["on"][1], full_v[0])
    # page summaries and heavy-hitter scores produced as before (they depend on K and the queries, not on O)
    assert all(torch.equal(a, b) for a, b in zip(summaries["on"], summaries["off"]))
    assert tables["off"] is not None and torch.equal(tables["on"], tables["off"])
    # request 0 (700 >= 512): the module's sparse output over prefix + chunk; request 1 (300): exact, as before
    params = SparsePrefillParams(block=32, sink_tokens=32, window_tokens=64, keep=0.5)
    q0 = q[:572].view(572, 4, 16)
    ref0, pat, _ = sparse_prefill_attention(q0, full_k[0], full_v[0], 128, 16**-0.5, params)
    assert int(pat.sum()) < int(causal_blocks(128, 572, 32).sum()) * 2
    torch.testing.assert_close(outs["on"][:572].view(572, 4, 16), ref0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["on"][:572], outs["off"][:572], atol=1e-3), "sparse must differ from exact here"
    torch.testing.assert_close(outs["on"][572:], outs["off"][572:], rtol=1e-5, atol=1e-5)


def test_backend_request_field_turns_it_on_and_off_and_full_keep_is_exact():
    from sglang_mux.config import MuxConfig

    lens, prefixes = [400, 400], [0, 64]
    cfg = MuxConfig(budget=256, page_size=16, sparse_prefill_keep=1.0, sparse_prefill_block=32)
    be, layer, fb, q, k, v, *_ = _backend_setup(cfg, lens, prefixes, seed=5)
    _admit(fb, {"mux_sparse_prefill": True}, {"mux_sparse_prefill": False})
    try:
        assert sparse_prefill_rows(layer, fb, k, v, True, be.registry, be.mux_config) == [True, False]
        out = be.forward_extend(q, k, v, layer, fb)
    finally:
        _release(fb)
    blocks = be.__dict__["sparse_prefill_blocks"]
    assert blocks[0] == blocks[1] > 0  # keep 1.0: every causal block of request 0 computed
    be2, layer2, fb2, *_ = _backend_setup(MuxConfig(budget=256, page_size=16), lens, prefixes, seed=5)
    ref = be2.forward_extend(q, k, v, layer2, fb2)  # both exact, through torch_native
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
