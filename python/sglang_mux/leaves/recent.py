"""``recent`` (L1): the last ``--mux-window-tokens`` tokens, exact.

    pages   0   1   2   3   4   5   6   7  [8: partial tail]
    grant["recent"] = 3  ->  keeps 6, 7, 8
The partial tail page is always the last page and always kept by this leaf (one page even when the window is 0).
These pages never leave the device.
"""

from __future__ import annotations

import torch

from sglang_mux.leaves.base import Leaf, LeafContext
from sglang_mux.router.grant import Grant


class RecentLeaf(Leaf):
    name = "recent"
    shares = {"recent": 2}

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:
        pages = torch.arange(self.device_pages(ctx.num_pages, grant).start, ctx.num_pages, device=ctx.taken.device)
        return pages[~ctx.taken[pages]]

    def max_pages(self, grant: Grant) -> int:
        return max(grant["recent"], 1)  # the tail page, always

    def device_pages(self, num_pages: int, grant: Grant) -> range:
        return range(max(num_pages - self.max_pages(grant), 0), num_pages)
