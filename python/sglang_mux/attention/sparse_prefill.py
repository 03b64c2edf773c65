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
so each gathered key block serves the whole group). Two estimates were measured (``pattern``):

* ``vertical_slash`` (MInference-style, the default): the last ``LAST_Q`` queries of the chunk attend to every
  key; the key columns and the diagonals (query - key offsets) holding ``keep`` of that mass are kept, and every
  key block a kept column or diagonal crosses is read.
* ``topk`` (FlexPrefill-style): per query block, the attention of its mean query to the mean key of every causal
  key block (softmax over blocks, averaged over the group's query heads); the blocks are kept from the largest
  until they hold ``keep`` of that mass.

Measured (float32, one thread) on the tiny fixture model (``models/tiny``: 3 layers, 8 query / 4 KV heads; block
64, sink 64, window 256). Output error: its own post-RoPE Q/K/V on one 4,081-token prompt each of niah_single,
niah_multikey and vt, against dense causal attention, mean over the 9 layer-prompts (relative L2 error, share of
the true attention mass inside the pattern, share of the causal key blocks computed, estimate time):

    pattern          keep   rel. error   mass recall   blocks   estimate
    topk             0.80   0.118        0.834         0.53     6 ms
    topk             0.90   0.081        0.912         0.70     6 ms
    topk             0.95   0.054        0.955         0.82     26 ms
    vertical_slash   0.30   0.154        0.739         0.33     26 ms
    vertical_slash   0.50   0.072        0.896         0.61     40 ms
    vertical_slash   0.70   0.015        0.993         0.93     39 ms

Task accuracy (HF greedy, this module as the model's prefill attention, exact decode; 20 samples a task at 4K;
exact match niah_single / niah_multikey / vt): dense 1.00 / 0.95 / 0.85; vertical_slash keep 0.5: 1.00 / 0.95 /
0.80; topk keep 0.9: 0.70 / 0.75 / 0.55; topk keep 0.95: 0.80 / 0.75 / 0.70. So ``vertical_slash`` is the default:
with fewer blocks than topk at 0.9 it keeps the needle tasks, because its estimate comes from the queries at the
end of the prompt (the question), which is where the answer is read; pooled block means blur a single needle
token. What topk has for it: its choice for a query block depends only on that block's queries and the keys
before it, so a chunked prefill chooses exactly what a one-shot prefill does (a test); vertical-slash
re-estimates from the last queries of every chunk. At 16K tokens (past the tiny model's trained context) its
attention is nearly flat and both lose much of the output (rel. error 0.36-0.78 at 0.46-0.92 of the blocks).

Cost on CPU (one thread, 8K tokens, 8 query / 4 KV heads, head dim 64, block 64): the full pattern takes about
1.6x the fused dense causal kernel, 35 % of the blocks about 0.6x; the pattern estimate is a few % of that. So
attention time falls only below ~60 % of the blocks, and a 3x saving needs ~20 %.
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
    keep: float = 0.5
    pattern: str = "vertical_slash"

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


def _attend_lse(q, k, v, scale: float, causal: bool):
    """Attention of ``q [N, g, B, D]`` over ``k/v [N, 1, M, D]`` (``causal``: top-left aligned, M == B) and its
    log-sum-exp ``[N, g, B]``, so that partial results over disjoint key sets can be merged exactly. On CPU this is
    the fused flash kernel (which returns the log-sum-exp); elsewhere plain torch."""
    n, g, b = q.shape[0], q.shape[1], q.shape[2]
    if q.device.type == "cpu" and q.shape[-1] == v.shape[-1]:  # the fused kernel needs one head size
        if causal:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k.expand(n, g, -1, -1), v.expand(n, g, -1, -1), 0.0, True, scale=scale
            )[:2]
            return out, lse
        # No mask: the group's query heads share the keys, so they attend as one longer query (fewer, larger calls).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(n, 1, g * b, -1), k, v, 0.0, False, scale=scale
        )[:2]
        return out.view(n, g, b, -1), lse.view(n, g, b)
    s = torch.einsum("ngbd,nkd->ngbk", q, k[:, 0]) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("ngbk,nkd->ngbd", torch.exp(s - lse.unsqueeze(-1)), v[:, 0]), lse


