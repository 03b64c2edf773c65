"""The leaf interface: a pure function from (context, grant) to the logical pages a leaf keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sglang_mux.router.grant import Grant


@dataclass
class LeafContext:
    """What a leaf may read about one request at one layer.

    ``taken`` marks pages already chosen by earlier leaves (bool ``[num_pages]``, updated by the caller).
    ``heavy_scores`` are the request's accumulated page importances for this layer (``[>= num_pages]`` float32)
    or None. ``page_scores`` computes query-aware scores of all pages on demand (retrieval only).
    """

    num_pages: int
    taken: torch.Tensor
    heavy_scores: Optional[torch.Tensor] = None
    page_scores: Optional[Callable[[], torch.Tensor]] = None


class Leaf:
    name = "leaf"

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:  # pragma: no cover - interface
        """Logical page ids (int64, any order, unique, none already ``taken``) this leaf keeps."""
        raise NotImplementedError


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
