"""Torch references for the mux kernels: the functions the Triton kernels must reproduce.

Plain torch, any device, no Triton. Shapes and names follow SGLang's pools:

    req_to_token[req_pool_idx, pos] -> token slot          (int32/int64, [num_reqs, max_ctx])
    k_buffer, v_buffer                -> [num_slots, H_kv, D] for one layer
    logical page p of a request       -> positions [p*P, min((p+1)*P, L))

A *page list* for a batch is `page_list [B, K]` (logical page ids, any order, unused entries ignored) with
`page_counts [B]` (how many leading entries of each row are used). Summaries are a pool
`kmin, kmax [num_summary_rows, H_kv, D]` addressed per request through `summary_table [B, max_pages]`
(row of logical page p of request b), with `num_pages [B]`.
"""

from __future__ import annotations

import torch


def num_pages_of(seq_len: int, page_size: int) -> int:
    """Pages covering `seq_len` positions (the last one may be partial)."""
    return (seq_len + page_size - 1) // page_size


def page_positions(pages: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Positions covered by logical `pages`, in the order of `pages`, clipped to `seq_len`.

    Example (P=4, L=10): pages [0, 2] -> positions [0, 1, 2, 3, 8, 9].
    """
    offs = torch.arange(page_size, device=pages.device)
    pos = (pages.to(torch.int64)[:, None] * page_size + offs[None, :]).reshape(-1)
    return pos[pos < seq_len]


def page_summaries(k_layer: torch.Tensor, slots: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max key per page and kv head over a request's positions.

    `slots` are the request's token slots in position order (length L). Returns kmin, kmax [num_pages, H_kv, D]
    in the dtype of `k_layer`; the partial last page summarizes only its real positions.
    """
    keys = k_layer[slots.to(torch.int64)]
    seq_len = keys.shape[0]
    n = num_pages_of(seq_len, page_size)
    pad = n * page_size - seq_len
    if pad:
        kmin_src = torch.cat([keys, keys[-1:].expand(pad, -1, -1)])
    else:
        kmin_src = keys
    paged = kmin_src.reshape(n, page_size, *keys.shape[1:])
    return paged.amin(dim=1), paged.amax(dim=1)


SCORE_RULES = ("bound", "mass")


def page_scores(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    summary_table: torch.Tensor,
    num_pages: torch.Tensor,
    per_head: bool = False,
) -> torch.Tensor:
    """Quest-style upper bound of q.k per page, per kv-head group: `[B, H_kv, max_pages]` float32.

    For q head h and page p: `sum_d max(q_d * kmin_d, q_d * kmax_d)`; the heads of one kv-head group are
    aggregated with max (with `per_head`: not aggregated, `[B, Hq, max_pages]`). Pages at or beyond
    `num_pages[b]` score -inf. Computed in float64, returned as float32.
    """
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    group = hq // hkv
    max_pages = summary_table.shape[1]
    rows = summary_table.to(torch.int64).clamp(min=0)
    lo = kmin[rows].double()  # [B, NP, Hkv, D]
    hi = kmax[rows].double()
    qg = q.double().reshape(b, hkv, group, d)  # [B, Hkv, G, D]
    lo = lo.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, NP, D]
    hi = hi.permute(0, 2, 1, 3)[:, :, None]
    qe = qg[:, :, :, None, :]  # [B, Hkv, G, 1, D]
    s = torch.maximum(qe * lo, qe * hi).sum(-1)  # [B, Hkv, G, NP]
    s = s.reshape(b, hq, max_pages) if per_head else s.amax(dim=2)
    valid = torch.arange(max_pages, device=q.device)[None, :] < num_pages.to(q.device)[:, None]
    s = torch.where(valid[:, None, :], s, torch.full_like(s, float("-inf")))
    return s.float()


