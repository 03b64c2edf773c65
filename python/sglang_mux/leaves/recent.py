"""``recent`` (L1): the last ``--mux-window-tokens`` tokens, exact.

    pages   0   1   2   3   4   5   6   7  [8: partial tail]
    grant.recent_pages = 3  ->  keeps 6, 7, 8
The partial tail page is always the last page and always kept (by this leaf, or by the caller when the
window is 0).
"""

from __future__ import annotations

import torch

from sglang_mux.leaves.base import Leaf, LeafContext
from sglang_mux.router.grant import Grant


class RecentLeaf(Leaf):
    name = "recent"

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:
        n = max(grant.recent_pages, 1)  # the tail page, always
        lo = max(ctx.num_pages - n, 0)
        pages = torch.arange(lo, ctx.num_pages, device=ctx.taken.device)
        return pages[~ctx.taken[pages]]
