"""StagingArea: a request's device-side copies of pages fetched from lower tiers (LRU, bounded in pages).

Retrieval picks pages by their summaries (always on the device); a picked page that left the device is read from
its staging copy. Pages picked in one step are likely picked in the next (temporal locality), so the staging area
keeps the most recently used ones; a background fetcher (``skip`` mode) fills it without blocking attention.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class StagingArea:
    def __init__(self, capacity_pages: int, device):
        self.capacity = capacity_pages
        self.device = device
        self._pages: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.pending: set[int] = set()

    def get(self, page: int):
        with self._lock:
            rec = self._pages.get(page)
            if rec is not None:
                self._pages.move_to_end(page)
            return rec

    def put(self, page: int, record: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._pages[page] = record.to(self.device)
            self._pages.move_to_end(page)
            while len(self._pages) > self.capacity:
                self._pages.popitem(last=False)
            self.pending.discard(page)

    def nbytes(self) -> int:
        with self._lock:
            return sum(r.numel() * r.element_size() for r in self._pages.values())

    def __len__(self) -> int:
        return len(self._pages)