def combine_head_scores(
    head_scores: torch.Tensor,
    num_pages: torch.Tensor,
    rule: str,
    scale: float = 1.0,
    num_kv_heads: int | None = None,
) -> torch.Tensor:
    """One score per page from per-query-head bounds `head_scores [B, Hq, max_pages]` (pages at or beyond
    `num_pages[b]` are -inf): `[B, max_pages]`, or with `num_kv_heads` one row per kv-head group (its heads only),
    `[B, H_kv, max_pages]`. Float32 out, computed in float64.

    * `bound`: the max over heads (what `page_scores` returns per group).
    * `mass`: per head, the log-softmax over the request's pages of `bound * scale`; then the log of its sum over
      heads (logsumexp): the attention mass the heads could give each page, so a head that is large everywhere
      does not outrank the one head that peaks on a page. Invalid pages stay -inf.
    """
    if rule not in SCORE_RULES:
        raise ValueError(f"rule: allowed: {', '.join(SCORE_RULES)}; got {rule!r}")
    b, hq, max_pages = head_scores.shape
    groups = 1 if num_kv_heads is None else num_kv_heads
    s = head_scores.double()
    valid = torch.arange(max_pages, device=s.device)[None, :] < num_pages.to(s.device)[:, None]
    if rule == "mass":
        s = torch.where(valid[:, None, :], s * scale, torch.full_like(s, float("-inf")))
        # a request without pages: every entry -inf; log_softmax would give NaN, keep -inf instead
        s = torch.log_softmax(s, dim=-1).nan_to_num(nan=float("-inf"))
        s = torch.logsumexp(s.reshape(b, groups, hq // groups, max_pages), dim=2)
    else:
        s = s.reshape(b, groups, hq // groups, max_pages).amax(dim=2)
    s = torch.where(valid[:, None, :], s, torch.full_like(s, float("-inf")))
    return (s[:, 0] if num_kv_heads is None else s).float()


def select_pages(
    scores: torch.Tensor,
    num_pages: torch.Tensor,
    budget_pages: int,
    sink_pages: int = 0,
    recent_pages: int = 1,
    forced: torch.Tensor | None = None,
    blocked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`budget_pages` pages per request by score, plus the forced ones; sorted ids, fixed shapes.

    `scores [B, max_pages]` (one score per page, already aggregated over kv heads), or `[B, H_kv, max_pages]`:
    one choice per kv-head group (its heads' scores) -> `page_list [B, H_kv, budget_pages]`, with one count per
    request (the same for every group); `forced` / `blocked` stay `[B, max_pages]` and apply to every group.
    Forced: the first
    `sink_pages` pages, the last `recent_pages` pages (>= 1: the tail page is always kept) and the pages set in
    the optional bool mask `forced [B, max_pages]` (e.g. heavy hitters chosen by other leaves). Pages set in
    `blocked [B, max_pages]` (e.g. dropped for good) are never chosen; the tail must not be blocked. Ties go to
    the lower page id; NaN scores rank last. A request keeps every allowed page when it has at most
    `budget_pages` of them. If the forced pages exceed the budget, the higher forced ids are dropped first,
    but never the tail page.
    Returns `page_list [B, budget_pages]` int64 (sorted ascending, unused entries -1) and `page_counts [B]` int64
    (= min(allowed pages, budget_pages): fixed per request and step, whatever the scores).

        pages:   [ sink | .......... middle (by score) .......... | recent ... tail ]
        example: num_pages=10, budget=4, sink=1, recent=1, best middle pages 6 then 3 -> [0, 3, 6, 9]

    Uses only tensor ops with fixed shapes (no host sync), so it can run inside a CUDA graph.
    """
    if recent_pages < 1:
        raise ValueError(f"recent_pages must be >= 1 (the tail page is always kept); got {recent_pages}")
    if budget_pages < sink_pages + recent_pages:
        raise ValueError(
            f"budget_pages={budget_pages} is smaller than the forced pages sink_pages+recent_pages="
            f"{sink_pages + recent_pages}"
        )
    if scores.dim() == 3:  # per kv-head group: each (request, group) row is chosen like a request of its own
        bsz, hkv, max_pages = scores.shape

        def per_row(mask):
            return None if mask is None else mask.repeat_interleave(hkv, dim=0)

        flat, counts = select_pages(scores.reshape(bsz * hkv, max_pages), num_pages.repeat_interleave(hkv),
                                    budget_pages, sink_pages, recent_pages, per_row(forced), per_row(blocked))
        return flat.reshape(bsz, hkv, -1), counts.reshape(bsz, hkv)[:, 0]
    bsz, max_pages = scores.shape
    k = budget_pages
    dev = scores.device
    width = max(max_pages, k)

    def widen(mask):
        mask = mask.to(device=dev, dtype=torch.bool)
        return torch.cat([mask, mask.new_zeros((bsz, width - mask.shape[1]))], dim=1) if mask.shape[1] < width else mask

    big = torch.finfo(torch.float32).max
    s = scores.float().nan_to_num(nan=-big, posinf=big, neginf=-big)  # any allowed page outranks a disallowed one
    if max_pages < width:
        s = torch.cat([s, s.new_full((bsz, width - max_pages), float("-inf"))], dim=1)
    npg = num_pages.to(device=dev, dtype=torch.int64)[:, None]
    pos = torch.arange(width, device=dev)[None, :]
    valid = pos < npg
    if blocked is not None:
        valid = valid & ~widen(blocked)
    tail = pos == npg - 1
    keep = (pos < sink_pages) | (pos >= npg - recent_pages)
    if forced is not None:
        keep = keep | widen(forced)
    # rank: tail (+inf) > other forced (float max) > scored pages > disallowed (-inf)
    key = torch.where(keep, torch.full_like(s, big), s)
    key = torch.where(tail, torch.full_like(s, float("inf")), key)
    key = torch.where(valid, key, torch.full_like(s, float("-inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    counts = torch.clamp(valid.sum(dim=1), max=k)
    used = torch.arange(k, device=dev)[None, :] < counts[:, None]
    chosen = torch.where(used, order, torch.full_like(order, width))
    chosen = torch.sort(chosen, dim=1).values
    page_list = torch.where(chosen == width, torch.full_like(chosen, -1), chosen)
    return page_list, counts


# `select_pages` on group scores `[B, H_kv, max_pages]`: one choice per kv-head group (the name callers know)
select_pages_per_group = select_pages


def routed_decode(
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
) -> torch.Tensor:
    """Float64 decode attention over exactly the positions of each request's listed pages.

    q [B, Hq, D]; GQA: q head h reads kv head h // (Hq // H_kv). `page_list` is [B, K] (one list for all heads)
    or [B, H_kv, K] (one list per kv-head group, the first `page_counts[b]` entries of each used).
    Returns [B, Hq, D] float64.
    """
    bsz, hq, d = q.shape
    hkv = k_buffer.shape[1]
    group = hq // hkv
    per_group = page_list.dim() == 3
    out = torch.empty(bsz, hq, d, dtype=torch.float64, device=q.device)
    for b in range(bsz):
        n = int(page_counts[b])
        for h in range(hkv if per_group else 1):
            heads = slice(h * group, (h + 1) * group) if per_group else slice(0, hq)
            kv_heads = slice(h, h + 1) if per_group else slice(0, hkv)
            pages = (page_list[b, h, :n] if per_group else page_list[b, :n]).to(torch.int64)
            pos = page_positions(pages, int(seq_lens[b]), page_size)
            slots = req_to_token[int(req_pool_indices[b]), pos].to(torch.int64)
            k = k_buffer[slots][:, kv_heads].double().repeat_interleave(group, dim=1)  # [T, heads, D]
            v = v_buffer[slots][:, kv_heads].double().repeat_interleave(group, dim=1)
            logits = torch.einsum("hd,thd->ht", q[b, heads].double(), k) * scale
            out[b, heads] = torch.einsum("ht,thd->hd", torch.softmax(logits, dim=-1), v)
    return out


def gather_pages(src: torch.Tensor, page_ids: torch.Tensor, page_size: int) -> torch.Tensor:
    """Rows of the `page_size`-row pages `page_ids` of `src [num_rows, ...]`, concatenated in list order."""
    rows = (page_ids.to(torch.int64)[:, None] * page_size + torch.arange(page_size, device=src.device)).reshape(-1)
    return src[rows]


def scatter_pages(dst: torch.Tensor, page_ids: torch.Tensor, staged: torch.Tensor, page_size: int) -> torch.Tensor:
    """Write `staged [len(page_ids)*page_size, ...]` into pages `page_ids` of `dst` (in place; returns dst)."""
    rows = (page_ids.to(torch.int64)[:, None] * page_size + torch.arange(page_size, device=dst.device)).reshape(-1)
    dst[rows] = staged.to(dst.dtype)
    return dst
