"""``retrieval`` (L5): query-aware top-k pages per layer from the page summaries (Quest-style).

At forward time, inside the attention backend, each page gets the upper bound of ``q . k`` over its keys
(from the element-wise min/max summaries, see ``sglang_mux.attention.routed_decode.quest_page_scores``), and the
``grant["retrieval"]`` best pages not taken by other leaves are read. The summaries stay on the device; in
the tiered memory the full pages may live elsewhere and are fetched when selected. When cold pages are dropped
instead, nothing can be fetched back: its budget's worth of the best pages by heavy score stays on the device.
"""

from __future__ import annotations

import torch

from sglang_mux.leaves.base import Leaf, LeafContext, top_free
from sglang_mux.router.grant import Grant


class RetrievalLeaf(Leaf):
    name = "retrieval"
    shares = {"retrieval": 4}
    ranked_shares = ("retrieval",)
    query_aware = True

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:
        if grant["retrieval"] <= 0 or ctx.page_scores is None or bool(ctx.taken.all()):
            return torch.empty(0, dtype=torch.long, device=ctx.taken.device)
        return top_free(ctx.page_scores(), ctx.taken, grant["retrieval"])

    def device_best_pages(self, grant: Grant, dropping: bool) -> int:
        return grant["retrieval"] if dropping else 0
