"""Grant: what the spine router hands to the leaves for one request (pages per share), as a value object.

A routed grant maps every ``--mux-leaves`` name of the split (the shares the registered leaves spend, see
``sglang_mux.leaves``) to pages: ``grant["heavy"]``.

The pure count function :func:`grant_for` is the whole static policy:

    budget B tokens, page size P, context L tokens, split {share: tokens} (e.g. sink, recent, heavy, retrieval;
                                           sums to B)
    L <= B (or exact requested)         -> exact: every page
    otherwise                           -> pages per share = tokens // P (the recent leaf reads at least 1:
                                           the tail page); the pages the rounding lost go to the largest
                                           share (ties: the first in split order)
    pages read per step <= B // P + 1   (the +1: a window smaller than one page still reads the tail page)

Without the last rule a small budget would lose up to a page per leaf: B=126, P=16, split sink=15 recent=31
heavy=15 retrieval=65 rounds to 0+1+0+4 = 5 pages of the 7 the budget pays for; with it, retrieval gets 6.

Worked example: B=2048, P=16, split sink=64 recent=512 heavy=256 retrieval=1216, L=20000
    -> sink 4, recent 32, heavy 16, retrieval 76 pages = 128 pages = B // P.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from sglang_mux.router.route_rule import routes_now


@dataclass(frozen=True)
class Grant:
    """``exact``: every page is read. Otherwise ``pages``: pages per share, one entry per name of the split."""

    exact: bool
    pages: Mapping[str, int] = field(default_factory=dict)

    def __getitem__(self, share: str) -> int:
        try:
            return self.pages[share]
        except KeyError:
            from sglang_mux.leaves import leaf_names

            if share in leaf_names():  # a hand-written split need not list every registered leaf: 0 pages
                return 0
            raise KeyError(f"grant has no share {share!r}; it has: {', '.join(self.pages) or 'none (exact)'}") from None

    @property
    def total_pages(self) -> int:
        """The most pages one step reads under this grant: what each registered leaf may read, summed."""
        from sglang_mux.leaves import LEAVES

        return sum(leaf.max_pages(self) for leaf in LEAVES.values())


EXACT = Grant(exact=True)


def grant_for(seq_len: int, budget: int, page_size: int, split: dict[str, int], force_exact: bool = False) -> Grant:
    if not routes_now(seq_len, budget, exact=force_exact):
        return EXACT
    P = page_size
    # Shares the split does not name read no pages (Grant.__getitem__ answers 0 for them).
    pages = {name: tokens // P for name, tokens in split.items()}
    lost = sum(split.values()) // P - sum(pages.values())
    if lost > 0:
        pages[max(pages, key=split.__getitem__)] += lost
    return Grant(exact=False, pages=pages)
