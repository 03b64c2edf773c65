"""MuxRadixCache: SGLang's Python RadixCache, extended to index the multiplexed memory.

Registered as radix cache backend ``mux`` (``--radix-cache-backend mux``) by ``sglang_mux.plugin``.

What it adds to the parent, and nothing else:
* a :class:`PageTable` on every node (``node.mux_pages``), created on insert and cut on split, so the tree is
  the index of where each page's exact copy lives, its importance and its leaf views;
* on request checkpoint, the request's heavy-hitter scores are folded into the tables of the pages it read;
* on release, the request's per-request mux state is dropped; in drop mode the slots it already freed are not
  freed twice, and only its exact prefix is ever inserted (a node only holds pages whose exact copy exists).
Prefix matching, locking, eviction and sizes are the parent's.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache

from sglang_mux.config import MuxConfig
from sglang_mux.memory.page_table import PageTable
from sglang_mux.memory.tiers import shared_tier_manager
from sglang_mux.router.requests import REGISTRY

logger = logging.getLogger(__name__)


class MuxRadixCache(RadixCache):
    def __init__(self, params, mux_config: MuxConfig | None = None, num_layers: int = 1):
        self.mux_config = mux_config or MuxConfig(page_size=params.page_size or 1)
        self.num_layers = num_layers
        self.registry = REGISTRY
        self.tiers = None  # the TierManager, shared with the attention backend (set by the plugin wiring)
        super().__init__(params)

    # ------------------------------------------------------------------ page tables
    def page_table(self, node) -> PageTable:
        pt = getattr(node, "mux_pages", None)
        if pt is None or len(pt) * self.page_size != len(node.value):
            pt = PageTable.for_value(node.value, self.page_size, self.num_layers)
            node.mux_pages = pt
        return pt

    def _split_node(self, key, child, split_len: int):
        child_pt = getattr(child, "mux_pages", None)
        new_node = super()._split_node(key, child, split_len)
        if child_pt is not None:
            new_node.mux_pages, child.mux_pages = child_pt.split(split_len // self.page_size)
        return new_node

    def _insert_helper(self, node, key, value, priority: int = 0, inserted_len: int = 0):
        prefix_len, last = super()._insert_helper(node, key, value, priority, inserted_len)
        n = last
        while n is not None and n is not self.root_node and getattr(n, "mux_pages", None) is None:
            self.page_table(n)
            n = n.parent
        return prefix_len, last

    def iter_nodes(self):
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------ request lifecycle
    def checkpoint(self, req, *, up_to: int):
        st = self.registry.peek(req.rid)
        if st is not None:
            off = st.off_device_pages()
            if off:
                # Only the device-resident exact prefix (before the first page that left) may enter the tree.
                up_to = min(up_to, min(off) * self.page_size)
            elif not req.finished() and self._may_drop(st, up_to):
                # Drop mode frees a routed request's own tail; publishing it to the tree would make it shared.
                up_to = min(up_to, req.kv.cache_protected_len)
        super().checkpoint(req, up_to=up_to)
        if st is not None:
            st.protected_len = req.kv.cache_protected_len
            if st.heavy_scores is not None:
                self._fold_importance(req.last_node, st.heavy_scores)

    def _may_drop(self, st, seq_len: int) -> bool:
        if st.options.exact:
            return False
        cfg = st.options.effective_config(self.mux_config)
        return (cfg.drop_cold or cfg.tiered) and seq_len > cfg.budget // 2

    def _fold_importance(self, last_node, scores: torch.Tensor) -> None:
        path = []
        n = last_node
        while n is not None and n is not self.root_node:
            path.append(n)
            n = n.parent
        page = 0
        for node in reversed(path):
            pt = self.page_table(node)
            if page >= scores.shape[1]:
                break
            pt.fold_importance(scores[:, page : page + len(pt)])
            page += len(pt)

    def free_kv_row(self, kv, ranges):
        pages = self.registry.dropped_in_row(kv.req_pool_idx)
        if pages:
            # Drop mode already gave these slots back: freeing them again would corrupt the allocator.
            P = self.page_size
            ranges = _subtract_ranges(ranges, [(p * P, (p + 1) * P) for p in sorted(pages)])
        super().free_kv_row(kv, ranges)

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        st = self.registry.release(req.rid)
        if st is not None and st.demoted and self.tiers is not None:
            for key in st.demoted.values():
                self.tiers.evict(key)


def _subtract_ranges(ranges, holes):
    """Half-open ``ranges`` minus ``holes`` (both ascending, disjoint). ``[(0,10)] - [(2,4)] -> [(0,2),(4,10)]``."""
    out = []
    for a, b in ranges:
        cur = a
        for h0, h1 in holes:
            if h1 <= cur or h0 >= b:
                continue
            if h0 > cur:
                out.append((cur, h0))
            cur = max(cur, h1)
        if cur < b:
            out.append((cur, b))
    return out


def build_mux_radix_cache(ctx) -> MuxRadixCache:
    """Factory for SGLang's radix cache registry (called inside the scheduler process)."""
    cfg = MuxConfig.effective_for_server(ctx.params.page_size)
    pool = ctx.tp_worker.model_runner.token_to_kv_pool if ctx.tp_worker is not None else None
    num_layers = getattr(pool, "layer_num", 1) if pool is not None else 1
    cache = MuxRadixCache(ctx.params, cfg, num_layers=num_layers)
    cache.tiers = shared_tier_manager(cfg)
    logger.info("sglang-mux: radix cache 'mux' (page_size=%d, budget=%d)", cfg.page_size, cfg.budget)
    return cache
