"""The routed decode on CPU (and the reference for every other path): pure torch functions.

    pages of a request (P tokens each, last one partial)   0 1 2 ... n-1
    selection (sorted logical page ids, tail page always)   e.g. [0, 5, 6, 11, 12]
    positions = pages expanded to tokens, clipped to L      -> slots = req_to_token[row, positions]
    attention = softmax(q . K[slots] * scale) . V[slots]    (per q head; GQA: head h reads kv head h // G)
"""

from __future__ import annotations

from typing import Callable

import torch

from mux_kernels.reference import num_pages_of, page_positions  # noqa: F401  (re-exported for callers)


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q . k`` over each page's keys, one score per page.

    ``q: [Hq, D]``, ``kmin, kmax: [n, Hkv, D]``. Per q head h (kv head h // G): ``sum_d max(q_d kmin_d, q_d kmax_d)``;
    then the max over all heads (one page set serves every head of the request at this layer).
    """
    return quest_page_scores_head_major(q, kmin.transpose(0, 1), kmax.transpose(0, 1))


def quest_page_scores_head_major(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """:func:`quest_page_scores` for summaries laid out ``[Hkv, n, D]`` (a request's summary cache).

    Since ``kmax >= kmin``, ``max(q_d kmin_d, q_d kmax_d) = max(q_d, 0) kmax_d + min(q_d, 0) kmin_d``: two batched
    matmuls over the pages, with no ``[n, Hq, D]`` temporaries (this runs per layer per routed request per step).
    """
    hkv, n, d = kmin.shape
    g = q.shape[0] // hkv
    qg = q.view(hkv, g, d).float().transpose(1, 2)  # [Hkv, D, G]
    hi = torch.matmul(kmax.float(), qg.clamp(min=0))  # [Hkv, n, G]
    hi.baddbmm_(kmin.float(), qg.clamp(max=0))
    return hi.amax(dim=(0, 2))


def grouped_quest_page_scores(
    q: torch.Tensor,
    n: int,
    gmin: torch.Tensor | None,
    gmax: torch.Tensor | None,
    group_pages: int,
    keep_groups: int,
    pages_of: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Two-level :func:`quest_page_scores_head_major`: score groups of pages first, then only the best groups' pages.

    ``gmin, gmax: [Hkv, m, D]`` summarise the first ``m`` complete groups of ``group_pages`` pages (a group's
    min/max over its pages' min/max; None: no complete group yet). ``pages_of(idx)`` returns the page summaries
    ``(kmin, kmax) [Hkv, len(idx), D]`` of the pages ``idx`` (``None``: all pages ``0..n-1``). The pages of the
    ``keep_groups`` groups with the highest bound, and every page after the last complete group, get their exact
    page bound; all other pages get the lowest finite float32 (ranked last, ties to the lower page id, so a top-k
    still returns k pages when the candidates run short). A group's bound is >= each of its pages' bounds, so a
    page is missed only when ``keep_groups`` other groups bound higher than its own group.
    """
    m = 0 if gmin is None else gmin.shape[1]
    g = group_pages
    if m <= keep_groups:
        return quest_page_scores_head_major(q, *pages_of(None))
    group_scores = quest_page_scores_head_major(q, gmin, gmax)
    best = torch.topk(group_scores, keep_groups, sorted=False).indices
    cand = (best.view(-1, 1) * g + torch.arange(g, device=best.device)).flatten()
    cand = torch.cat([cand, torch.arange(m * g, n, device=best.device)])
    out = torch.full((n,), torch.finfo(torch.float32).min, dtype=torch.float32, device=best.device)
    out[cand] = quest_page_scores_head_major(q, *pages_of(cand))
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one request over the given keys: ``(out [Hq, Dv], probs [Hq, n])`` in float32.

    ``q: [Hq, D]``, ``k: [n, Hkv, D]``, ``v: [n, Hkv, Dv]``.
    """
    hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    qg = q.view(hkv, g, d).float()
    logits = torch.einsum("hgd,nhd->hgn", qg, k.float()) * scale
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("hgn,nhd->hgd", probs, v.float())
    return out.reshape(hq, -1), probs.reshape(hq, n)
