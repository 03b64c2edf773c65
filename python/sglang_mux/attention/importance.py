"""Page importance for the heavy-hitter leaf: SnapKV-style scoring at prefill, H2O-style accumulation at decode.

Prefill (observation window): the last ``W`` prompt queries attend (causally) to all prompt keys; their
attention is summed over the window and the heads, max-pooled along positions (kernel 7, so the neighbours of
a hit count: an answer spans several tokens) and reduced to pages by the max. Decode: each step adds the
attention mass the query paid to every read position, averaged over heads, to its page.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOL_KERNEL = 7


def snapkv_page_scores(
    q_win: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, scale: float, page_size: int
) -> torch.Tensor:
    """``q_win [W, Hq, D]`` at positions ``q_pos [W]``; ``keys [L, Hkv, D]`` (positions 0..L-1) -> ``[ceil(L/P)]``."""
    w, hq, d = q_win.shape
    L, hkv, _ = keys.shape
    g = hq // hkv
    qg = q_win.float().view(w, hkv, g, d)
    logits = torch.einsum("whgd,lhd->hgwl", qg, keys.float()) * scale
    causal = torch.arange(L, device=keys.device).view(1, L) > q_pos.view(w, 1)
    logits = logits.masked_fill(causal, float("-inf"))
    mass = torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))  # [L]
    pooled = F.max_pool1d(mass.view(1, 1, L), POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2).view(L)
    pad = (-L) % page_size
    if pad:
        pooled = torch.cat([pooled, pooled.new_zeros(pad)])
    return pooled.view(-1, page_size).amax(dim=1)


def accumulate_decode_mass(scores_row: torch.Tensor, positions: torch.Tensor, probs: torch.Tensor, page_size: int) -> None:
    """Add the attention mass of one decode step (``probs [Hq, n]`` over ``positions [n]``) to the page scores."""
    scores_row.index_add_(0, positions // page_size, probs.mean(dim=0).to(scores_row.dtype))
