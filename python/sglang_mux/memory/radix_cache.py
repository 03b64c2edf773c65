"""MuxRadixCache: SGLang's Python RadixCache, extended to index the multiplexed memory.

Registered as radix cache backend ``mux`` (``--radix-cache-backend mux``) by ``sglang_mux.plugin``.

What it adds to the parent, and nothing else:
* a :class:`PageTable` on every node (``node.mux_pages``), created on insert and cut on split, so the tree is
  the index of each page's device copy (and so of its key summary);
* on release, the request's per-request mux state is dropped; in drop mode the slots it already freed are not
  freed twice, and only its exact prefix is ever inserted (a node only holds pages whose exact copy exists);
* with tiers: pages evicted from the device, and the off-device tail of a finished tiered request, stay matchable
  from the host/disk tiers (``memory/prefix_tiers.py``) and are loaded back on a prefix hit.
Prefix matching, locking, eviction and sizes are the parent's.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from sglang_mux.config import MuxConfig
from sglang_mux.memory.page_table import PageTable
from sglang_mux.memory.page_summaries import PageSummaryStore
from sglang_mux.memory.prefix_tiers import namespace_of, page_hashes, tier_key
from sglang_mux.memory.tiers import PageIntegrityError, shared_tier_manager
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.memory.requests import REGISTRY
from sglang_mux.router.route_rule import heavy_ranked_tokens, may_route, scores_heavy_hitters
from sglang_mux.router.spine import StaticSpineRouter

logger = logging.getLogger(__name__)


class MuxRadixCache(RadixCache):
    def __init__(self, params, mux_config: MuxConfig | None = None):
        self.mux_config = mux_config or MuxConfig(page_size=params.page_size or 1)
        self.registry = REGISTRY
        self.router = StaticSpineRouter(self.mux_config)  # the requests' effective configs, as the backend sees them
        self.tiers = None  # the TierManager, shared with the attention backend (set by the factory)
        self.prefix_pages = 0  # pages of the prefix cache held in lower tiers (index size)
        self.loaded_back_pages = 0
        self._checkpointing = False
        self._lower: set[int] = set()  # prefix hashes whose page is (or was) in a lower tier
        super().__init__(params)

    def reset(self):
        """SGLang's reset (start-up, ``/flush_cache``), and the prefix pages this cache keeps in host and disk: a
        flushed cache must not serve prefixes from below. Remote-store copies stay (other servers may share them)."""
        super().reset()
        if getattr(self, "tiers", None) is not None:
            self.tiers.drop_prefix_copies()
            self._lower = {h for h in self._lower if self.tiers.tier_of(tier_key(h)) == "remote"}
            self.prefix_pages = len(self._lower)

    # ------------------------------------------------------------------ page tables
    def page_table(self, node) -> PageTable:
        pt = getattr(node, "mux_pages", None)
        if pt is None or len(pt) * self.page_size != len(node.value):
            pt = PageTable.for_value(node.value, self.page_size)
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

    # ------------------------------------------------------------------ prefix pages in lower tiers
    def _kv_pool(self):
        return self.token_to_kv_pool_allocator.get_kvcache()

    def _records(self, slots) -> "torch.Tensor":
        """``[n, L, 2, P, H, D]`` exact KV of the pages whose slots (page-aligned, n*P) are given."""
        pool, P = self._kv_pool(), self.page_size
        start = getattr(pool, "start_layer", 0) or 0
        kv = torch.stack([torch.stack([pool.get_key_buffer(start + i)[slots], pool.get_value_buffer(start + i)[slots]])
                          for i in range(pool.layer_num)])
        return kv.view(pool.layer_num, 2, -1, P, *kv.shape[3:]).permute(2, 0, 1, 3, 4, 5)

    def _path_tokens(self, node) -> tuple[list, object]:
        keys, n = [], node
        while n is not None and n is not self.root_node:
            keys.append(n.key)
            n = n.parent
        tokens = []
        for k in reversed(keys):
            tokens.extend(list(k.token_ids))
        return tokens, (namespace_of(keys[0]) if keys else None)

    def _offload_prefix_pages(self, hashes: list[int], records) -> None:
        for h, rec in zip(hashes, records):
            if h in self._lower and self.tiers.tier_of(tier_key(h)) is not None:
                continue
            if self.tiers.demote(tier_key(h), rec, reclaimable=True) is not None:
                self._lower.add(h)

    def _delete_leaf(self, node):
        # Called by the parent's evict() right after it returned the leaf's slots to the allocator and before
        # anything can reuse them (no allocation happens inside evict), so the KV is still intact: offload it.
        if self.tiers is not None and node.value is not None and len(node.value):
            tokens, ns = self._path_tokens(node)
            first = (len(tokens) - len(node.value)) // self.page_size
            hashes = page_hashes(tokens, ns, self.page_size)[first:]
            self._offload_prefix_pages(hashes, self._records(node.value.long()))
        super()._delete_leaf(node)

    def _request_options(self, req) -> MuxRequestOptions:
        """The mux options the request was admitted with; the server's when unknown (no request, warm-up)."""
        st = self.registry.peek(req.rid) if req is not None else None
        return st.options if st is not None else MuxRequestOptions()

    def _observation_cap(self, key_len: int, options: MuxRequestOptions) -> int | None:
        """Longest prefix a routable prompt may take from the cache: its last ``--mux-observation-window`` tokens
        are always recomputed, so heavy-hitter scoring (which needs their queries) and hence the routed output do
        not depend on what happened to be cached. ``None``: no cap (short prompts, exact requests, or no heavy
        leaf), decided by the request's own budget as the attention backend decides it."""
        cfg = self.router.effective_config(options)
        if not scores_heavy_hitters(key_len, cfg.budget, heavy_ranked_tokens(cfg), options.exact):
            return None
        cap = max(key_len - cfg.observation_window, 0) // self.page_size * self.page_size
        return cap if cap < key_len else None

    def match_prefix(self, params):
        cap = None
        if not self._checkpointing:
            cap = self._observation_cap(len(params.key), self._request_options(getattr(params, "req", None)))
        if cap is not None:
            params = dataclasses.replace(params, key=params.key[:cap])
        res = super().match_prefix(params)
        if self.tiers is None or not self._lower or self.disable:
            return res
        key, _ = params.key.maybe_to_bigram_view(self.is_eagle)
        key = key.page_aligned(self.page_size)
        P, m = self.page_size, res.device_prefix_len
        hashes = page_hashes(list(key.token_ids), namespace_of(key), P)
        run = []
        for h in hashes[m // P :]:
            if h not in self._lower or self.tiers.tier_of(tier_key(h)) is None:
                break
            run.append(h)
        if not run or self.token_to_kv_pool_allocator.available_size() < P:
            return res
        run = run[: self.token_to_kv_pool_allocator.available_size() // P]
        loaded = self._load_back(run)
        if loaded is None:
            return res
        prefix = self.path_device_indices(res.last_device_node)[:m].long()
        self.insert(InsertParams(key=key[: m + loaded.numel()], value=torch.cat([prefix, loaded])))
        return super().match_prefix(params)

    def _load_back(self, run: list[int]):
        """Copy the pages of ``run`` (consecutive prefix hashes) into new device slots; their slots, or None."""
        P = self.page_size
        records = []
        for h in run:
            try:
                records.append(self.tiers.get(tier_key(h)))
            except PageIntegrityError:
                self.tiers.evict(tier_key(h))
                self._lower.discard(h)
                break  # a page that cannot be trusted ends the hit; the rest is recomputed by prefill
        if not records:
            return None
        slots = self.token_to_kv_pool_allocator.alloc(len(records) * P)
        if slots is None:
            return None
        slots = slots.long()
        pool = self._kv_pool()
        start = getattr(pool, "start_layer", 0) or 0
        rec = torch.stack(records)  # [n, L, 2, P, H, D]
        for i in range(pool.layer_num):
            pool.get_key_buffer(start + i)[slots] = rec[:, i, 0].reshape(-1, *rec.shape[4:]).to(pool.get_key_buffer(start + i).dtype)
            pool.get_value_buffer(start + i)[slots] = rec[:, i, 1].reshape(-1, *rec.shape[4:]).to(pool.get_value_buffer(start + i).dtype)
            self._summaries().rebuild_from_keys(start + i, slots, 0, slots.numel())
        for h in run[: len(records)]:
            self.tiers.evict(tier_key(h))
            self._lower.discard(h)
        self.loaded_back_pages += len(records)
        return slots

    def _summaries(self) -> PageSummaryStore:
        return PageSummaryStore.for_pool(self._kv_pool(), self.page_size)

    def _adopt_finished_tail(self, req, st, first_off_page: int, up_to: int) -> None:
        """A finished tiered request's pages from its first off-device page on become prefix-cache pages in the
        lower tiers (its demoted copies are re-keyed, resident ones copied), so a later prompt with the same prefix
        loads them back instead of recomputing them."""
        P = self.page_size
        # Only pages whose tokens are all known can be keyed: a request finished by an abort can hold more KV than
        # its token list covers (SGLang's set_finish_with_abort replaces the prompt by one token).
        n_full = min(up_to, len(req.full_untruncated_fill_ids)) // P
        if n_full <= first_off_page:
            return
        tokens = list(req.full_untruncated_fill_ids[: n_full * P])
        ns = namespace_of(RadixKey(tokens[:P], req.extra_key, is_bigram=self.is_eagle, cache_salt=req.cache_salt))
        hashes = page_hashes(tokens, ns, P)
        row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
        for j in range(first_off_page, n_full):
            h = hashes[j]
            if j in st.demoted:
                # The page stays "off the device" for this request (its slots are already free); only the
                # stored copy changes owner, so release must neither free nor evict it.
                if st.demoted[j] is not None and self.tiers.rename(st.demoted[j], tier_key(h)):
                    self._lower.add(h)
                st.demoted[j] = None
            else:
                slots = row[j * P : (j + 1) * P].long()
                self._offload_prefix_pages([h], self._records(slots))

    # ------------------------------------------------------------------ request lifecycle
    def checkpoint(self, req, *, up_to: int):
        st = self.registry.peek(req.rid)
        if st is not None:
            off = st.off_device_pages()
            if off:
                # Only the device-resident exact prefix (before the first page that left) may enter the tree.
                if st.demoted and self.tiers is not None and req.finished():
                    self._adopt_finished_tail(req, st, min(off), up_to)
                up_to = min(up_to, min(off) * self.page_size)
            elif not req.finished() and self._may_drop(st, up_to):
                # Drop mode frees a routed request's own tail; publishing it to the tree would make it shared.
                up_to = min(up_to, req.kv.cache_protected_len)
        # The parent's checkpoint re-matches what it inserted and needs the whole key back.
        self._checkpointing = True
        try:
            super().checkpoint(req, up_to=up_to)
        finally:
            self._checkpointing = False
        if st is not None:
            st.protected_len = req.kv.cache_protected_len

    def _may_drop(self, st, seq_len: int) -> bool:
        cfg = self.router.effective_config(st.options)
        return (cfg.drop_cold or cfg.tiered) and may_route(seq_len, cfg.budget, st.options.exact)

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
                if key is not None:  # None: adopted by the prefix cache
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
    cache = MuxRadixCache(ctx.params, cfg)
    cache.tiers = shared_tier_manager(cfg)
    logger.info("sglang-mux: radix cache 'mux' (page_size=%d, budget=%d)", cfg.page_size, cfg.budget)
    return cache
