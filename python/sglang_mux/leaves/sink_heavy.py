"""``sink_heavy`` (L2): the first ``--mux-sink-tokens`` tokens (attention sinks) + heavy-hitter pages.

Heavy hitters are the pages with the highest accumulated importance for this layer: scored at prefill from
the attention of an observation window of the last prompt tokens (SnapKV-style, see
``sglang_mux.attention.importance``), then increased by the attention each decode step pays them
(H2O-style accumulation). Query-agnostic: the choice depends on history, not on the current query.

    pages   0   1   2   3   4   5   6   7   8        grant["sink"] = 1, grant["heavy"] = 2
    scores  .   9   1   7   0   2   .   .   .   ->  keeps 0 (sink), 1 and 3 (heavy)

Spends two shares, ``sink`` and ``heavy``. Its sinks and its ``heavy`` best pages by heavy score stay on the
device.
"""

from __future__ import annotations

import torch

from sglang_mux.leaves.base import Leaf, LeafContext, top_free
from sglang_mux.router.grant import Grant


class SinkHeavyLeaf(Leaf):
    name = "sink_heavy"
    shares = {"sink": 1, "heavy": 3}
    ranked_shares = ("heavy",)

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:
        dev = ctx.taken.device
        sinks = torch.arange(len(self.device_pages(ctx.num_pages, grant)), device=dev)
        sinks = sinks[~ctx.taken[sinks]]
        if grant["heavy"] <= 0 or ctx.heavy_scores is None:
            return sinks
        taken = ctx.taken.clone()
        taken[sinks] = True
        heavy = top_free(ctx.heavy_scores[: ctx.num_pages], taken, grant["heavy"])
        return torch.cat([sinks, heavy])

    def device_pages(self, num_pages: int, grant: Grant) -> range:
        return range(min(grant["sink"], num_pages))

    def device_best_pages(self, grant: Grant, dropping: bool) -> int:
        return grant["heavy"]
