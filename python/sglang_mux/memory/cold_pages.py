"""ColdPageMover: what happens to a routed request's cold pages — dropped for good, or demoted to lower tiers.

Owned by the attention backend (which calls it at plan time, before the step's forward) and working only on
the request's *own* full pages outside its hot set; the radix tree's pages are never touched here.

    drop    (--mux-drop-cold)  free the device slots; the page is gone (never read again)
    drop + quantize (--mux-drop-cold --mux-cold-bits 8|4|2)  the bytes the query-aware leaves' exact pages would
                               hold keep quantized copies of the best cold pages instead (by heavy score; about
                               1.7x / 2.9x / 4.6x as many pages at 8 / 4 / 2 bits for SmolLM2), with their summaries;
                               retrieval scores them and reads them dequantized one layer at a time; the other
                               cold pages are dropped. Equal device bytes to exact-only drop, more context kept
    demote  (tiers)            copy the page (all layers, K and V) to host/disk, keep its summaries on the device
                               with the request, free the device slots; retrieval reads it back through the
                               request's staging area (``staged_record``)
    quantize (--mux-cold-bits 8|4|2, with tiers)  when demoting, also keep a quantized copy of the page
                               (``memory/quantized_pages.py``, KIVI-style) on the device with the request; retrieval
                               then reads the dequantized copy (into the staging area) instead of fetching the exact
                               one, which stays in the tiers for prefix reuse once the request finishes
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from mux_kernels.reference import num_pages_of
from sglang_mux.config import MuxConfig
from sglang_mux.leaves import LEAVES, query_aware_shares
from sglang_mux.memory.quantized_pages import dequantize_page, dequantize_page_layer, pages_at_equal_bytes, quantize_page
from sglang_mux.memory.staging import StagingArea
from sglang_mux.memory.tiers import PageIntegrityError
from sglang_mux.metrics import STATS

logger = logging.getLogger(__name__)


class ColdPageMover:
    def __init__(self, *, kv_pool, allocator, req_to_token, summaries, tiers, page_size, num_layers, start_layer):
        self.kv_pool = kv_pool
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.summaries = summaries
        self.tiers = tiers
        self.page_size = page_size
        self.num_layers = num_layers
        self.start_layer = start_layer
        # background fetches into staging areas (skip mode)
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mux-fetch") if tiers else None

    def cold_pages(self, p, dropping: bool) -> list[int]:
        """The request's own full pages outside its hot set, still on the device.

            pages  [ tree-owned prefix | own tail .............................. | tail page ]
            hot     (never touched)      what each leaf keeps on the device         always
        Each registered leaf says what it keeps (``Leaf.device_pages``, ``Leaf.device_best_pages``): today the
        sinks, the window, and the best pages by heavy score (``heavy``, plus ``retrieval`` when ``dropping``).
        Heavy score here is the max over layers: the pages some layer still wants.
        """
        st, g, P = p.state, p.grant, self.page_size
        if st.protected_len is None or self.allocator is None:
            return []  # ownership not known yet: touch nothing
        n = num_pages_of(p.seq_len, P)
        first_own = -(-st.protected_len // P)
        gone = st.off_device_pages()
        keep: set[int] = set()
        hot_pages = 0
        for leaf in LEAVES.values():
            keep.update(leaf.device_pages(n, g))
            hot_pages += leaf.device_best_pages(g, dropping)
        if st.heavy_scores is not None and hot_pages > 0:
            scores = st.scores(self.num_layers, n, st.heavy_scores.device)[:, :n].amax(dim=0)
            if gone:
                scores[list(gone)] = float("-inf")
            scores[list(keep)] = float("-inf")
            keep |= set(torch.topk(scores, min(hot_pages, n)).indices.tolist())
        return [q for q in range(first_own, n - 1) if q not in keep and q not in gone]

    def _page_slots(self, row: int, pages: list[int]) -> torch.Tensor:
        req_row = self.req_to_token[row]
        idx = torch.tensor(pages, dtype=torch.long, device=req_row.device)
        return req_row[(idx.view(-1, 1) * self.page_size + torch.arange(self.page_size, device=req_row.device)).flatten()].long()

    def drop(self, p, cfg: MuxConfig | None = None) -> None:
        """``--mux-drop-cold``: free the device KV of the request's cold pages for good (sinks, window and the
        ``heavy + retrieval`` best pages stay). A dropped page is never read again. With ``--mux-cold-bits`` < 16
        the query-aware leaves' bytes keep quantized copies of the best cold pages instead (``keep_quantized``)."""
        quantizing = cfg is not None and cfg.cold_bits < 16
        cold = self.cold_pages(p, dropping=not quantizing)
        if not cold:
            return
        kept = self.keep_quantized(p, cold, cfg) if quantizing else set()
        self.allocator.free(self._page_slots(p.row, cold))
        dropped = [q for q in cold if q not in kept]
        p.state.dropped_pages.update(dropped)
        STATS.dropped_tokens += len(dropped) * self.page_size
        STATS.freed_device_tokens += len(cold) * self.page_size

    def keep_quantized(self, p, cold: list[int], cfg: MuxConfig) -> set:
        """Drop mode with quantized cold pages: of the request's quantized pages and its new ``cold`` ones, the best
        by heavy score (max over layers) that fit in the bytes of the query-aware shares' exact pages keep (or get) a
        quantized copy and their summaries; quantized pages that fell out of the best are dropped. Returns the
        ``cold`` pages that were quantized."""
        st, P = p.state, self.page_size
        exact_pages = sum(p.grant[s] for s in query_aware_shares())
        kb = self.kv_pool.get_key_buffer(self.start_layer)
        cap = pages_at_equal_bytes(exact_pages, P, self.num_layers, kb.shape[1], kb.shape[2], kb.element_size(),
                                   cfg.cold_bits, cfg.quant_group)
        n = num_pages_of(p.seq_len, P)
        have = [q for q in st.quantized_pages if st.demoted.get(q, 0) is None]
        cand = torch.tensor(have + cold, dtype=torch.long)
        if st.heavy_scores is not None:
            score = st.scores(self.num_layers, n, st.heavy_scores.device)[:, :n].amax(dim=0)[cand].float()
        else:  # nothing ranks them: the most recent first
            score = cand.float()
        best = set(cand[torch.topk(score, min(cap, cand.numel())).indices].tolist()) if cap > 0 else set()
        for q in have:
            if q not in best:  # fell out of the best: dropped for good
                del st.demoted[q]
                gone = st.quantized_pages.pop(q, None)
                st.quantized_bytes -= gone.nbytes() if gone is not None else 0
                st.dropped_pages.add(q)
        new = [q for q in cold if q in best]
        if new:
            records = self._page_records(p.row, new)
            self._grow_cold_summaries(st, n, records.device)
            first_slots = self._page_slots(p.row, new).view(len(new), P)[:, 0]
            for j, page in enumerate(new):
                st.quantized_pages[page] = qp = quantize_page(records[j], cfg.cold_bits, cfg.quant_group)
                st.quantized_bytes += qp.nbytes()
                st.demoted[page] = None  # off the device, read from its quantized copy; no tier holds it
                for i in range(self.num_layers):
                    kmin, kmax = self.summaries.get(self.start_layer + i, first_slots[j : j + 1])
                    st.cold_kmin[i, page], st.cold_kmax[i, page] = kmin[0], kmax[0]
            STATS.quantized_cold_pages += len(new)
        return set(new)

    def _page_records(self, row: int, pages: list[int]) -> torch.Tensor:
        """The exact KV of ``pages`` of a request, every layer: ``[n, L, 2, P, H, D]``."""
        P, L = self.page_size, self.num_layers
        slots = self._page_slots(row, pages)
        kv = torch.stack([torch.stack([self.kv_pool.get_key_buffer(self.start_layer + i)[slots],
                                       self.kv_pool.get_value_buffer(self.start_layer + i)[slots]]) for i in range(L)])
        return kv.view(L, 2, len(pages), P, *kv.shape[3:]).permute(2, 0, 1, 3, 4, 5)

    def quantized_layer(self, st, page: int, lidx: int):
        """One layer ``[2, P, H, D]`` of a page kept only as a quantized copy (drop mode), or None."""
        qp = st.quantized_pages.get(page)
        if qp is None or st.demoted.get(page, 0) is not None:
            return None
        return dequantize_page_layer(qp, lidx)

    def demote(self, p, cfg: MuxConfig) -> None:
        """Tiered mode: copy the request's cold pages (sinks, window and heavy hitters stay) to the host/disk
        tiers, keep their summaries on the device, and give their device slots back. Retrieval still scores
        them and reads them through the staging area."""
        st = p.state
        cold = self.cold_pages(p, dropping=False)
        if not cold:
            return
        P, L = self.page_size, self.num_layers
        slots = self._page_slots(p.row, cold)
        kv = self._page_records(p.row, cold)  # [n, L, 2, P, H, D]
        first_slots = slots.view(len(cold), P)[:, 0]
        n_total = num_pages_of(p.seq_len, P)
        self._grow_cold_summaries(st, n_total, first_slots.device)
        freed = []
        for j, page in enumerate(cold):
            key = (p.rid, page)
            if self.tiers.demote(key, kv[j]) is None:
                break  # no tier has room: the rest stay on the device
            st.demoted[page] = key
            if cfg.cold_bits < 16:
                st.quantized_pages[page] = qp = quantize_page(kv[j], cfg.cold_bits, cfg.quant_group)
                st.quantized_bytes += qp.nbytes()
            for i in range(L):
                kmin, kmax = self.summaries.get(self.start_layer + i, first_slots[j : j + 1])
                st.cold_kmin[i, page], st.cold_kmax[i, page] = kmin[0], kmax[0]
            freed.append(j)
        if freed:
            idx = torch.tensor(freed, dtype=torch.long)
            self.allocator.free(slots.view(len(cold), P)[idx].flatten())
            STATS.demoted_pages += len(freed)
            STATS.freed_device_tokens += len(freed) * P
        if st.staging is None:
            st.staging = StagingArea(cfg.staging, first_slots.device)

    def accounting(self, st, seq_len: int, held: int) -> dict:
        """Bytes of one tiered request by tier: device (resident KV) + host + disk == its whole context's KV."""
        kvb = STATS.kv_bytes_per_token
        per_tier = {"host": 0, "disk": 0}
        for key in st.demoted.values():
            tier = self.tiers.tier_of(key) if key is not None else None
            if tier is not None:
                per_tier[tier] += self.page_size * kvb
        cold_summary_bytes = 2 * len(st.demoted) * self.num_layers * self.summaries.k_buffers[0][0].numel() * self.summaries.k_buffers[0].element_size()
        return {
            "context_tokens": seq_len,
            "context_kv_bytes": seq_len * kvb,
            "device_kv_bytes": held * kvb,
            "host_kv_bytes": per_tier["host"],
            "disk_kv_bytes": per_tier["disk"],
            "staging_bytes": st.staging.nbytes() if st.staging is not None else 0,
            "demoted_page_summary_bytes": cold_summary_bytes,
            "quantized_cold_bytes": sum(qp.nbytes() for qp in st.quantized_pages.values()),
        }

    def _grow_cold_summaries(self, st, n_pages: int, device) -> None:
        cur = st.cold_kmin
        if cur is not None and cur.shape[1] >= n_pages:
            return
        ref = self.summaries.k_buffers[0]
        cap = max(n_pages, 2 * (0 if cur is None else cur.shape[1]), 64)
        shape = (self.num_layers, cap) + tuple(ref.shape[1:])
        new_min, new_max = ref.new_zeros(shape), ref.new_zeros(shape)
        if cur is not None:
            new_min[:, : cur.shape[1]], new_max[:, : cur.shape[1]] = st.cold_kmin, st.cold_kmax
        st.cold_kmin, st.cold_kmax = new_min, new_max

    def staged_record(self, st, page: int, wait: bool):
        """The KV record of a demoted page from the staging area: the exact one, fetched from the tiers if ``wait``
        (None when skipped), or, when the page was demoted with ``--mux-cold-bits`` < 16, its quantized device copy,
        dequantized (never skipped: it is on the device)."""
        rec = st.staging.get(page)
        if rec is not None:
            STATS.staging_hits += 1
            return rec
        qp = st.quantized_pages.get(page)
        if qp is not None:
            rec = dequantize_page(qp)
            st.staging.put(page, rec)
            return rec
        key = st.demoted[page]
        if not wait:
            STATS.staging_skipped += 1
            if page not in st.staging.pending:
                st.staging.pending.add(page)
                self._fetcher.submit(self._fetch_into_staging, st, page, key)
            return None
        STATS.staging_waited += 1
        rec = self.tiers.get(key)
        st.staging.put(page, rec)
        return st.staging.get(page)

    def stage_many(self, st, pages: list[int]) -> int:
        """``wait`` mode: the demoted ``pages`` not yet staged (and with no quantized copy), fetched in ONE tier
        request (``TierManager.get_many``: a chunk's pages come together, disk files read concurrently) into the
        staging area, at most its capacity. Returns how many were fetched; a failing page is left to
        ``staged_record``, which fails its request alone."""
        if st.staging is None or self.tiers is None:
            return 0
        missing = [q for q in pages if q in st.demoted and st.demoted[q] is not None and q not in st.quantized_pages
                   and st.staging.get(q) is None][: st.staging.capacity]
        if len(missing) < 2:
            return 0
        try:
            records = self.tiers.get_many([st.demoted[q] for q in missing])
        except PageIntegrityError:
            return 0  # page by page, so only the bad one fails
        for q, rec in zip(missing, records):
            st.staging.put(q, rec)
        STATS.staging_waited += len(missing)
        STATS.staging_batched_fetches += 1
        return len(missing)

    def _fetch_into_staging(self, st, page: int, key) -> None:
        try:
            st.staging.put(page, self.tiers.get(key))
        except PageIntegrityError as e:
            st.error = f"request {key[0]}: {e}"
            STATS.checksum_failures += 1
        except Exception as e:  # a background fetch must never take the scheduler down
            logger.warning("background fetch of page %s failed: %s", key, e)
