"""Routed paged decode over a per-layer page list (Triton, split-K with a combine pass).

For when the page list must stay on the GPU (chosen per layer by `select_pages_on_device`), with no host
round trip and no FlashInfer re-plan. Reference: `mux_kernels.reference.routed_decode`.

    pass 1, grid (B, H_kv, S): split s of request b walks list entries [s*E, (s+1)*E), PAGES_PER_ITER pages
            at a time; token slot = req_to_token[req_pool_idx, page*P + i], masked at pos >= seq_len;
            online softmax for the q heads of kv head h -> partial (acc, lse) per split
    pass 2, grid (B, Hq):     combine the S partials with their log-sum-exp weights
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mux_kernels.triton_support import check_runnable, launch_env, note_loaded

note_loaded(__name__)


@triton.jit
def _routed_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, req_to_token_ptr, req_pool_ptr, seq_lens_ptr, page_list_ptr, page_counts_ptr,
    part_o_ptr, part_lse_ptr,
    scale, entries_per_split,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_r2t, stride_pl, stride_plist_h,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGES_PER_ITER: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    count = tl.load(page_counts_ptr + b)
    seq_len = tl.load(seq_lens_ptr + b)
    req = tl.load(req_pool_ptr + b).to(tl.int64)
    list_base = page_list_ptr + b * stride_pl + h * stride_plist_h  # stride 0: one list for all kv heads
    start = s * entries_per_split
    end = tl.minimum(start + entries_per_split, count)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    heads = h * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    BLOCK_N: tl.constexpr = PAGE_SIZE * PAGES_PER_ITER
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, PAGES_PER_ITER):
        entry = j0 + offs_n // PAGE_SIZE
        emask = entry < end
        page = tl.load(list_base + entry, mask=emask, other=0).to(tl.int64)
        pos = page * PAGE_SIZE + offs_n % PAGE_SIZE
        nmask = emask & (pos < seq_len)
        slot = tl.load(req_to_token_ptr + req * stride_r2t + pos, mask=nmask, other=0).to(tl.int64)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # m_new is finite whenever this block has a valid position; guard the all-masked block anyway.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(part_o_ptr + b * stride_pob + heads[:, None] * stride_poh + s * stride_pos + offs_d[None, :], out,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(part_lse_ptr + b * stride_plb + heads * stride_plh + s, lse, mask=gmask)


@triton.jit
def _combine_splits_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    num_splits,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_lse_ptr + b * stride_plb + hq * stride_plh + s + tl.zeros([1], tl.int32)))
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(part_lse_ptr + b * stride_plb + hq * stride_plh + s + tl.zeros([1], tl.int32))
        w = tl.exp(lse - m)  # an empty split has lse=-inf -> weight 0
        o = tl.load(part_o_ptr + b * stride_pob + hq * stride_poh + s * stride_pos + offs_d, mask=dmask, other=0.0)
        acc += w * o
        total += w
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, (acc / total).to(out_ptr.dtype.element_ty), mask=dmask)


def default_num_splits(max_entries: int, batch: int, num_kv_heads: int, target_programs: int = 512) -> int:
    """Splits per (request, kv head) so a small batch still fills the device; at least 1 entry per split."""
    want = max(1, target_programs // max(1, batch * num_kv_heads))
    return max(1, min(want, max_entries))


def routed_paged_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_list: torch.Tensor,
    page_counts: torch.Tensor,
    page_size: int,
    scale: float,
    num_splits: int | None = None,
    pages_per_iter: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over the listed logical pages of each request; returns [B, Hq, D].

    `page_list [B, K]` logical page ids (first `page_counts[b]` entries used, any order, no duplicates), or
    `[B, H_kv, K]` for one list per kv-head group (FlashInfer's decode cannot do that: one table for all heads);
    `k_buffer/v_buffer [num_slots, H_kv, D]` one layer; output dtype = q dtype. A request must list >= 1 page
    containing a position < seq_len (the tail page always qualifies).
    """
    mode = check_runnable(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, page_list, page_counts)
    bsz, hq, dim = q.shape
    hkv = k_buffer.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two; got {page_size}")
    if k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("k_buffer and v_buffer need a contiguous last dimension")
    q = q.contiguous()
    page_list = page_list.contiguous()
    per_group = page_list.dim() == 3
    if per_group and page_list.shape[1] != hkv:
        raise ValueError(f"per-group page_list needs shape [B, {hkv}, K]; got {tuple(page_list.shape)}")
    req_to_token = req_to_token.contiguous()
    group = hq // hkv
    max_entries = page_list.shape[-1]
    if num_splits is None:
        num_splits = default_num_splits(max_entries, bsz, hkv)
    num_splits = max(1, min(num_splits, max_entries))
    entries_per_split = triton.cdiv(max_entries, num_splits)
    num_splits = triton.cdiv(max_entries, entries_per_split)
    if pages_per_iter is None:
        pages_per_iter = max(1, 64 // page_size)
    if pages_per_iter < 1 or pages_per_iter & (pages_per_iter - 1):
        raise ValueError(f"pages_per_iter must be a power of two; got {pages_per_iter}")
    if page_size * pages_per_iter < 16:  # tl.dot needs at least 16 rows
        pages_per_iter = triton.cdiv(16, page_size)
    part_o = torch.empty(bsz, hq, num_splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(dim))
    if out is None:
        out = torch.empty(bsz, hq, dim, dtype=q.dtype, device=q.device)
    with launch_env(mode):
        _routed_decode_split_kernel[(bsz, hkv, num_splits)](
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, page_list, page_counts,
            part_o, part_lse,
            float(scale), entries_per_split,
            q.stride(0), q.stride(1),
            k_buffer.stride(0), k_buffer.stride(1),
            v_buffer.stride(0), v_buffer.stride(1),
            req_to_token.stride(0), page_list.stride(0), page_list.stride(1) if per_group else 0,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=dim, BLOCK_D=block_d,
            PAGE_SIZE=page_size, PAGES_PER_ITER=pages_per_iter,
            # fp32 inputs: exact products (not tf32); fp16/bf16: the default tensor-core path.
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
        _combine_splits_kernel[(bsz, hq)](
            part_o, part_lse, out,
            num_splits,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_D=block_d,
        )
    return out
