"""PageTable: what one radix-tree node knows about each of its pages.

A node owns ``len(node.value)`` tokens (a multiple of the page size ``P``: keys are page-aligned), i.e.
``n = len / P`` pages. For every page:

    first_slot   int64   device slot of its first token; the page's exact copy is physical KV page
                         ``first_slot // P`` of the device tier, and its key summary lives at the same index
                         in the PageSummaryStore (so two requests sharing the node share both)
    tier         uint8   where the exact copy lives (TIER_DEVICE for now; lower tiers come with the TierManager)
    importance   float32 [num_layers, n]: accumulated attention (heavy-hitter scores) folded in from the
                         requests that read this page
    leaf_mask    uint8   bit per leaf that read the page for some request (LEAF_BITS), OR-ed in on checkpoint

Splits slice every column at the same page boundary; shared prefixes share the node and so the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIER_DEVICE = 0
LEAF_BITS = {"recent": 1, "sink_heavy": 2, "retrieval": 4}


@dataclass
class PageTable:
    first_slot: torch.Tensor
    tier: torch.Tensor
    importance: torch.Tensor
    leaf_mask: torch.Tensor

    @classmethod
    def for_value(cls, value: torch.Tensor, page_size: int, num_layers: int) -> "PageTable":
        first = value[::page_size].to(torch.int64).cpu()
        n = first.numel()
        return cls(
            first_slot=first,
            tier=torch.full((n,), TIER_DEVICE, dtype=torch.uint8),
            importance=torch.zeros((num_layers, n), dtype=torch.float32),
            leaf_mask=torch.zeros((n,), dtype=torch.uint8),
        )

    def __len__(self) -> int:
        return self.first_slot.numel()

    def split(self, n_head_pages: int) -> tuple["PageTable", "PageTable"]:
        """(first ``n_head_pages`` pages, the rest), each column cut at the same boundary."""
        k = n_head_pages
        head = PageTable(self.first_slot[:k], self.tier[:k], self.importance[:, :k], self.leaf_mask[:k])
        tail = PageTable(self.first_slot[k:], self.tier[k:], self.importance[:, k:], self.leaf_mask[k:])
        return head, tail

    def fold_importance(self, scores: torch.Tensor) -> None:
        """Keep the larger of the stored and the given importances (``scores [num_layers, <= n]``)."""
        n = min(scores.shape[1], len(self))
        if n:
            self.importance[:, :n] = torch.maximum(self.importance[:, :n], scores[:, :n].float().cpu())

    def fold_leaf_views(self, masks: torch.Tensor) -> None:
        """OR in the leaf bits a request recorded for these pages (``masks [<= n]`` uint8)."""
        n = min(masks.numel(), len(self))
        if n:
            self.leaf_mask[:n] |= masks[:n].to(torch.uint8).cpu()

    def agrees_with(self, value: torch.Tensor, page_size: int) -> bool:
        """The table describes exactly this node span (used by the invariant checks)."""
        return (
            value.numel() % page_size == 0
            and len(self) == value.numel() // page_size
            and torch.equal(self.first_slot, value[::page_size].to(torch.int64).cpu())
        )
