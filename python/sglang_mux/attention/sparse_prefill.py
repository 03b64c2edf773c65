"""The ``sparse_prefill`` leaf: block-sparse causal prefill attention for long prompts (torch, CPU path).

Keys and queries are cut into blocks of ``B`` tokens aligned to absolute positions (block ``j`` holds
positions ``[j*B, (j+1)*B)``), so a chunk of a chunked prefill sees the same blocks as a one-shot prefill.
Per KV head, every query block attends to a set of key blocks; only those blocks are gathered and computed
(token-level causal mask inside them). Nothing of size ``queries x keys`` is ever materialised::

    key blocks ->  0   1   2   3   4   5   6   7
    query blk 7  [ S | . | x | . | . | W | W | W ]   S: sinks   W: local window (ends at the diagonal)
    query blk 6  [ S | x | . | . | W | W | W ]       x: chosen from the prompt   .: skipped

Worked example (B=64, sink 64, window 192, prefix 0, 512 tokens): query block 7 always reads key blocks
0 (sink) and 5, 6, 7 (window); the pattern adds the blocks it chooses among 1-4.

The chosen blocks come from the prompt itself, per KV head (the query heads of a GQA group share the choice,
so each gathered key block serves the whole group). Two estimates were measured (``pattern`` argument):

* ``topk`` (FlexPrefill-style, the default): per query block, the attention of its mean query to the mean key
  of every causal key block (softmax over blocks, averaged over the group's query heads); the blocks are kept
  from the largest until they hold ``keep`` of that mass.
* ``vertical_slash`` (MInference-style): the last ``LAST_Q`` queries of the chunk attend to every key; the
  key columns and the diagonals (query - key offsets) holding ``keep`` of that mass are kept, and every key
  block a kept column or diagonal crosses is read.

Measured (float32, one thread) on the tiny fixture model's own post-RoPE Q/K/V (``models/tiny``: 3 layers,
8 query / 4 KV heads; one 4,081-token prompt each of niah_single, niah_multikey and vt; block 64, sink 64,
window 256), against dense causal attention, mean over the 9 layer-prompts: relative L2 error of the output,
share of the true attention mass inside the pattern, share of the causal key blocks computed, estimate time:

    pattern          keep   rel. error   mass recall   blocks   estimate
    topk             0.80   0.118        0.834         0.53     6 ms
    topk             0.90   0.081        0.912         0.70     6 ms
    topk             0.95   0.054        0.955         0.82     26 ms
    vertical_slash   0.30   0.154        0.739         0.33     26 ms
    vertical_slash   0.50   0.072        0.896         0.61     40 ms
    vertical_slash   0.70   0.015        0.993         0.93     39 ms

At equal blocks the two are close (vertical-slash a little ahead at ~0.6-0.7 of the blocks on this model, a
one-shot prefill). ``topk`` is the default because its choice for a query block depends only on that block's
queries and the keys before it: a chunked prefill chooses exactly what a one-shot prefill chooses (chunk
boundaries on block boundaries), so chunked == one-shot is a test here, not an approximation, whereas
vertical-slash re-estimates from the last queries of every chunk (SGLang cuts long prompts into chunks) and
its estimate costs ``64 x L`` scores per head against topk's ``(L/B)^2``. At 16K tokens (past the tiny model's
trained context) its attention is nearly flat and both patterns lose most of the output (rel. error 0.36-0.78
at 0.46-0.92 of the blocks): sparse prefill is for models whose long-context attention is concentrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_mux.config import SPARSE_PREFILL_PATTERNS as PATTERNS
LAST_Q = 64  # queries of the chunk's end that the vertical-slash estimate reads
_BATCH_ELEMS = 1 << 24  # score elements computed at once (query blocks are batched to stay under it)


@dataclass(frozen=True)
class SparsePrefillParams:
    """``block``: tokens per block; ``sink_tokens`` / ``window_tokens``: always read (rounded up to blocks; the
    window ends at the diagonal block); ``keep``: share of the estimated attention mass the chosen blocks must
    hold (1.0: every causal block, i.e. exact causal attention); ``pattern``: one of :data:`PATTERNS`."""

    block: int = 64
    sink_tokens: int = 64
    window_tokens: int = 256
    keep: float = 0.9
    pattern: str = "topk"

    @classmethod
    def from_config(cls, cfg) -> "SparsePrefillParams":
        """From a :class:`~sglang_mux.config.MuxConfig` (its ``--mux-sparse-prefill-*`` flags)."""
        return cls(
            block=cfg.sparse_prefill_block, sink_tokens=cfg.sparse_prefill_sink_tokens,
            window_tokens=cfg.sparse_prefill_window_tokens, keep=cfg.sparse_prefill_keep,
            pattern=cfg.sparse_prefill_pattern,
        )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_grid(prefix_len: int, n: int, block: int) -> tuple[int, int, int]:
    """``(first query block, query blocks, key blocks)`` for queries at ``[prefix_len, prefix_len + n)`` over keys
    ``[0, prefix_len + n)``. Example: prefix 100, n 60, block 64 -> (1, 2, 3): queries sit in blocks 1 and 2."""
    L = prefix_len + n
    qb0 = prefix_len // block
    return qb0, _cdiv(L, block) - qb0, _cdiv(L, block)


def causal_blocks(prefix_len: int, n: int, block: int, device=None) -> torch.Tensor:
    """``[nqb, nkb]`` bool: every key block at or before each query block (the dense causal pattern)."""
    qb0, nqb, nkb = block_grid(prefix_len, n, block)
    qi = torch.arange(qb0, qb0 + nqb, device=device).view(-1, 1)
    return torch.arange(nkb, device=device).view(1, -1) <= qi


def fixed_blocks(prefix_len: int, n: int, params: SparsePrefillParams, device=None) -> torch.Tensor:
    """``[nqb, nkb]`` bool: the sink blocks and the local window (``window_tokens`` rounded up, ending at the
    diagonal block; the diagonal is always read, so every query sees at least itself)."""
    B = params.block
    qb0, nqb, nkb = block_grid(prefix_len, n, B)
    qi = torch.arange(qb0, qb0 + nqb, device=device).view(-1, 1)
    kj = torch.arange(nkb, device=device).view(1, -1)
    sinks = kj < _cdiv(params.sink_tokens, B)
    local = (kj > qi - max(1, _cdiv(params.window_tokens, B))) & (kj <= qi)
    return (sinks & (kj <= qi)) | local


def _mass_cover(scores: torch.Tensor, keep) -> torch.Tensor:
    """Bool of the same shape as ``scores [..., m]`` (non-negative): the largest entries along the last dim until
    they hold ``keep`` of its sum (at least one where the sum is > 0). ``keep``: a float or ``[..., 1]``."""
    vals, order = torch.sort(scores, dim=-1, descending=True)
    total = vals.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(vals.dtype).tiny)
    before = (torch.cumsum(vals, dim=-1) - vals) / total  # mass held by the larger entries
    take = (before < keep) & (vals > 0)
    return torch.zeros_like(take).scatter(-1, order, take)


def topk_pattern(q, k, prefix_len: int, scale: float, params: SparsePrefillParams) -> torch.Tensor:
    """FlexPrefill-style estimate from pooled queries/keys: ``[Hk, nqb, nkb]`` bool (fixed blocks included).

    ``q [n, Hq, D]`` at positions ``[prefix_len, prefix_len + n)``, ``k [L, Hk, D]`` at ``[0, L)``.
    """
    n, hq, d = q.shape
    L, hk, _ = k.shape
    B, g = params.block, hq // hk
    qb0, nqb, nkb = block_grid(prefix_len, n, B)
    fixed = fixed_blocks(prefix_len, n, params, q.device)
    causal = causal_blocks(prefix_len, n, B, q.device)
    if params.keep >= 1.0:
        return causal.expand(hk, nqb, nkb).clone()
    qpos = torch.arange(prefix_len, prefix_len + n, device=q.device)
    qblk = qpos // B - qb0
    qsum = torch.zeros(nqb, hq, d, dtype=torch.float32, device=q.device).index_add_(0, qblk, q.float())
    qmean = qsum / torch.bincount(qblk, minlength=nqb).clamp_min(1).view(-1, 1, 1)
    kpad = torch.zeros(nkb * B, hk, d, dtype=torch.float32, device=k.device)
    kpad[:L] = k.float()
    kcount = torch.full((nkb,), B, device=k.device)
    kcount[-1] = L - (nkb - 1) * B
    kmean = kpad.view(nkb, B, hk, d).sum(1) / kcount.view(-1, 1, 1)
    logits = torch.einsum("qhgd,khd->hgqk", qmean.view(nqb, hk, g, d), kmean) * scale
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(dim=1)  # [Hk, nqb, nkb]
    probs = probs.masked_fill(fixed, 0.0)  # choose among the blocks not read anyway
    rest_share = probs.sum(-1, keepdim=True)
    # `keep` is of the whole estimated mass; the fixed blocks already hold 1 - rest_share of it.
    need = (params.keep - (1.0 - rest_share)).clamp_min(0.0) / rest_share.clamp_min(1e-30)
    return (_mass_cover(probs, need) & causal) | fixed


def vertical_slash_pattern(q, k, prefix_len: int, scale: float, params: SparsePrefillParams) -> torch.Tensor:
    """MInference-style estimate from the chunk's last ``LAST_Q`` queries: ``[Hk, nqb, nkb]`` bool.

    The kept key columns become every causal key block holding one; a kept diagonal (offset ``o = q - k``)
    crosses, in query block ``i`` (positions ``a..b``), the key blocks of positions ``a-o .. b-o``.
    """
    n, hq, d = q.shape
    L, hk, _ = k.shape
    B, g = params.block, hq // hk
    qb0, nqb, nkb = block_grid(prefix_len, n, B)
    causal = causal_blocks(prefix_len, n, B, q.device)
    fixed = fixed_blocks(prefix_len, n, params, q.device)
    if params.keep >= 1.0:
        return causal.expand(hk, nqb, nkb).clone()
    w = min(LAST_Q, n)
    qpos = torch.arange(prefix_len + n - w, prefix_len + n, device=q.device)
    logits = torch.einsum("whgd,lhd->hgwl", q[-w:].float().view(w, hk, g, d), k.float()) * scale
    kpos = torch.arange(L, device=q.device)
    logits = logits.masked_fill(kpos.view(1, -1) > qpos.view(-1, 1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).sum(dim=1)  # [Hk, w, L]
    vertical = _mass_cover(probs.sum(dim=1), params.keep)  # [Hk, L]
    offset = (qpos.view(-1, 1) - kpos.view(1, -1)).clamp_min(0)  # [w, L]
    slash_mass = torch.zeros(hk, L, dtype=probs.dtype, device=q.device)
    slash_mass.index_add_(1, offset.reshape(-1), probs.reshape(hk, -1))
    slash = _mass_cover(slash_mass, params.keep)  # [Hk, L] over offsets
    col_blocks = torch.zeros(hk, nkb, dtype=torch.bool, device=q.device)
    vh, vcol = torch.nonzero(vertical, as_tuple=True)
    col_blocks[vh, vcol // B] = True
    out = col_blocks.view(hk, 1, nkb) & causal
    heads, offs = torch.nonzero(slash, as_tuple=True)
    if heads.numel():
        qi = torch.arange(qb0, qb0 + nqb, device=q.device)
        a = (qi * B).clamp_min(prefix_len).view(1, -1) - offs.view(-1, 1)  # [n_diag, nqb] first key position
        b = ((qi + 1) * B - 1).clamp_max(L - 1).view(1, -1) - offs.view(-1, 1)
        for lo_hi in (a, b):  # a diagonal spans at most two key blocks of a query block: those of its ends
            ok = lo_hi >= 0
            hh = heads.view(-1, 1).expand_as(lo_hi)[ok]
            ii = torch.arange(nqb, device=q.device).view(1, -1).expand_as(lo_hi)[ok]
            out[hh, ii, lo_hi[ok] // B] = True
    return (out & causal) | fixed


def estimate_pattern(q, k, prefix_len: int, scale: float, params: SparsePrefillParams) -> torch.Tensor:
    if params.pattern == "topk":
        return topk_pattern(q, k, prefix_len, scale, params)
    if params.pattern == "vertical_slash":
        return vertical_slash_pattern(q, k, prefix_len, scale, params)
    raise ValueError(f"sparse prefill pattern: allowed: {', '.join(PATTERNS)}; got {params.pattern!r}")


def block_sparse_attention(q, k, v, prefix_len: int, scale: float, pattern: torch.Tensor, block: int):
    """Causal attention of ``q [n, Hq, D]`` (positions ``[prefix_len, prefix_len + n)``) over ``k [L, Hk, D]``,
    ``v [L, Hk, Dv]`` (positions ``[0, L)``, ``L = prefix_len + n``), reading only the key blocks ``pattern
    [Hk, nqb, nkb]`` allows. Returns ``(out [n, Hq, Dv], key blocks computed)``; the count includes the padding
    of a batch of query blocks to its largest block list (at most 1/8), i.e. it is the work really done.

    Per KV head, query blocks are sorted by how many key blocks they read and batched; each batch gathers its
    key blocks (``[nb, kmax*B, D]``), computes scores only against them, masks the token-level causal edge and
    the padding, and softmaxes over what it gathered.
    """
    n, hq, d = q.shape
    L, hk, dv = v.shape
    B, g = block, hq // hk
    assert L == prefix_len + n, (L, prefix_len, n)
    qb0, nqb, nkb = block_grid(prefix_len, n, B)
    dt = q.dtype
    # Queries padded to whole blocks at their absolute positions; rows outside [prefix_len, L) are dropped.
    q_off = prefix_len - qb0 * B
    qpad = q.new_zeros(nqb * B, hk, g, d)
    qpad[q_off : q_off + n] = q.view(n, hk, g, d)
    # Keys/values per head as rows of whole blocks ([Hk, nkb, B*D]): a block list is one index_select of rows.
    kpad = k.new_zeros(hk, nkb * B, d, dtype=dt)
    kpad[:, :L] = k.to(dt).transpose(0, 1)
    vpad = v.new_zeros(hk, nkb * B, dv, dtype=dt)
    vpad[:, :L] = v.to(dt).transpose(0, 1)
    kpad, vpad = kpad.view(hk, nkb, B * d), vpad.view(hk, nkb, B * dv)
    qpad = qpad.view(nqb, B, hk, g, d).permute(2, 0, 3, 1, 4).contiguous()  # [Hk, nqb, g, B, d]
    out = q.new_empty(hk, nqb, g, B, dv)
    arangeB = torch.arange(B, device=q.device)
    zero, neg_inf = torch.tensor(0.0, dtype=dt, device=q.device), torch.tensor(float("-inf"), dtype=dt, device=q.device)
    computed = 0
    for h in range(hk):
        sel = pattern[h]
        counts = sel.sum(dim=1)
        order = torch.argsort(counts, descending=True, stable=True)  # a batch's first row reads the most
        sorted_counts = counts[order]
        # Key-block lists, selected first in ascending block order (sorting False < True, then by index).
        ranked = torch.argsort((~sel).to(torch.int8) * nkb + torch.arange(nkb, device=q.device), dim=1)
        i = 0
        while i < nqb:
            kmax = int(sorted_counts[i])
            nb = max(1, min(nqb - i, _BATCH_ELEMS // (g * B * B * max(kmax, 1))))
            # Only rows reading at least 7/8 of kmax blocks join the batch: padding wastes at most 1/8.
            nb = max(1, int((sorted_counts[i : i + nb] * 8 >= kmax * 7).sum()))
            rows = order[i : i + nb]
            valid = torch.arange(kmax, device=q.device).view(1, -1) < counts[rows].view(-1, 1)
            idx = ranked[rows, :kmax]  # [nb, kmax]; padding repeats a row's first block (masked out below)
            idx = torch.where(valid, idx, idx[:, :1])
            kg = torch.index_select(kpad[h], 0, idx.reshape(-1)).view(nb, 1, kmax * B, d)
            vg = torch.index_select(vpad[h], 0, idx.reshape(-1)).view(nb, 1, kmax * B, dv)
            kpos = (idx.view(nb, kmax, 1) * B + arangeB).view(nb, 1, kmax * B)
            qpos = ((rows + qb0) * B).view(nb, 1) + arangeB.view(1, B)  # [nb, B]
            allowed = (kpos <= qpos.view(nb, B, 1)) & valid.repeat_interleave(B, dim=1).view(nb, 1, kmax * B)
            bias = torch.where(allowed, zero, neg_inf)
            # Fused kernel over the gathered blocks only (an additive mask: the causal edge and the padding).
            out[h, rows] = scaled_dot_product_attention(
                qpad[h, rows], kg, vg, attn_mask=bias.unsqueeze(1), scale=scale, enable_gqa=True
            )  # [nb, g, B, dv]
            computed += nb * kmax
            i += nb
    out = out.permute(1, 3, 0, 2, 4).reshape(nqb * B, hq, dv)
    return out[q_off : q_off + n], computed


def dense_block_count(prefix_len: int, n: int, block: int, kv_heads: int) -> int:
    """Key blocks a dense causal prefill of the same grid computes (for the work-skipped ratio)."""
    return int(causal_blocks(prefix_len, n, block).sum()) * kv_heads


def sparse_prefill_attention(q, k, v, prefix_len: int, scale: float, params: SparsePrefillParams):
    """Estimate the pattern from the prompt, then attend block-sparsely. Returns ``(out, pattern, computed)``."""
    pattern = estimate_pattern(q, k, prefix_len, scale, params)
    out, computed = block_sparse_attention(q, k, v, prefix_len, scale, pattern, params.block)
    return out, pattern, computed
