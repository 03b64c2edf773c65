"""PageSummaryStore: Quest-style key summaries (element-wise min and max of the keys) per physical KV page.

Summaries are indexed like the KV pool itself: physical page ``slot // P`` of layer ``l`` has
``kmin[l][page], kmax[l][page]`` of shape ``[H_kv, D]``. SGLang's pool is page-aligned when its ``--page-size``
equals the mux page size (our launcher sets both), so the slots of one logical page of a request are one
physical page, and requests that share a prefix node share its pages and therefore its summaries.

Contract: after every KV write the attention backend calls ``update_decode`` (one token per request) or
``rebuild_from_keys`` (the pages an extend touched). A page's summary covers exactly the positions of its
request that are written, so a partial tail page is summarised over its valid tokens only.

Page size 1 needs no storage: the summary of a one-token page is its key (``kmin = kmax = k``).
"""

from __future__ import annotations

import torch


_SHARED: dict[int, "PageSummaryStore"] = {}


class PageSummaryStore:
    @classmethod
    def for_pool(cls, kv_pool, page_size: int) -> "PageSummaryStore":
        """The process's store for this KV pool (the attention backend and the radix cache share it)."""
        key = id(kv_pool)
        cur = _SHARED.get(key)
        start0 = getattr(kv_pool, "start_layer", 0) or 0
        if cur is None or cur.page_size != page_size or cur.k_buffers[0] is not kv_pool.get_key_buffer(start0):
            start = getattr(kv_pool, "start_layer", 0) or 0
            k_buffers = [kv_pool.get_key_buffer(start + i) for i in range(kv_pool.layer_num)]
            _SHARED[key] = cls(k_buffers, page_size, start_layer=start)
        return _SHARED[key]

    def __init__(self, k_buffers: list[torch.Tensor], page_size: int, start_layer: int = 0):
        self.page_size = page_size
        self.start_layer = start_layer
        self.k_buffers = k_buffers
        if page_size == 1:
            self.kmin = self.kmax = None
            return
        self.kmin = [torch.empty((k.shape[0] // page_size,) + tuple(k.shape[1:]), dtype=k.dtype, device=k.device) for k in k_buffers]
        self.kmax = [torch.empty_like(t) for t in self.kmin]

    def nbytes(self) -> int:
        if self.kmin is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.kmin + self.kmax)

    def _l(self, layer_id: int) -> int:
        return layer_id - self.start_layer

    def update_decode(self, layer_id: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor) -> None:
        """Fold one new key per request (``k: [B, H_kv, D]`` at ``slots``/``positions``) into its page summary.

        The first token of a page (``pos % P == 0``) starts a fresh summary: its slot page may hold a stale one.
        """
        if self.kmin is None:
            return
        l = self._l(layer_id)
        pages = (slots // self.page_size).long()
        first = (positions % self.page_size == 0).view(-1, 1, 1)
        k = k.to(self.kmin[l].dtype)
        self.kmin[l][pages] = torch.where(first, k, torch.minimum(self.kmin[l][pages], k))
        self.kmax[l][pages] = torch.where(first, k, torch.maximum(self.kmax[l][pages], k))

    def rebuild_from_keys(self, layer_id: int, row: torch.Tensor, start: int, end: int) -> None:
        """Recompute the summaries of every page touched by positions ``[start, end)`` of one request.

        ``row`` is the request's ``req_to_token`` row. Pages are summarised over positions
        ``[page_start, min(page_end, end))``; the padding of a partial last page repeats its last valid slot,
        which leaves min and max unchanged.
        """
        if self.kmin is None or end <= start:
            return
        P = self.page_size
        first_page = start // P
        slots = row[first_page * P : end].long()
        pad = (-slots.numel()) % P
        if pad:
            slots = torch.cat([slots, slots[-1:].expand(pad)])
        l = self._l(layer_id)
        keys = self.k_buffers[l][slots].view(-1, P, *self.k_buffers[l].shape[1:])
        pages = slots.view(-1, P)[:, 0] // P
        self.kmin[l][pages] = keys.amin(dim=1).to(self.kmin[l].dtype)
        self.kmax[l][pages] = keys.amax(dim=1).to(self.kmax[l].dtype)

    def get(self, layer_id: int, first_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summaries ``(kmin, kmax) [n, H_kv, D]`` of the pages whose first slots are ``first_slots``."""
        l = self._l(layer_id)
        if self.kmin is None:
            k = self.k_buffers[l][first_slots.long()]
            return k, k
        pages = (first_slots // self.page_size).long()
        # index_select: 2.5x faster than advanced indexing on CPU for the [n] rows read per layer per step.
        return torch.index_select(self.kmin[l], 0, pages), torch.index_select(self.kmax[l], 0, pages)


class RequestSummaryCache:
    """One routed request's summaries of its completed pages, per layer, contiguous per KV head
    (``[H_kv, pages, D]``): the retrieval leaf scores every page of the context each step, and gathering the
    summaries from the pool (a page's summary lives at its physical page) was the cost of that step.

    A page is final once all its tokens are written, so the cache only appends: the pages completed since the
    last step are copied from the :class:`PageSummaryStore` once. The page being written (the tail) is always
    read from the store. Costs ``2 * H_kv * D`` elements per completed page per layer (1/P of the request's K
    bytes): used only where the request's exact KV stays on the device anyway (keep mode), so it is
    proportionate to what the request holds.
    """

    def __init__(self, num_layers: int):
        self.kmin: list = [None] * num_layers
        self.kmax: list = [None] * num_layers
        self.count = [0] * num_layers

    def full_pages(self, store: PageSummaryStore, lidx: int, layer_id: int, req_row: torch.Tensor, n_full: int):
        """``(kmin, kmax)`` of pages ``[0, n_full)``, each ``[H_kv, n_full, D]`` (views of the cache)."""
        have = self.count[lidx]
        if n_full > have:
            P = store.page_size
            kmin, kmax = store.get(layer_id, req_row[have * P : (n_full - 1) * P + 1 : P])  # [m, H_kv, D]
            cur = self.kmin[lidx]
            if cur is None or cur.shape[1] < n_full:
                cap = max(n_full, 64, 0 if cur is None else 2 * cur.shape[1])
                grown_min = kmin.new_empty((kmin.shape[1], cap, kmin.shape[2]))
                grown_max = torch.empty_like(grown_min)
                if cur is not None:
                    grown_min[:, :have] = cur[:, :have]
                    grown_max[:, :have] = self.kmax[lidx][:, :have]
                self.kmin[lidx], self.kmax[lidx] = grown_min, grown_max
            self.kmin[lidx][:, have:n_full] = kmin.transpose(0, 1)
            self.kmax[lidx][:, have:n_full] = kmax.transpose(0, 1)
            self.count[lidx] = n_full
        return self.kmin[lidx][:, :n_full], self.kmax[lidx][:, :n_full]
