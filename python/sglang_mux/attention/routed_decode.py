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

from sglang_mux.config import RETRIEVAL_SCORE_RULES


def quest_head_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``q_h . k`` over each page's keys, per query head: ``[Hq, n]`` in float32.

    ``q: [Hq, D]``, ``kmin, kmax: [Hkv, n, D]`` (head-major, a request's summary cache). Per q head h (kv head
    h // G): ``sum_d max(q_d kmin_d, q_d kmax_d)``. Since ``kmax >= kmin`` that is
    ``max(q_d, 0) kmax_d + min(q_d, 0) kmin_d``: two batched matmuls over the pages, with no ``[n, Hq, D]``
    temporaries (this runs per layer per routed request per step).
    """
    hkv, n, d = kmin.shape
    g = q.shape[0] // hkv
    qg = q.view(hkv, g, d).float().transpose(1, 2)  # [Hkv, D, G]
    hi = torch.matmul(kmax.float(), qg.clamp(min=0))  # [Hkv, n, G]
    hi.baddbmm_(kmin.float(), qg.clamp(max=0))
    return hi.permute(0, 2, 1).reshape(hkv * g, n)


def combine_head_bounds(bounds: torch.Tensor, rule: str = "bound", scale: float = 1.0) -> torch.Tensor:
    """One score per page from the per-head bounds ``[Hq, n]`` (one page set serves every head of the request at
    this layer).

    * ``bound``: the max over heads of the raw bound (Quest). A head whose logits are large everywhere (a
      positional or "sink" head) outranks the one head that is looking for a needle.
    * ``mass``: per head, the softmax over the pages of ``bound * scale`` (the attention mass the head could
      give each page if every page's best key were its only key), summed over heads. Each head has one unit to
      spread, so a head that peaks on a few pages decides their rank and a flat head barely moves any (the
      backend passes the layer's scale divided by ``--mux-retrieval-temperature``: a softer softmax). Returned
      as the log of that sum (same order; computed from log-softmaxes, so far-off pages that would underflow to
      a mass of 0 keep distinct, finite scores).
    """
    if rule == "bound":
        return bounds.amax(dim=0)
    if rule == "mass":
        return torch.logsumexp(torch.log_softmax(bounds * scale, dim=-1), dim=0)
    raise ValueError(f"retrieval score rule: allowed: {', '.join(RETRIEVAL_SCORE_RULES)}; got {rule!r}")


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The Quest score (max over heads of the per-head bound) for summaries laid out ``[n, Hkv, D]``: what the
    GPU selection kernel (``mux_kernels.select_pages_on_device``) computes."""
    return quest_page_scores_head_major(q, kmin.transpose(0, 1), kmax.transpose(0, 1))


def quest_page_scores_head_major(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, rule: str = "bound", scale: float = 1.0
) -> torch.Tensor:
    """``combine_head_bounds(quest_head_bounds(...))``: one score per page for summaries ``[Hkv, n, D]``."""
    return combine_head_bounds(quest_head_bounds(q, kmin, kmax), rule, scale)


def grouped_quest_head_bounds(
    q: torch.Tensor,
    n: int,
    gmin: torch.Tensor | None,
    gmax: torch.Tensor | None,
    group_pages: int,
    keep_groups: int,
    pages_of: Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    rule: str = "bound",
    scale: float = 1.0,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Two-level :func:`quest_head_bounds`: score groups of pages first, then only the best groups' pages.
    Returns ``(cand, bounds)``: the candidate pages and their per-head bounds ``[Hq, len(cand)]``, or
    ``(None, [Hq, n])`` when every page was bounded.

    ``gmin, gmax: [Hkv, m, D]`` summarise the first ``m`` complete groups of ``group_pages`` pages (a group's
    min/max over its pages' min/max; None: no complete group yet). ``pages_of(idx)`` returns the page summaries
    ``(kmin, kmax) [Hkv, len(idx), D]`` of the pages ``idx`` (``None``: all pages ``0..n-1``). Groups are ranked
    by ``combine_head_bounds(group bounds, rule, scale)``; the candidates are the pages of the ``keep_groups`` best
    groups and every page after the last complete group. A group's bound is >= each of its pages' bounds in every
    head, so with ``rule="bound"`` a page is missed only when ``keep_groups`` other groups bound higher than its
    own group.
    """
    m = 0 if gmin is None else gmin.shape[1]
    g = group_pages
    if m <= keep_groups:
        return None, quest_head_bounds(q, *pages_of(None))
    group_scores = quest_page_scores_head_major(q, gmin, gmax, rule, scale)
    best = torch.topk(group_scores, keep_groups, sorted=False).indices
    cand = (best.view(-1, 1) * g + torch.arange(g, device=best.device)).flatten()
    cand = torch.cat([cand, torch.arange(m * g, n, device=best.device)])
    return cand, quest_head_bounds(q, *pages_of(cand))


def scatter_page_scores(n: int, cand: torch.Tensor | None, bounds: torch.Tensor, rule: str, scale: float) -> torch.Tensor:
    """One score per page ``[n]`` from the candidates' per-head bounds (:func:`grouped_quest_head_bounds`): the
    candidates combined among themselves (``combine_head_bounds``), every other page the lowest finite float32
    (ranked last by either rule, ties to the lower page id, so a top-k still returns k pages when the candidates run
    short). The same as combining over all pages with the others' bounds at -inf, without touching them."""
    scores = combine_head_bounds(bounds, rule, scale)
    if cand is None:
        return scores
    out = torch.full((n,), torch.finfo(torch.float32).min, dtype=torch.float32, device=bounds.device)
    out[cand] = scores
    return out


def grouped_quest_page_scores(q, n, gmin, gmax, group_pages, keep_groups, pages_of, rule="bound", scale=1.0):
    """:func:`grouped_quest_head_bounds` combined into one score per page (:func:`scatter_page_scores`)."""
    cand, bounds = grouped_quest_head_bounds(q, n, gmin, gmax, group_pages, keep_groups, pages_of, rule, scale)
    return scatter_page_scores(n, cand, bounds, rule, scale)


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
