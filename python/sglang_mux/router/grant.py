"""Grant: what the spine router hands to the leaves for one request (pages per leaf), as a value object.

The pure count function :func:`grant_for` is the whole static policy:

    budget B tokens, page size P, context L tokens, split {sink, recent, heavy, retrieval} (tokens, sums to B)
    L <= B (or exact requested)         -> exact: every page
    otherwise                           -> pages per leaf = tokens // P (recent at least 1: the tail page);
                                           the pages the rounding lost go to the largest leaf
    pages read per step <= B // P + 1   (the +1: a window smaller than one page still reads the tail page)

Without the last rule a small budget would lose up to a page per leaf: B=126, P=16, split sink=15 recent=31
heavy=15 retrieval=65 rounds to 0+1+0+4 = 5 pages of the 7 the budget pays for; with it, retrieval gets 6.

Worked example: B=2048, P=16, split sink=64 recent=512 heavy=256 retrieval=1216, L=20000
    -> sink 4, recent 32, heavy 16, retrieval 76 pages = 128 pages = B // P.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_mux.router.route_rule import routes_now


@dataclass(frozen=True)
class Grant:
    exact: bool
    sink_pages: int = 0
    recent_pages: int = 0
    heavy_pages: int = 0
    retrieval_pages: int = 0

    @property
    def total_pages(self) -> int:
        return self.sink_pages + max(self.recent_pages, 1) + self.heavy_pages + self.retrieval_pages


EXACT = Grant(exact=True)


def grant_for(seq_len: int, budget: int, page_size: int, split: dict[str, int], force_exact: bool = False) -> Grant:
    if not routes_now(seq_len, budget, exact=force_exact):
        return EXACT
    P = page_size
    pages = {name: split[name] // P for name in ("sink", "recent", "heavy", "retrieval")}
    lost = sum(split[name] for name in pages) // P - sum(pages.values())
    if lost > 0:
        pages[max(pages, key=lambda name: split[name])] += lost
    return Grant(
        exact=False,
        sink_pages=pages["sink"],
        recent_pages=pages["recent"],
        heavy_pages=pages["heavy"],
        retrieval_pages=pages["retrieval"],
    )
