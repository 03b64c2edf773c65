"""``chunk`` (L4): whole chunks (sentences, lines; ``sglang_mux.memory.chunks``) ranked by their best page.

Page-level retrieval keeps the single pages whose keys match the query best. A fact split by a page boundary
("... the number is: 73" | "19.") is then half-read: the page with the digits' tail scores lower than the one
with the question's words. This leaf ranks chunks instead of pages and reads every page of the chunks it picks.

    pages      0   1   2   3   4   5   6   7        chunk spans   A=[0,1]  B=[2,3]  C=[3,5]  D=[6,7]
    scores     .   1   0   9   2   .   .   .        chunk score   max over its pages: A 1, B 9, C 9, D .
    grant["chunk"] = 3, pages 5-7 taken (window)  ->  B (pages 2, 3), then C (page 4: 3 is read already)

A chunk costs the pages of it that are not yet taken; chunks are taken best first while they fit (equal scores:
the earlier chunk first), then the pages still unspent go to the best single pages left. A chunk's score counts
pages other leaves took: after the retrieval leaf it completes the sentences retrieval found (``retrieval=X,
chunk=rest``); alone (``chunk=rest``) it replaces retrieval. The page scores (``--mux-chunk-score``): ``heavy``,
the heavy-hitter scores (the prompt's observation window at prefill, then the attention paid each step), so a
chosen chunk stays chosen while the answer is written out digit by digit; or ``quest``, this step's query-aware
page scores (``--mux-retrieval-score``), which follow each generated token's query. Its budget's worth of the best
pages by heavy score stays on the device when cold pages are dropped.
"""

from __future__ import annotations

import torch

from sglang_mux.leaves.base import Leaf, LeafContext, top_free
from sglang_mux.router.grant import Grant


class ChunkLeaf(Leaf):
    name = "chunk"
    shares = {"chunk": 5}
    ranked_shares = ("chunk",)
    query_aware = True

    def select(self, ctx: LeafContext, grant: Grant) -> torch.Tensor:
        k = grant["chunk"]
        dev = ctx.taken.device
        memo = ctx.step_memo
        if memo is not None and memo.get("chunk") is not None and memo["chunk"][0] == k:
            kept = memo["chunk"][1]  # chosen once for every layer of this step (--mux-chunk-layers shared)
            return kept[~ctx.taken[kept]]
        rank = ctx.chunk_scores or ctx.page_scores
        if k <= 0 or rank is None or bool(ctx.taken.all()):
            return torch.empty(0, dtype=torch.long, device=dev)
        scores = rank()[: ctx.num_pages].float()
        if ctx.chunk_spans is None:  # no chunks known: the best pages
            return top_free(scores, ctx.taken, k)
        first, last = (t.to(dev) for t in ctx.chunk_spans())
        picked = pick_chunks(scores, ctx.taken, first, last, k)
        rest = k - int(picked.numel())
        if rest > 0:
            taken = ctx.taken.clone()
            taken[picked] = True
            picked = torch.cat([picked, top_free(scores, taken, rest)])
        if memo is not None:
            memo["chunk"] = (k, picked)
        return picked

    def device_best_pages(self, grant: Grant, dropping: bool) -> int:
        return grant["chunk"] if dropping else 0


def pick_chunks(scores: torch.Tensor, taken: torch.Tensor, first: torch.Tensor, last: torch.Tensor, k: int) -> torch.Tensor:
    """The free pages of the best chunks, taken best first while their free pages fit in ``k`` (ascending, unique).

    One pass of tensor ops, no loop over chunks: every chunk's pages are laid out flat (``idx``: the chunk of each
    entry), scored with a segment max, costed with a segment sum of free pages, sorted, and the longest prefix of
    the order whose cumulative cost fits is kept. A page shared by two picked chunks is counted twice in the cost,
    so the result may use a page or two less than ``k``; the caller fills the rest.
    """
    n = taken.numel()
    keep = first < n
    first, last = first[keep], last[keep].clamp(max=n - 1)
    if first.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=taken.device)
    lens = last - first + 1
    idx = torch.repeat_interleave(torch.arange(first.numel(), device=taken.device), lens)
    starts_flat = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    pages = first[idx] + (torch.arange(idx.numel(), device=taken.device) - starts_flat)
    chunk_score = torch.full((first.numel(),), float("-inf"), device=taken.device)
    chunk_score.scatter_reduce_(0, idx, scores[pages], reduce="amax")
    free = (~taken[pages]).float()
    cost = torch.zeros(first.numel(), device=taken.device).scatter_add_(0, idx, free)
    # Chunks with nothing left to read cost nothing and add nothing: leave them out of the order.
    cand = (cost > 0).nonzero().flatten()
    order = cand[torch.argsort(chunk_score[cand], descending=True, stable=True)]
    fits = int((torch.cumsum(cost[order], 0) <= k).sum())
    chosen = torch.zeros(first.numel(), dtype=torch.bool, device=taken.device)
    chosen[order[:fits]] = True
    out = pages[chosen[idx] & ~taken[pages]]
    return torch.unique(out)
