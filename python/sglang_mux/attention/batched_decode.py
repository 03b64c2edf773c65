"""The routed decode of a whole batch in one attention call per layer: pure torch functions.

Each routed request reads its own sorted pages (chosen per request by the leaves); they are laid out as one
padded block per request, ``P`` token slots per page, so one gather and one masked float32 attention serve the
batch, instead of one gather and one ``attend`` per request::

    request 0  L=37, pages [0, 2]        tokens  [ 0 .. 15 | 32 33 34 35 36  x .. x ]
    request 1  L=70, pages [0, 3, 4]     tokens  [ 0 .. 15 | 48 .. 63 | 64 .. 69  x .. x ]
               (P=16, K=3 page blocks)   x = masked: past the request's length, or a padding page block

    pages  [B, K]           page ids, padded (padding blocks are masked, whatever id they hold)
    slots  [B, K*P]         req_to_token[row, page * P + j]; masked entries read slot 0 (any valid slot)
    k, v   [B, K*P, Hkv, D] one index_select each
    out    softmax(q . k * scale, masked) . v        float32 like ``routed_decode.attend``: [B, Hq, Dv]
    probs  [B, Hq, K*P]     0 at masked tokens; per page (mean over heads, summed over the block) they are
                            the H2O mass ``importance.accumulate_decode_mass`` adds to the heavy scores

Exact requests of a mixed batch go through :func:`padded_exact_attention`: positions ``0..L-1`` padded to the
longest, one masked SDPA in the model's dtype (the per-request path's math, so they stay as stock computes them).
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_mux.attention.routed_decode import attend, page_positions

CHUNK = 1  # requests per float32 product in batched_attend (see there)


def pad_pages(pages: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request page lists -> ``(pages [B, K] int64, counts [B] int64)``, padded with page 0 (K >= 1)."""
    counts = torch.tensor([int(p.numel()) for p in pages], dtype=torch.long, device=device)
    k = max(1, max((int(p.numel()) for p in pages), default=0))
    out = torch.zeros((len(pages), k), dtype=torch.long, device=device)
    for i, p in enumerate(pages):
        out[i, : p.numel()] = p
    return out, counts