def block_sparse_attention(q, k, v, prefix_len: int, scale: float, pattern: torch.Tensor, block: int):
    """Causal attention of ``q [n, Hq, D]`` (positions ``[prefix_len, prefix_len + n)``) over ``k [L, Hk, D]``,
    ``v [L, Hk, Dv]`` (positions ``[0, L)``, ``L = prefix_len + n``), reading only the key blocks ``pattern
    [Hk, nqb, nkb]`` allows (blocks after a query block's own are ignored; each query block must read at least
    one block). Returns ``(out [n, Hq, Dv], key blocks computed)``.

    Per KV head, each query block's work is split in two exact parts merged by their log-sum-exp: its diagonal
    block (causal inside the block: queries and keys share the block's absolute positions) and its other chosen
    blocks, which lie wholly before it and need no mask. Query blocks reading the same number of other blocks are
    batched: their blocks are gathered (``[nb, c*B, D]``, one ``index_select`` of whole-block rows) and attended
    by the fused kernel, so only chosen blocks are ever read and no score outside them is computed.
    """
    n, hq, d = q.shape
    L, hk, dv = v.shape
    B, g = block, hq // hk
    assert L == prefix_len + n, (L, prefix_len, n)
    qb0, nqb, nkb = block_grid(prefix_len, n, B)
    dt = q.dtype
    dev = q.device
    # Queries padded to whole blocks at their absolute positions; rows outside [prefix_len, L) are dropped.
    q_off = prefix_len - qb0 * B
    qpad = q.new_zeros(nqb * B, hk, g, d)
    qpad[q_off : q_off + n] = q.view(n, hk, g, d)
    qpad = qpad.view(nqb, B, hk, g, d).permute(2, 0, 3, 1, 4).contiguous()  # [Hk, nqb, g, B, d]
    # Keys/values per head as rows of whole blocks ([Hk, nkb, B*D]): a block list is one index_select of rows.
    # Padded keys (positions >= L) sit only in the last block, the last query block's diagonal: causally masked.
    kpad = k.new_zeros(hk, nkb * B, d, dtype=dt)
    kpad[:, :L] = k.to(dt).transpose(0, 1)
    vpad = v.new_zeros(hk, nkb * B, dv, dtype=dt)
    vpad[:, :L] = v.to(dt).transpose(0, 1)
    kpad, vpad = kpad.view(hk, nkb, B * d), vpad.view(hk, nkb, B * dv)
    out = q.new_empty(hk, nqb, g, B, dv)
    rows_all = torch.arange(nqb, device=dev)
    diag_blk = rows_all + qb0
    before = torch.arange(nkb, device=dev).view(1, -1) < diag_blk.view(-1, 1)  # [nqb, nkb]
    computed = 0
    for h in range(hk):
        sel = pattern[h]
        on_diag = sel[rows_all, diag_blk]
        other = sel & before
        o_d = q.new_zeros(nqb, g, B, dv)
        lse_d = torch.full((nqb, g, B), float("-inf"), dtype=dt, device=dev)
        if bool(on_diag.any()):
            r = torch.nonzero(on_diag).flatten()
            o, lse = _attend_lse(qpad[h, r], kpad[h, diag_blk[r]].view(-1, 1, B, d),
                                 vpad[h, diag_blk[r]].view(-1, 1, B, dv), scale, causal=True)
            o_d[r], lse_d[r] = o.to(dt), lse.to(dt)
            computed += int(r.numel())
        o_o = q.new_zeros(nqb, g, B, dv)
        lse_o = torch.full((nqb, g, B), float("-inf"), dtype=dt, device=dev)
        counts = other.sum(dim=1)
        # Block lists, chosen first in ascending block order (sorting False < True, then by index).
        ranked = torch.argsort((~other).to(torch.int16) * nkb + torch.arange(nkb, device=dev), dim=1)
        for c in torch.unique(counts).tolist():
            if c == 0:
                continue
            r = torch.nonzero(counts == c).flatten()
            for lo in range(0, r.numel(), max(1, _BATCH_ELEMS // (g * B * B * c))):
                rr = r[lo : lo + max(1, _BATCH_ELEMS // (g * B * B * c))]
                idx = ranked[rr, :c].reshape(-1)
                kg = torch.index_select(kpad[h], 0, idx).view(-1, 1, c * B, d)
                vg = torch.index_select(vpad[h], 0, idx).view(-1, 1, c * B, dv)
                o, lse = _attend_lse(qpad[h, rr], kg, vg, scale, causal=False)
                o_o[rr], lse_o[rr] = o.to(dt), lse.to(dt)
                computed += int(rr.numel()) * c
        # Exact merge of the two disjoint parts: softmax over their union.
        m = torch.maximum(lse_d, lse_o)
        w_d, w_o = torch.exp(lse_d - m), torch.exp(lse_o - m)
        out[h] = (o_d * w_d.unsqueeze(-1) + o_o * w_o.unsqueeze(-1)) / (w_d + w_o).unsqueeze(-1)
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


# ------------------------------------------------------------------ the extend path of the mux attention backend
def sparse_prefill_rows(layer, fb, k, v, save_kv_cache: bool, registry, mux_config) -> list[bool] | None:
    """Per request of an extend batch, whether its attention is block-sparse (the sparse_prefill leaf);
    ``None`` when none is (the whole batch is then delegated unchanged). The rule is
    ``MuxRequestOptions.prefills_sparsely`` on the tokens prefilled so far (matched prefix + this chunk):
    with chunked prefill, the chunks of a prompt before it reaches the threshold are exact. Decoder
    self-attention without a sliding window only."""
    if (
        fb.rids is None or not save_kv_cache or k is None or v is None or layer.is_cross_attention
        or getattr(layer, "sliding_window_size", -1) not in (None, -1)
        or getattr(getattr(layer, "attn_type", None), "name", "DECODER") != "DECODER"
    ):
        return None
    seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
    rows = [registry.get(rid).options.prefills_sparsely(mux_config, int(L)) for rid, L in zip(fb.rids, seq_lens)]
    return rows if any(rows) else None


def extend_with_sparse_prefill(q, layer, fb, sparse: list[bool], k_buf, v_buf, req_to_token, config_of,
                               blocks: list[int] | None = None) -> torch.Tensor:
    """The extend attention of a batch holding at least one sparse-prefill request, once its new KV is in the pool
    (``k_buf`` / ``v_buf``: the layer's buffers): each request attends over its prefix + chunk read from the pool
    through ``req_to_token``, block-sparse (``sparse`` row True; its effective config from ``config_of(rid)``) or,
    for the others, exact causal attention. ``blocks``: ``[computed, dense]`` key blocks (all KV heads), summed
    over the sparse prefills into it when given."""
    hq, hk, d, dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
    qv = q.view(-1, hq, d)
    o = q.new_empty((qv.shape[0], hq * dv))
    seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
    rows = fb.req_pool_indices.tolist()
    start = 0
    for i, (row, L) in enumerate(zip(rows, seq_lens)):
        n, L = int(fb.extend_seq_lens_cpu[i]), int(L)
        prefix = L - n
        if n == 0:
            continue
        slots = req_to_token[row, :L].long()
        keys, values = k_buf[slots].to(qv.dtype), v_buf[slots].to(qv.dtype)
        q_req = qv[start : start + n]
        if sparse[i]:
            params = SparsePrefillParams.from_config(config_of(fb.rids[i]))
            out, _, computed = sparse_prefill_attention(q_req, keys, values, prefix, layer.scaling, params)
            if blocks is not None:
                blocks[0] += computed
                blocks[1] += dense_block_count(prefix, n, params.block, hk)
        else:  # exact; an explicit [n, L] mask only when a prefix offsets the queries
            causal = None
            if prefix:
                causal = torch.arange(L, device=q.device).view(1, -1) <= torch.arange(prefix, L, device=q.device).view(-1, 1)
            out = scaled_dot_product_attention(
                q_req.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0), attn_mask=causal, is_causal=causal is None,
                scale=layer.scaling, enable_gqa=hq != hk,
            )[0].transpose(0, 1)
        o[start : start + n] = out.reshape(n, hq * dv).to(o.dtype)
        start += n
    return o
