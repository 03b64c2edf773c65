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
    assert int(pat.sum()) <= computed


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
    assert computed >= dense_block_count(prefix, n, 32, 2)


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
    assert int(pat.sum()) <= computed <= int(pat.sum()) * 9 // 8 + 2 * 32  # padding: at most 1/8 (+ rounding)
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
