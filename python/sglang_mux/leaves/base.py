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
    """The ``k`` highest-scoring pages not yet taken (ties: lower page id first)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=taken.device)
    free = (~taken).nonzero().flatten()
    if free.numel() <= k:
        return free
    s = scores[free].float()
    # Stable ordering: sort by page id first (already ascending), then a stable sort on -score.
    order = torch.sort(-s, stable=True).indices[:k]
    return free[order]
