"""Page-summary scoring per kv-head group (Triton) and on-device page choice (torch ops, no host sync).

Reference: `mux_kernels.reference.page_scores` / `select_pages`. Imports Triton: load lazily through
`mux_kernels` (see the package docstring).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mux_kernels import reference
from mux_kernels.triton_support import check_runnable, launch_env, note_loaded

note_loaded(__name__)


@triton.jit
def _page_score_kernel(
    q_ptr, kmin_ptr, kmax_ptr, table_ptr, num_pages_ptr, out_ptr,
    max_pages,
    stride_qb, stride_qh,
    stride_sr, stride_sh,
    stride_tb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PER_HEAD: tl.constexpr,
):
    # One program: request b, kv head h, a block of BLOCK_P pages. Scores in fp32. PER_HEAD: one row per query
    # head of the group (out is [B, Hq, max_pages]); else the max over the group's heads ([B, Hkv, max_pages]).
    b = tl.program_id(0)
    h = tl.program_id(1)
    pblock = tl.program_id(2)
    n_pages = tl.load(num_pages_ptr + b)
    offs_p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    pmask = offs_p < n_pages
    gmask = offs_g < GROUP
    rows = tl.load(table_ptr + b * stride_tb + offs_p, mask=pmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_G, BLOCK_P], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        d = d0 + offs_d
        dmask = d < HEAD_DIM
        q = tl.load(
            q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + d[None, :],
            mask=gmask[:, None] & dmask[None, :], other=0.0,
        ).to(tl.float32)
        smask = pmask[:, None] & dmask[None, :]
        spos = rows[:, None] * stride_sr + h * stride_sh + d[None, :]
        lo = tl.load(kmin_ptr + spos, mask=smask, other=0.0).to(tl.float32)
        hi = tl.load(kmax_ptr + spos, mask=smask, other=0.0).to(tl.float32)
        qe = q[:, None, :]
        acc += tl.sum(tl.maximum(qe * lo[None, :, :], qe * hi[None, :, :]), axis=2)
    if PER_HEAD:
        acc = tl.where(pmask[None, :], acc, float("-inf"))
        optr = out_ptr + b * stride_ob + (h * GROUP + offs_g)[:, None] * stride_oh + offs_p[None, :]
        tl.store(optr, acc, mask=gmask[:, None] & (offs_p < max_pages)[None, :])
    else:
        acc = tl.where(gmask[:, None], acc, float("-inf"))
        score = tl.max(acc, axis=0)
        score = tl.where(pmask, score, float("-inf"))
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_p, score, mask=offs_p < max_pages)


def score_pages(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    summary_table: torch.Tensor,
    num_pages: torch.Tensor,
    block_pages: int = 32,
    block_dim: int = 32,
    per_head: bool = False,
) -> torch.Tensor:
    """Quest-style page scores per kv-head group, `[B, H_kv, max_pages]` float32 (with `per_head`: per query
    head, `[B, Hq, max_pages]`, the input of the `mass` rule).

    q [B, Hq, D]; kmin/kmax [rows, H_kv, D]; summary_table [B, max_pages] (int32/int64 rows of the pool);
    num_pages [B]. Same contract as `reference.page_scores` (accumulated in fp32 here).
    """
    mode = check_runnable(q, kmin, kmax, summary_table, num_pages)
    bsz, hq, dim = q.shape
    hkv = kmin.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    q = q.contiguous()
    kmin = kmin.contiguous()
    kmax = kmax.contiguous()
    summary_table = summary_table.contiguous()
    max_pages = summary_table.shape[1]
    out = torch.empty(bsz, hq if per_head else hkv, max_pages, dtype=torch.float32, device=q.device)
    group = hq // hkv
    block_d = min(block_dim, triton.next_power_of_2(dim))
    grid = (bsz, hkv, triton.cdiv(max_pages, block_pages))
    with launch_env(mode):
        _launch_page_score(grid, q, kmin, kmax, summary_table, num_pages, out, max_pages, group, dim, block_d,
                           block_pages, per_head)
    return out


def _launch_page_score(grid, q, kmin, kmax, summary_table, num_pages, out, max_pages, group, dim, block_d,
                       block_pages, per_head):
    _page_score_kernel[grid](
        q, kmin, kmax, summary_table, num_pages, out,
        max_pages,
        q.stride(0), q.stride(1),
        kmin.stride(0), kmin.stride(1),
        summary_table.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=triton.next_power_of_2(group),
        HEAD_DIM=dim, BLOCK_D=block_d,
        BLOCK_P=block_pages, PER_HEAD=per_head,
    )


def select_pages_on_device(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    summary_table: torch.Tensor,
    num_pages: torch.Tensor,
    budget_pages: int,
    sink_pages: int = 0,
    recent_pages: int = 1,
    per_group: bool = False,
    forced: torch.Tensor | None = None,
    blocked: torch.Tensor | None = None,
    rule: str = "bound",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-aware page choice for one layer, all on the tensors' device, fixed output shapes.

    Scores with the Triton kernel, then `reference.select_pages` (stable sort: ties to the lower page id):
    by default on one score per page over all heads -> `page_list [B, budget_pages]`; with `per_group` one
    choice per kv-head group (its heads only) -> `[B, H_kv, budget_pages]` (for `routed_paged_decode`). Lists
    are sorted, -1 unused; also returns `page_counts [B]`. `forced` / `blocked` bool `[B, max_pages]`: see
    `reference.select_pages`. `rule`: how the heads' bounds make one score (`reference.combine_head_scores`):
    `bound` (max, Quest) or `mass` (summed softmax over the pages of `bound * scale`).
    """
    if rule not in reference.SCORE_RULES:
        raise ValueError(f"rule: allowed: {', '.join(reference.SCORE_RULES)}; got {rule!r}")
    if rule == "mass":
        head_scores = score_pages(q, kmin, kmax, summary_table, num_pages, per_head=True)
        hkv = kmin.shape[1] if per_group else None
        scores = reference.combine_head_scores(head_scores, num_pages, "mass", scale, num_kv_heads=hkv)
    else:
        scores = score_pages(q, kmin, kmax, summary_table, num_pages)  # bound, already the max per group
        if not per_group:
            scores = scores.amax(dim=1)
    return reference.select_pages(scores, num_pages, budget_pages, sink_pages, recent_pages, forced, blocked)
