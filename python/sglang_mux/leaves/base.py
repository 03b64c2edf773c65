"""The leaf interface: a pure function from (context, grant) to the logical pages a leaf keeps.

A leaf spends one or more *shares* of the budget: the names ``--mux-leaves`` accepts (``sink_heavy`` spends
``sink`` and ``heavy``; most leaves spend one share named like the leaf). Besides ``select``, a leaf states, as
pure functions of integers, how many pages it may read (``max_pages``) and which pages must stay on the device
for it (``device_pages`` by position, ``device_best_pages`` as the best by heavy score): the cold-page policies
(drop, tier) move every other page of a routed request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch

if TYPE_CHECKING:
    from sglang_mux.router.grant import Grant


@dataclass
class LeafContext:
    """What a leaf may read about one request at one layer.

    ``taken`` marks pages already chosen by earlier leaves (bool ``[num_pages]``, updated by the caller).
    ``heavy_scores`` are the request's accumulated page importances for this layer (``[>= num_pages]`` float32)
    or None. ``page_scores`` computes query-aware scores of all pages on demand (once per request and layer,
    however many leaves ask). ``chunk_spans`` gives the request's chunks as ``(first_page, last_page)`` int64
    tensors (``sglang_mux.memory.chunks``), or is None when its tokens are not known. ``chunk_scores`` gives the
    page scores the chunk leaf ranks chunks by (``--mux-chunk-score``: heavy scores or ``page_scores``).
    """

    num_pages: int
    taken: torch.Tensor
    heavy_scores: Optional[torch.Tensor] = None
    page_scores: Optional[Callable[[], torch.Tensor]] = None
    chunk_spans: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None
    chunk_scores: Optional[Callable[[], torch.Tensor]] = None
    # when not None, one dict per request and decode step shared by all its layers: a leaf whose choice is made
    # once per step (``--mux-chunk-layers shared``) keeps it here at the first layer and reuses it at the others
    step_memo: Optional[dict] = None


class Leaf:
    """One memory stream. Subclasses set ``name`` and implement ``select``; the rest has defaults.

    ``shares``: the ``--mux-leaves`` names whose tokens this leaf spends, each with its place in the split (the
    order of ``leaf_names()``, of the allowed names in errors, and of the rounding tie-break in ``grant_for``).
    Empty: one share named like the leaf, placed after the built-in ones.
    """

    name: ClassVar[str] = "leaf"
    shares: ClassVar[dict[str, float]] = {}
    # the shares whose pages this leaf chooses by score (not by position): layer budgets and the adaptive router
    # move pages between these shares; positional shares (sink, recent) stay as granted
    ranked_shares: ClassVar[tuple[str, ...]] = ()
    # True when ``select`` may read this step's query (``ctx.page_scores``): the expensive leaves, which the adaptive
    # router runs only on steps its trigger fires (``router/adaptive.py``); other steps reuse their last pages
    query_aware: ClassVar[bool] = False

    @classmethod
    def share_places(cls) -> dict[str, float]:
        return dict(cls.shares) if cls.shares else {cls.name: 100.0}

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:  # pragma: no cover - interface
        """Logical page ids (int64, any order, unique, none already ``taken``) this leaf keeps."""
        raise NotImplementedError

    def max_pages(self, grant: Grant) -> int:
        """The most pages ``select`` returns under ``grant``: the pages of its shares."""
        return sum(grant[s] for s in self.share_places())

    def device_pages(self, num_pages: int, grant: Grant) -> range:
        """Pages this leaf reads by position every step, so they never leave the device. Default: none."""
        return range(0)

    def device_best_pages(self, grant: Grant, dropping: bool) -> int:
        """How many of the request's best pages by heavy score stay on the device for this leaf. ``dropping``:
        pages that leave the device are gone for good (drop), not kept in a lower tier (tier). Default: none."""
        return 0


def top_free(scores: torch.Tensor, taken: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring pages not yet taken (ties: lower page id first), in ascending page order.

    A ``topk`` for the threshold and two masks, not a sort of every free page: this runs per layer per routed
    request per decode step, over every page of the context.
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=taken.device)
    s = scores[: taken.numel()].float().masked_fill(taken, float("-inf"))
    threshold = torch.topk(s, min(k, s.numel()), sorted=False).values.min()
    if threshold == float("-inf"):  # no more than k free pages: all of them
        return (~taken).nonzero().flatten()
    above = s > threshold
    tied = (s == threshold).nonzero().flatten()[: k - int(above.sum())]
    return torch.sort(torch.cat([above.nonzero().flatten(), tied])).values
