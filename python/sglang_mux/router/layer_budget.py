"""Layer budgets: how a request's grant is spread over the model's layers (``--mux-layer-budget``).

The grant says how many pages each share reads per step. ``uniform`` reads that at every layer. The others move
pages of the *ranked* shares (``Leaf.ranked_shares``: heavy, retrieval, chunk, the shares that choose pages by score) between
layers, keeping each share's total over the layers; the positional shares (``sink``, ``recent``) stay as granted,
so every layer still reads its sinks, its window and the tail page.

    pyramid   PyramidKV-style: linear in depth, 1.5x the grant at the first layer down to 0.5x at the last
              (lower layers attend broadly, upper layers to a few tokens)
    adaptive  from the request's own prefill: per layer, the share of the observation window's attention
              (the heavy-hitter page scores, sinks and window excluded) that the granted number of best pages
              does NOT capture; a layer whose attention is spread gets more pages, a concentrated one fewer
              (clipped to 0.25x-3x, then rescaled to the same total)

Worked example, 4 layers, ranked shares heavy 2 and retrieval 6 pages (8 per layer, 32 in all), pyramid:
factors 1.5, 1.17, 0.83, 0.5 -> pages 12, 9, 7, 4 (32); heavy 3, 2, 2, 1 and retrieval 9, 7, 5, 3.

Rounding keeps each share's total exactly (largest remainder), so the pages one step reads over all layers never
exceed what the uniform split reads.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sglang_mux.config import LAYER_BUDGET_POLICIES  # noqa: F401  (re-exported: the --mux-layer-budget values)
from sglang_mux.leaves import ranked_shares
from sglang_mux.router.grant import Grant

PYRAMID_SPREAD = 0.5  # first layer 1 + spread, last layer 1 - spread
ADAPTIVE_CLIP = (0.25, 3.0)


def pyramid_factors(num_layers: int) -> list[float]:
    if num_layers == 1:
        return [1.0]
    return [1 + PYRAMID_SPREAD * (1 - 2 * i / (num_layers - 1)) for i in range(num_layers)]


def adaptive_factors(prefill_scores: torch.Tensor, ranked_pages: int, skip_first: int, skip_last: int) -> list[float]:
    """Factors from a ``[num_layers, num_pages]`` table of prefill page scores (attention of the observation
    window): per layer, the mass outside its ``ranked_pages`` best pages, as a share of the mass outside the
    positional pages (the first ``skip_first`` and last ``skip_last`` pages)."""
    L, n = prefill_scores.shape
    lo, hi = min(skip_first, n), max(n - skip_last, 0)
    if hi - lo <= ranked_pages or ranked_pages <= 0:
        return [1.0] * L
    s = prefill_scores[:, lo:hi].float().clamp(min=0)
    total = s.sum(dim=1).clamp(min=1e-12)
    captured = torch.topk(s, ranked_pages, dim=1).values.sum(dim=1) / total
    need = (1 - captured) + 0.05
    f = need / need.mean()
    f = f.clamp(*ADAPTIVE_CLIP)
    return (f / f.mean()).tolist()


def split_total(total: int, factors: Sequence[float]) -> list[int]:
    """``total`` pages spread over layers in proportion to ``factors`` (largest remainder: sums to ``total``)."""
    w = [max(f, 0.0) for f in factors]
    s = sum(w) or 1.0
    raw = [total * x / s for x in w]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def layer_grants(grant: Grant, factors: Sequence[float]) -> list[Grant]:
    """One grant per layer: the ranked shares spread by ``factors`` (each share's total over the layers kept),
    the others as granted. Exact grants and uniform factors return the grant itself at every layer."""
    L = len(factors)
    if grant.exact or all(abs(f - 1.0) < 1e-9 for f in factors):
        return [grant] * L
    per_share = {s: split_total(grant.pages[s] * L, factors) for s in ranked_shares() if s in grant.pages}
    return [Grant(exact=False, pages={**grant.pages, **{s: v[i] for s, v in per_share.items()}}) for i in range(L)]
