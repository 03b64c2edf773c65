"""PageTable: what one radix-tree node knows about each of its pages.

A node owns ``len(node.value)`` tokens (a multiple of the page size ``P``: keys are page-aligned), i.e.
``n = len / P`` pages. For every page:

    first_slot   int64   device slot of its first token; the page's exact copy is physical KV page
                         ``first_slot // P`` of the device tier, and its key summary lives at the same index
                         in the PageSummaryStore (so two requests sharing the node share both)

Splits cut the table at the same page boundary as the node; shared prefixes share the node and so the table.
Where a page's copy lives once it leaves the device is tracked by the tiers (``memory/tiers.py``): a running
request's demoted pages in its request state, prefix pages by their hash (``memory/prefix_tiers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PageTable:
    first_slot: torch.Tensor

    @classmethod
    def for_value(cls, value: torch.Tensor, page_size: int) -> "PageTable":
        return cls(first_slot=value[::page_size].to(torch.int64).cpu())

    def __len__(self) -> int:
        return self.first_slot.numel()

    def split(self, n_head_pages: int) -> tuple["PageTable", "PageTable"]:
        """(first ``n_head_pages`` pages, the rest)."""
        k = n_head_pages
        return PageTable(self.first_slot[:k]), PageTable(self.first_slot[k:])

    def agrees_with(self, value: torch.Tensor, page_size: int) -> bool:
        """The table describes exactly this node span (used by the invariant checks)."""
        return (
            value.numel() % page_size == 0
            and len(self) == value.numel() // page_size
            and torch.equal(self.first_slot, value[::page_size].to(torch.int64).cpu())
        )
