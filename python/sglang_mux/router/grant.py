"""Grant: what the spine router hands to the leaves for one request (pages per leaf), as a value object.

The pure count function :func:`grant_for` is the whole static policy:

    budget B tokens, page size P, context L tokens, split {sink, recent, heavy, retrieval} (tokens, sums to B)
    L <= B (or exact requested)         -> exact: every page
    otherwise                           -> pages per leaf = tokens // P (recent at least 1: the tail page)
    pages read per step <= B // P + 1   (the +1: a window smaller than one page still reads the tail page)

Worked example: B=2048, P=16, split sink=64 recent=512 heavy=256 retrieval=1216, L=20000
    -> sink 4, recent 32, heavy 16, retrieval 76 pages = 128 pages = B // P.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    if force_exact or seq_len <= budget:
        return EXACT
    P = page_size
    return Grant(
        exact=False,
        sink_pages=split["sink"] // P,
        recent_pages=split["recent"] // P,
        heavy_pages=split["heavy"] // P,
        retrieval_pages=split["retrieval"] // P,
    )