def page_block_slots(
    req_to_token: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, pages: torch.Tensor, counts: torch.Tensor,
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV slots ``[B, K*P]`` (int64) of the page blocks and which of them are real tokens (``valid``, bool).

    A token is valid when its page block is one of the request's ``counts[b]`` pages and its position is below
    ``seq_lens[b]``; the others read slot 0. ``rows``: the requests' ``req_to_token`` rows.
    """
    b, k = pages.shape
    P = page_size
    width = req_to_token.shape[1]
    pos = (pages.unsqueeze(-1) * P + torch.arange(P, device=pages.device)).view(b, k * P)
    blocks = torch.arange(k, device=pages.device).view(1, k, 1).expand(b, k, P).reshape(b, k * P)
    valid = (blocks < counts.view(-1, 1)) & (pos < seq_lens.view(-1, 1))
    flat = rows.view(-1, 1).long() * width + pos.clamp(max=width - 1)
    slots = torch.index_select(req_to_token.view(-1), 0, flat.view(-1)).view(b, k * P).long()
    return slots.masked_fill_(~valid, 0), valid


def gather_rows(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``buf[slots]`` for ``slots`` of any shape -> ``slots.shape + buf.shape[1:]``: one index_select (2-byte
    dtypes read as int16, which CPU index_select copies about twice as fast as bfloat16/float16)."""
    src = buf.view(torch.int16) if buf.element_size() == 2 and buf.dtype.is_floating_point else buf
    out = torch.index_select(src, 0, slots.reshape(-1))
    if out.dtype != buf.dtype:
        out = out.view(buf.dtype)
    return out.view(*slots.shape, *buf.shape[1:])


def batched_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked decode attention of a batch: ``(out [B, Hq, Dv], probs [B, Hq, N])`` in float32.

    ``q: [B, Hq, D]``, ``k: [B, N, Hkv, D]``, ``v: [B, N, Hkv, Dv]``, ``valid: [B, N]`` (GQA: q head h reads kv
    head ``h // (Hq / Hkv)``). Row b equals ``routed_decode.attend(q[b], k[b, valid[b]], v[b, valid[b]], scale)``
    with ``probs`` 0 at the masked tokens; a row with no valid token gives zeros.
    """
    b, hq, d = q.shape
    n, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    # Each request's KV heads side by side ([N, Hkv*D], contiguous as gathered) against a block-diagonal query
    # ([Hkv*D, Hq]: q head h only sees the D columns of its kv head): one bmm per product and no transposed copy
    # of K or V. The zero blocks add exact zeros; the products of the other heads are computed and dropped.
    eye = torch.eye(hkv, dtype=torch.float32, device=q.device).view(1, hkv, 1, hkv, 1)
    q_block = (q.reshape(b, hkv, g, d).float().transpose(2, 3).unsqueeze(3) * eye).reshape(b, hkv * d, hq)
    logits = torch.empty((b, n, hq), dtype=torch.float32, device=q.device)
    for i in range(0, b, CHUNK):  # float32 copies of a few requests' K at a time stay in cache for the product
        torch.bmm(k[i : i + CHUNK].float().view(-1, n, hkv * d), q_block[i : i + CHUNK], out=logits[i : i + CHUNK])
    logits = logits.transpose(1, 2).mul_(scale)  # [B, Hq, N]
    logits.masked_fill_(~valid.view(b, 1, n), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        probs[empty] = 0.0
    every = torch.empty((b, hq, hkv * dv), dtype=torch.float32, device=q.device)
    for i in range(0, b, CHUNK):
        torch.bmm(probs[i : i + CHUNK], v[i : i + CHUNK].float().view(-1, n, hkv * dv), out=every[i : i + CHUNK])
    every = every.view(b, hkv, g, hkv, dv)
    out = torch.diagonal(every, dim1=1, dim2=3).permute(0, 3, 1, 2)  # q head h with its own kv head only
    return out.reshape(b, hq, dv), probs


def page_block_mass(probs: torch.Tensor, page_size: int) -> torch.Tensor:
    """Per page block, the attention mass averaged over heads: ``probs [B, Hq, K*P]`` -> ``[B, K]``. Adding
    ``mass[b, :counts[b]]`` at ``pages[b, :counts[b]]`` is what ``accumulate_decode_mass`` adds per token."""
    b, _, n = probs.shape
    return probs.mean(dim=1).view(b, n // page_size, page_size).sum(dim=-1)


def _mass_by_page(pages: torch.Tensor, positions: torch.Tensor, token_mass: torch.Tensor, page_size: int) -> torch.Tensor:
    """Per page of ``pages`` (sorted), the attention mass of the tokens at ``positions`` (``token_mass``: their
    mass, mean over heads; every position on one of ``pages``)."""
    idx = torch.searchsorted(pages, positions // page_size)
    return torch.zeros(pages.numel(), dtype=torch.float32, device=token_mass.device).index_add_(
        0, idx, token_mass.float())


def padded_exact_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """Full attention of exact requests in one masked SDPA, in ``q``'s dtype: ``[B, Hq, Dv]``.

    ``q: [B, Hq, D]``; ``slots, valid: [B, Lmax]`` (:func:`exact_slots`).
    """
    b, hq, d = q.shape
    k = gather_rows(k_buf, slots).to(q.dtype).permute(0, 2, 1, 3)  # [B, Hkv, Lmax, D]
    v = gather_rows(v_buf, slots).to(q.dtype).permute(0, 2, 1, 3)
    out = scaled_dot_product_attention(
        q.view(b, hq, 1, d), k, v, attn_mask=valid.view(b, 1, 1, -1), scale=scale, enable_gqa=hq != k.shape[1]
    )
    return out.view(b, hq, -1)


def exact_slots(req_to_token: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots ``[B, Lmax]`` of positions ``0..L-1`` of each request (padding reads slot 0) and their mask."""
    lmax = int(seq_lens.max())
    pos = torch.arange(lmax, device=rows.device).view(1, -1)
    valid = pos < seq_lens.view(-1, 1)
    slots = req_to_token[rows.long()][:, :lmax].long()
    return slots.masked_fill_(~valid, 0), valid


class DecodeStep:
    """What every layer of one decode step reuses (the plan does not change across layers): the positions of
    the new tokens, and the rows and lengths of the routed and the exact requests as tensors; the exact
    requests' slots (positions ``0..L-1``) are built by the first layer that needs them."""

    def __init__(self, plan, rows: list[int], seq_lens: list[int], exact: list[bool], device):
        self.plan = plan
        self.device = device
        self.positions = torch.tensor([L - 1 for L in seq_lens], dtype=torch.long, device=device)
        self.routed = [i for i, e in enumerate(exact) if not e]
        self.exact = [i for i, e in enumerate(exact) if e]
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.long, device=device)
        self._exact_slots = None

    @classmethod
    def of(cls, cached: "DecodeStep | None", plan, device) -> "DecodeStep":
        """``cached`` when it was built for this very ``plan`` (a list of the planner's ``RequestPlan``), else a new
        one: the first layer of a step builds it, the other layers reuse it."""
        if cached is not None and cached.plan is plan:
            return cached
        return cls(plan, [p.row for p in plan], [p.seq_len for p in plan], [p.grant.exact for p in plan], device)

    def select(self, idx: list[int], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows, lengths and queries of the requests ``idx`` of the batch (no copy when that is all of them)."""
        if len(idx) == len(self.plan):
            return self.rows, self.seq_lens, q
        t = torch.tensor(idx, dtype=torch.long, device=self.device)
        return self.rows[t], self.seq_lens[t], q[t]

    def exact_slots(self, req_to_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(indices into the batch, slots, valid)`` of the exact requests (:func:`exact_slots`), built once."""
        if self._exact_slots is None:
            idx = torch.tensor(self.exact, dtype=torch.long, device=self.device)
            self._exact_slots = (idx, *exact_slots(req_to_token, self.rows[idx], self.seq_lens[idx]))
        return self._exact_slots


def routed_batch_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor, rows: torch.Tensor,
    seq_lens: torch.Tensor, pages: list[torch.Tensor], scale: float, page_size: int,
    heavy: list[torch.Tensor | None] | None = None, staged: dict | None = None, mass_out: list | None = None,
) -> torch.Tensor:
    """One layer of routed decode for a batch: ``[B, Hq, Dv]`` float32, each request attending to its ``pages``.

    ``q: [B, Hq, D]``; ``rows, seq_lens: [B]``. ``heavy[b]``: request b's heavy-score row for this layer (or
    None), fed with the attention mass each read page got. ``staged[b] = (k, v, positions)``: request b's K/V
    already gathered (pages that left the device), used instead of its page blocks. ``mass_out``: when a list,
    gets the attention mass of each read page, averaged over heads (``[B, K]`` float32, row b aligned with
    ``pages[b]``, 0 past its pages): the router's signals.
    """
    P = page_size
    if len(pages) == 1 and not staged:  # one request: no padding or mask to build (routed_decode.attend)
        pos = page_positions(pages[0], int(seq_lens[0]), P)
        slots = torch.index_select(req_to_token[int(rows[0])], 0, pos).long()
        out, probs = attend(q[0], gather_rows(k_buf, slots), gather_rows(v_buf, slots), scale)
        token_mass = probs.mean(dim=0)
        if heavy is not None and heavy[0] is not None:
            heavy[0].index_add_(0, pos // P, token_mass.to(heavy[0].dtype))
        if mass_out is not None:
            mass_out.append(_mass_by_page(pages[0], pos, token_mass, P).unsqueeze(0))
        return out.unsqueeze(0)
    pad, counts = pad_pages(pages, q.device)
    slots, valid = page_block_slots(req_to_token, rows, seq_lens, pad, counts, P)
    k, v = gather_rows(k_buf, slots), gather_rows(v_buf, slots)
    for b, (k_sel, v_sel, _) in (staged or {}).items():
        n = k_sel.shape[0]
        k[b, :n], v[b, :n] = k_sel, v_sel
        valid[b] = torch.arange(valid.shape[1], device=valid.device) < n
    out, probs = batched_attend(q, k, v, valid, scale)
    wants_heavy = heavy is not None and any(h is not None for h in heavy)
    if mass_out is None and not wants_heavy:
        return out
    # per page block, mean over heads: right for every row but the staged ones, which are laid out by position
    mass = page_block_mass(probs, P)
    staged_mass = {b: probs[b, :, : pos.numel()].mean(dim=0) for b, (_, _, pos) in (staged or {}).items()}
    if wants_heavy:
        for b, row in enumerate(heavy):
            if row is None:
                continue
            if b in staged_mass:
                row.index_add_(0, staged[b][2] // P, staged_mass[b].to(row.dtype))
            else:
                c = pages[b].numel()
                row.index_add_(0, pad[b, :c], mass[b, :c].to(row.dtype))
    if mass_out is not None:
        for b, token_mass in staged_mass.items():
            mass[b] = 0
            mass[b, : pages[b].numel()] = _mass_by_page(pages[b], staged[b][2], token_mass, P)
        mass_out.append(mass)
    return out
