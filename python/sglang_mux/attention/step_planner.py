"""The step planner: which requests of a decode step are routed, and which pages each routed one reads per layer.

Per step (``plan_step``, from the backend's ``init_forward_metadata``): each request's grant from the spine router
(exact or routed, ``router/grant.py``), the cold-page moves of routed requests (their cold-page policy, keep /
drop / tier: ``memory/cold_policies.py``) and the step's stats. Per layer (``select``, from inside attention): the union of the
leaves' pages under the request's grant at that layer (``layer_grant``: ``--mux-layer-budget``), with the
query-aware page scores the retrieval and chunk leaves ask for (``page_scores``), and for a request with pages off
the device where their K/V come from (``gather_kv``). After a prefill (``observe_extend``): the page summaries of
what it wrote and the heavy-hitter scores of its observation window.

It lives in ``attention/``, not ``router/``: the router decides per request and holds no tensors; the planner turns
its grants into pages of this worker's KV pool, from the summaries and the layer's query, at forward time (so the
overlap scheduler never makes the choice stale). It owns the objects that choice reads: the page summaries, the
cold-page mover, the tiers and the request registry (the backend reaches them through it).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from sglang_mux.attention.importance import snapkv_page_scores
from sglang_mux.attention.routed_decode import (
    grouped_quest_head_bounds,
    grouped_quest_page_scores,
    num_pages_of,
    page_positions,
    quest_head_bounds,
    quest_page_scores_head_major,
    scatter_page_scores,
)
from sglang_mux.config import MuxConfig
from sglang_mux.leaves import LEAVES, LeafContext, query_aware_shares, ranked_shares
from sglang_mux.memory.cold_pages import ColdPageMover
from sglang_mux.memory.cold_policies import cold_policy_for
from sglang_mux.memory.page_summaries import PageSummaryStore, RequestSummaryCache
from sglang_mux.memory.tiers import PageIntegrityError, shared_tier_manager
from sglang_mux.metrics import STATS
from sglang_mux.router.grant import Grant
from sglang_mux.router.layer_budget import adaptive_factors, layer_grants, pyramid_factors
from sglang_mux.memory.requests import REGISTRY, RequestMemory
from sglang_mux.router.route_rule import heavy_ranked_tokens, scores_heavy_hitters
from sglang_mux.router.adaptive import ROOM_FRACTION, buckets
from sglang_mux.router.spine import MuxRouter, RouterPolicy

logger = logging.getLogger(__name__)


@dataclass
class RequestPlan:
    """One request of a decode step: its row in ``req_to_token``, its length and this step's route (the router
    policy's ``RouteDecision``: grant, whether the query-aware leaves score the query, per-layer spread)."""

    rid: str
    row: int
    seq_len: int
    grant: Grant
    state: RequestMemory
    refresh: bool = True
    layer_factors: Optional[tuple] = None
    policy: Optional[RouterPolicy] = None  # set when the policy reads the step's signals (``observe``)
    _layer_grants: Optional[list] = None
    _leaf_memo: Optional[dict] = None  # choices made once per step for every layer (--mux-chunk-layers shared)


@dataclass
class StepPlan:
    """A decode step's requests, in batch order; ``all_exact``: none is routed (the batch goes to the wrapped backend)."""

    requests: list[RequestPlan]
    all_exact: bool


class SelectedPages(NamedTuple):
    """The sorted logical pages one routed request reads at one layer, and how many each leaf chose; ``buckets``:
    when the request's router policy reads signals, each page's bucket (``router/adaptive.py::buckets``: sink and
    recent by position, else the ranked share of the leaf that chose it), aligned with ``pages``."""

    pages: torch.Tensor
    by_leaf: dict
    buckets: Optional[torch.Tensor] = None


def _seq_lens(fb) -> list:
    return fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()


class StepPlanner:
    def __init__(self, mux_config: MuxConfig, kv_pool, req_to_token, allocator=None):
        self.mux_config = mux_config
        self.router = MuxRouter(mux_config)
        self.allocator = allocator
        # the router's signals: per step, the attention mass per bucket of each request whose policy reads them
        # ([requests, layers, buckets], filled layer by layer, handed to the policies at the next plan)
        self.buckets = buckets()
        self._leaf_bucket = {name: self.buckets.index(leaf.ranked_shares[0]) if leaf.ranked_shares else
                             len(self.buckets) - 1 for name, leaf in LEAVES.items()}
        self._signal_rows: dict[str, int] = {}
        self._signal_plans: list[RequestPlan] = []
        self._signal_buf: Optional[torch.Tensor] = None
        self._layer_buckets: list = []
        # the query-aware leaves' last pages per request, (layer, leaf) -> (pages granted, pages), for the steps
        # the router does not refresh them; requests that leave the batch drop theirs
        self._reused: dict[str, dict] = {}
        self.registry = REGISTRY
        self.req_to_token = req_to_token
        self.kv_pool = kv_pool
        self.page_size = mux_config.page_size
        self.num_layers = kv_pool.layer_num
        self.start_layer = getattr(kv_pool, "start_layer", 0) or 0
        self.summaries = PageSummaryStore.for_pool(kv_pool, self.page_size)
        self.tiers = shared_tier_manager(mux_config)
        self.cold = ColdPageMover(
            kv_pool=kv_pool, allocator=allocator, req_to_token=req_to_token, summaries=self.summaries,
            tiers=self.tiers, page_size=self.page_size, num_layers=self.num_layers, start_layer=self.start_layer,
        )

    # ------------------------------------------------------------------ per step
    def plan_step(self, fb) -> StepPlan | None:
        """The decode step's plan (``None`` for anything else). An extend only records, per request, what its
        prefill leaves behind: summaries it rebuilds, the matched prefix the radix tree owns."""
        if fb.rids is None:
            return None
        if fb.forward_mode.is_extend() and fb.extend_prefix_lens_cpu is not None:
            # A request's first extend starts after its matched prefix, which the radix tree owns.
            for rid, prefix in zip(fb.rids, fb.extend_prefix_lens_cpu):
                st = self.registry.get(rid)
                st.summarized = True  # forward_extend rebuilds the summaries of what it writes
                st.summary_cache = None  # (re)prefilled: its pages may have moved
                if st.protected_len is None:
                    st.protected_len = int(prefix)
            return None
        if not fb.forward_mode.is_decode():
            return None
        self.hand_signals_to_router()
        seq_lens = _seq_lens(fb)
        rows = fb.req_pool_indices.tolist()
        plan = []
        room = self.device_room()
        for rid, row, L in zip(fb.rids, rows, seq_lens):
            st = self.registry.get(rid)
            st.row = row
            if not st.summarized:
                self.summarize_received_kv(row, L - 1)
                st.summarized = True
            policy = self.router.policy(st.options)
            static = self.router.grant(L, st.options)
            d = policy.decide(st, L, room, lambda: self.prefill_signal(st, L, static))
            p = RequestPlan(rid, row, L, d.grant, st, d.refresh, d.layer_factors,
                            policy if policy.wants_signals and not d.grant.exact else None)
            plan.append(p)
            if not p.grant.exact:
                cfg = self.router.effective_config(st.options)
                # the cold-page policies keep what the static split reads: a router that moves pages between
                # shares changes what is read, not what stays on the device
                cold_plan = p if static == p.grant else dataclasses.replace(p, grant=static)
                try:
                    cold_policy_for(cfg, self.tiers).move(self.cold, cold_plan, cfg)
                except Exception as e:
                    self.fail_request(p, e)
            held = L - len(st.off_device_pages()) * self.page_size
            STATS.device_kv_tokens_held[rid] = held
            if st.demoted:
                STATS.last_tiered_request = self.cold.accounting(st, L, held)
            if not p.grant.exact:
                STATS.max_routed_kv_tokens_held = max(STATS.max_routed_kv_tokens_held, held)
        by_precision = {"exact": sum(STATS.device_kv_tokens_held.get(p.rid, 0) for p in plan) * STATS.kv_bytes_per_token}
        for p in plan:
            if p.state.quantized_bytes:
                key = f"int{next(iter(p.state.quantized_pages.values())).bits}"
                by_precision[key] = by_precision.get(key, 0) + p.state.quantized_bytes
        STATS.device_kv_bytes_by_precision = by_precision
        self.start_signals(plan)
        if self._reused:
            live = {p.rid for p in plan}
            self._reused = {rid: v for rid, v in self._reused.items() if rid in live}
        routed = sum(not p.grant.exact for p in plan)
        STATS.decode_steps += 1
        STATS.routed_request_steps += routed
        STATS.exact_request_steps += len(plan) - routed
        STATS.last_routed_requests = routed
        STATS.last_exact_requests = len(plan) - routed
        STATS.last_max_context_tokens = max(seq_lens) if seq_lens else 0
        if routed == 0:
            STATS.last_max_pages_read = max((num_pages_of(L, self.page_size) for L in seq_lens), default=0)
        return StepPlan(plan, all(p.grant.exact for p in plan))

    # ------------------------------------------------------------------ the router's signals
    def device_room(self) -> bool:
        """The KV pool has room to grant more pages (at least ``ROOM_FRACTION`` of it free)."""
        a = self.allocator
        if a is None or not hasattr(a, "available_size"):
            return False
        return a.available_size() >= ROOM_FRACTION * getattr(self.kv_pool, "size", float("inf"))

    def prefill_signal(self, st: RequestMemory, seq_len: int, grant: Grant) -> Optional[list]:
        """Per layer, the share of the request's heavy-hitter mass (the prefill's observation window, plus the
        attention paid since) outside its sink and window pages: the router's first signal. None: not scored."""
        if st.heavy_scores is None or grant.exact:
            return None
        n = num_pages_of(seq_len, self.page_size)
        s = st.heavy_scores[:, :n].float().clamp(min=0)
        total = s.sum(dim=1)
        hot = s[:, : min(grant["sink"], n)].sum(dim=1) + s[:, max(n - max(grant["recent"], 1), 0) :].sum(dim=1)
        return ((total - hot).clamp(min=0) / total.clamp(min=1e-12)).tolist()

    def start_signals(self, plan: list[RequestPlan]) -> None:
        """Make room for this step's signals of the requests whose policy reads them."""
        sig = [p for p in plan if p.policy is not None]
        self._signal_plans = sig
        self._signal_rows = {p.rid: i for i, p in enumerate(sig)}
        self._signal_buf = torch.zeros((len(sig), self.num_layers, len(self.buckets))) if sig else None

    @property
    def measuring(self) -> bool:
        """This step has requests whose router policy reads the attention mass (``observe_attention``)."""
        return self._signal_buf is not None

    def observe_attention(self, lidx: int, ok: list[int], plan: list[RequestPlan], mass: torch.Tensor) -> None:
        """After one layer's routed attention: the mass per page (``mass [len(ok), K]``, aligned with the pages
        ``select_layer`` returned) summed per bucket, for the requests whose policy reads signals."""
        if self._signal_buf is None or not self._layer_buckets:
            return
        nb = len(self.buckets)
        ids = torch.full(mass.shape, nb, dtype=torch.long)
        rows = []
        for j, (i, b) in enumerate(zip(ok, self._layer_buckets)):  # select_layer kept one entry per ok request
            r = self._signal_rows.get(plan[i].rid)
            if b is None or r is None:
                continue
            ids[j, : b.numel()] = b
            rows.append((j, r))
        if not rows:
            return
        sums = torch.zeros((mass.shape[0], nb + 1)).scatter_add_(1, ids, mass.float().cpu())[:, :nb]
        j_idx = torch.tensor([j for j, _ in rows])
        r_idx = torch.tensor([r for _, r in rows])
        self._signal_buf[r_idx, lidx] = sums[j_idx]

    def hand_signals_to_router(self) -> None:
        """The last step's signals to each request's policy (``RouterPolicy.observe``), once per step."""
        if self._signal_buf is None:
            return
        table = self._signal_buf.tolist()
        for p, per_layer in zip(self._signal_plans, table):
            p.policy.observe(p.state, per_layer, p.grant)
        self._signal_buf = None
        self._signal_plans = []

    def summarize_received_kv(self, row: int, n_tokens: int) -> None:
        """Summaries for KV that was written elsewhere (PD transfer): rebuilt from the keys, every layer.

        Rebuilding costs one read of the request's keys, once; shipping summaries would cost 2/P of the KV
        bytes on the wire for every request, so the decode side rebuilds (docs/memory.md).
        """
        req_row = self.req_to_token[row]
        for i in range(self.num_layers):
            self.summaries.rebuild_from_keys(self.start_layer + i, req_row, 0, n_tokens)

    def fail_request(self, p: RequestPlan, err: Exception) -> None:
        """Second line of defence: the request is finished with an error by the scheduler hook
        (``router/hooks.py::abort_failed_requests``); the rest of the batch goes on. Logged once per request."""
        if p.state.error is None:
            logger.exception("mux: routed decode failed for request %s; aborting it", p.rid, exc_info=err)
            p.state.error = f"mux routed decode failed for this request: {type(err).__name__}: {err}"
        STATS.failed_requests += 1

    # ------------------------------------------------------------------ after a prefill
    def observe_extend(self, layer, fb, q) -> None:
        """After one layer of an extend wrote its KV: rebuild the page summaries of what it wrote and, for requests
        long enough to be routed later, take heavy-hitter scores from the observation window."""
        prefix = fb.extend_prefix_lens_cpu
        ext = fb.extend_seq_lens_cpu
        rows = fb.req_pool_indices.tolist()
        qv = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        start_q = 0
        for i, (row, L) in enumerate(zip(rows, _seq_lens(fb))):
            n_ext = int(ext[i])
            req_row = self.req_to_token[row]
            self.summaries.rebuild_from_keys(layer.layer_id, req_row, int(prefix[i]), L)
            rid = fb.rids[i] if fb.rids is not None else None
            if rid is not None and n_ext > 0 and self.wants_heavy_scores(rid, L):
                self.score_observation_window(layer, qv[start_q : start_q + n_ext], req_row, L, rid)
            start_q += n_ext

    def wants_heavy_scores(self, rid: str, seq_len: int) -> bool:
        st = self.registry.get(rid)
        cfg = self.router.effective_config(st.options)
        return scores_heavy_hitters(seq_len, cfg.budget, heavy_ranked_tokens(cfg), st.options.exact)

    def score_observation_window(self, layer, q_ext, req_row, L: int, rid: str) -> None:
        """SnapKV scores of the request's pages at this layer (``importance.snapkv_page_scores``) from the last
        ``--mux-observation-window`` queries of its prefill, into its heavy-score table."""
        cfg = self.router.effective_config(self.registry.get(rid).options)
        w = min(cfg.observation_window, q_ext.shape[0])
        q_win = q_ext[-w:]
        q_pos = torch.arange(L - w, L, device=q_ext.device)
        keys = self.kv_pool.get_key_buffer(layer.layer_id)[req_row[:L].long()]
        page_scores = snapkv_page_scores(q_win, q_pos, keys, layer.scaling, self.page_size)
        st = self.registry.get(rid)
        table = st.scores(self.num_layers, page_scores.numel(), page_scores.device)
        table[layer.layer_id - self.start_layer, : page_scores.numel()] = page_scores
        table[layer.layer_id - self.start_layer, page_scores.numel() :] = 0

    # ------------------------------------------------------------------ per layer
    def select(self, p: RequestPlan, lidx: int, q_req, req_row, scale: float | None = None) -> SelectedPages:
        """The sorted logical pages one routed request reads at one layer, and how many each leaf chose. ``scale``:
        the layer's softmax scale (default ``head_dim ** -0.5``)."""
        P = self.page_size
        n = num_pages_of(p.seq_len, P)
        dev = q_req.device
        taken = torch.zeros(n, dtype=torch.bool, device=dev)
        if p.state.dropped_pages:
            dropped = torch.tensor(sorted(p.state.dropped_pages), dtype=torch.long, device=dev)
            taken[dropped[dropped < n]] = True  # never read a dropped page: no leaf may choose it

        memo: list[torch.Tensor] = []

        def page_scores() -> torch.Tensor:  # once per request and layer, whichever leaves ask (retrieval, chunk)
            if not memo:
                memo.append(self.page_scores(p, lidx, q_req, req_row, scale))
            return memo[0]

        cfg = self.router.effective_config(p.state.options)

        def chunk_spans() -> tuple[torch.Tensor, torch.Tensor]:
            return p.state.chunk_spans(p.seq_len, P, cfg.chunk_tokens)

        scores = p.state.heavy_scores[lidx] if p.state.heavy_scores is not None else None
        if scores is not None and scores.numel() < n:
            scores = p.state.scores(self.num_layers, n, dev)[lidx]
        heavy_rank = cfg.chunk_score == "heavy" and scores is not None
        chunk_scores = (lambda: scores) if heavy_rank else page_scores
        step_memo = None
        if cfg.chunk_layers == "shared":  # one chunk choice per step: ranked by every layer's heavy scores
            if p._leaf_memo is None:
                p._leaf_memo = {}
            step_memo = p._leaf_memo
            if heavy_rank:
                chunk_scores = lambda: p.state.heavy_scores[:, :n].sum(dim=0)  # noqa: E731
        ctx = LeafContext(num_pages=n, taken=taken, heavy_scores=scores, page_scores=page_scores, chunk_spans=chunk_spans,
                          chunk_scores=chunk_scores, step_memo=step_memo)
        grant = self.layer_grant(p, lidx)
        chosen, by_leaf, ids = [], {}, []
        reuse = p.refresh is False or p.policy is not None  # the router may skip the query-aware leaves' scoring
        for name, leaf in LEAVES.items():
            if leaf.query_aware and reuse:
                pages = self.query_aware_pages(p, lidx, name, leaf, ctx, grant, scores)
            else:
                pages = leaf.select(ctx, grant)
            by_leaf[name] = int(pages.numel())
            ctx.taken[pages] = True
            chosen.append(pages)
            if p.policy is not None:
                ids.append(torch.full_like(pages, self._leaf_bucket[name]))
        if p.policy is None:
            return SelectedPages(torch.sort(torch.cat(chosen)).values, by_leaf)
        sel, order = torch.sort(torch.cat(chosen))
        b = torch.cat(ids)[order]
        b[sel < grant["sink"]] = 0
        b[sel >= n - max(grant["recent"], 1)] = 1
        return SelectedPages(sel, by_leaf, b)

    def query_aware_pages(self, p: RequestPlan, lidx: int, name: str, leaf, ctx: LeafContext, grant: Grant,
                          heavy: Optional[torch.Tensor]) -> torch.Tensor:
        """A query-aware leaf's pages under a router that may skip its scoring: scored (and kept) on refresh
        steps; otherwise the pages it chose last (those not taken yet), or, before it ever ran or after its share
        changed, its choice ranked by the heavy-hitter scores instead of this step's query (no page scoring)."""
        k = sum(grant[s] for s in leaf.share_places())
        kept = self._reused.setdefault(p.rid, {})
        last = kept.get((lidx, name))
        if p.refresh:
            pages = leaf.select(ctx, grant)
        elif last is not None and last[0] == k:
            return last[1][~ctx.taken[last[1]]]
        else:
            cheap = (lambda: heavy) if heavy is not None else None
            pages = leaf.select(dataclasses.replace(ctx, page_scores=cheap, chunk_scores=cheap), grant)
        kept[(lidx, name)] = (k, pages)
        return pages

    def select_layer(self, plan: list[RequestPlan], routed: list[int], lidx: int, qv, k_buf, v_buf, scale: float):
        """``select`` for the routed requests (``routed``: their batch indices) of one layer, with the K/V of those
        with demoted pages (``gather_kv``, keyed by position in the result). A request whose selection fails is
        failed (``fail_request``) and left out, the others go on. Returns ``(batch indices, pages, staged)``."""
        ok, pages, staged = [], [], {}
        self._layer_buckets = []
        for i in routed:
            p = plan[i]
            req_row = self.req_to_token[p.row]
            try:
                sel, by_leaf, bk = self.select(p, lidx, qv[i], req_row, scale)
                if p.state.demoted:  # some pages left the device: this request's K/V come from gather_kv
                    staged[len(ok)] = self.gather_kv(p, sel, lidx, k_buf, v_buf, req_row)
            except Exception as e:  # one request's failure must not take the batch (or the server) down
                self.fail_request(p, e)
                continue
            ok.append(i)
            pages.append(sel)
            if lidx == 0:
                STATS.last_pages_by_leaf = by_leaf
            self._layer_buckets.append(bk)
        return ok, pages, staged

    def layer_grant(self, p: RequestPlan, lidx: int) -> Grant:
        """The request's grant at one layer (``--mux-layer-budget``, router/layer_budget.py): the step's grant itself
        when uniform; otherwise its ranked shares spread over the layers, computed once per step."""
        if p.layer_factors is not None and not p.grant.exact:  # the router's own spread
            if p._layer_grants is None:
                p._layer_grants = layer_grants(p.grant, p.layer_factors)
            return p._layer_grants[lidx]
        cfg = self.router.effective_config(p.state.options)
        if p.grant.exact or cfg.layer_budget == "uniform":
            return p.grant
        return p.state.layer_grants(p.grant, lambda: self.layer_factors(p, cfg.layer_budget))[lidx]

    def layer_factors(self, p: RequestPlan, policy: str) -> list[float]:
        if policy == "pyramid":
            return pyramid_factors(self.num_layers)
        st, g = p.state, p.grant
        if st.heavy_scores is None:  # nothing measured at prefill: uniform
            return [1.0] * self.num_layers
        n = num_pages_of(p.seq_len, self.page_size)
        ranked = sum(g[s] for s in ranked_shares())
        return adaptive_factors(st.heavy_scores[:, :n], ranked, g["sink"], max(g["recent"], 1))

    def page_scores(self, p: RequestPlan, lidx: int, q_req, req_row, scale: float | None = None) -> torch.Tensor:
        """Retrieval score of every page of one routed request at one layer (``[num_pages]``): the per-head Quest
        bounds combined by ``--mux-retrieval-score`` (``combine_head_bounds``); two-level (groups of
        ``--mux-retrieval-group-pages`` pages first) when that is > 1."""
        STATS.page_scorings += 1
        P = self.page_size
        n = num_pages_of(p.seq_len, P)
        n_full = (p.seq_len - 1) // P  # pages whose summaries are final (not the one holding this step's token)
        layer_id = self.start_layer + lidx
        st = p.state
        grant = self.layer_grant(p, lidx)
        keep = sum(grant[s] for s in query_aware_shares())  # the query-aware leaves' pages: groups worth scoring
        # Drop mode scores every page (memory/cold_policies.py: its dropped pages' summaries are stale).
        cfg = self.router.effective_config(st.options)
        G = 1 if cold_policy_for(cfg, self.tiers).scores_every_page else self.mux_config.retrieval_group_pages
        rule = cfg.retrieval_score
        scale = (q_req.shape[-1] ** -0.5 if scale is None else scale) / cfg.retrieval_temperature
        use_cache = self.uses_summary_cache(p)
        if st.summary_cache is None and (use_cache or G > 1):
            st.summary_cache = RequestSummaryCache(self.num_layers, G)
        cache = st.summary_cache
        if use_cache:
            # Completed pages from the request's contiguous cache; the page holding this step's token (whose
            # summary is folded in after attention) from the store.
            kmin, kmax = cache.full_pages(self.summaries, lidx, layer_id, req_row, n_full)
            if G > 1 and n_full > 0:
                bmin, bmax = cache.page_buffers(lidx)
                gmin, gmax = cache.full_groups(lidx, n_full, lambda lo, hi: (kmin[:, lo:hi], kmax[:, lo:hi]))

                def cached(idx):  # picking from the contiguous buffers, not the sliced view (which copies first)
                    return (kmin, kmax) if idx is None else (bmin.index_select(1, idx), bmax.index_select(1, idx))

                cand, full = grouped_quest_head_bounds(q_req, n_full, gmin, gmax, G, keep, cached, rule, scale)
            else:
                cand, full = None, quest_head_bounds(q_req, kmin, kmax)
            tail_min, tail_max = self.summaries.get(layer_id, req_row[n_full * P : (n - 1) * P + 1 : P])
            tail = quest_head_bounds(q_req, tail_min.transpose(0, 1), tail_max.transpose(0, 1))
            if cand is not None:  # the tail pages are candidates too
                cand = torch.cat([cand, torch.arange(n_full, n, device=cand.device)])
            return scatter_page_scores(n, cand, torch.cat([full, tail], dim=1), rule, scale)

        def gathered(idx):  # from the pool (a page's summary lives at its physical page) and the cold summaries
            idx = torch.arange(n, device=q_req.device) if idx is None else idx
            kmin, kmax = self.summaries.get(layer_id, req_row[idx * P])
            if st.demoted:  # their device pages were reused: their summaries live with the request
                hit = torch.isin(idx, torch.tensor(sorted(st.demoted), dtype=torch.long, device=idx.device))
                if bool(hit.any()):
                    kmin, kmax = kmin.clone(), kmax.clone()
                    kmin[hit], kmax[hit] = st.cold_kmin[lidx, idx[hit]], st.cold_kmax[lidx, idx[hit]]
            return kmin.transpose(0, 1), kmax.transpose(0, 1)

        if G > 1 and n_full > 0:
            gmin, gmax = cache.full_groups(
                lidx, n_full, lambda lo, hi: gathered(torch.arange(lo, hi, device=q_req.device))
            )
            return grouped_quest_page_scores(q_req, n, gmin, gmax, G, keep, gathered, rule, scale)
        return quest_page_scores_head_major(q_req, *gathered(None), rule, scale)

    def uses_summary_cache(self, p: RequestPlan) -> bool:
        """Keep mode only (``ColdPagePolicy.caches_summaries``): there the request's exact KV stays on the device,
        so a copy of its summaries (1/P of its keys) is proportionate; drop and tier modes keep device memory
        bounded and gather instead (tier mode keeps only the group summaries, 1/G of that)."""
        st = p.state
        if st.demoted or st.dropped_pages:
            return False
        return cold_policy_for(self.router.effective_config(st.options), self.tiers).caches_summaries

    def gather_kv(self, p: RequestPlan, pages, lidx: int, k_buf, v_buf, req_row):
        """K, V and positions of the selected pages of a request with demoted pages: device slots for resident
        pages, the staging area for pages that left the device (fetched now in ``wait`` mode; skipped and fetched in the background in ``skip``)."""
        st, P = p.state, self.page_size
        off = torch.tensor([int(x) in st.demoted for x in pages.tolist()], dtype=torch.bool, device=pages.device)
        pos = page_positions(pages[~off], p.seq_len, P)
        slots = req_row[pos].long()
        ks, vs, poss = [k_buf[slots]], [v_buf[slots]], [pos]
        wait = self.mux_config.missing_page == "wait"
        if wait:  # the pages to fetch, in one tier request (whole chunks arrive together)
            self.cold.stage_many(st, pages[off].tolist())
        for page in pages[off].tolist():
            layer_kv = self.cold.quantized_layer(st, page, lidx)  # drop mode: the quantized copy, this layer only
            if layer_kv is not None:
                ks.append(layer_kv[0].to(k_buf.dtype))
                vs.append(layer_kv[1].to(v_buf.dtype))
                poss.append(torch.arange(page * P, page * P + P, device=pages.device))
                continue
            try:
                rec = self.cold.staged_record(st, page, wait)
            except PageIntegrityError as e:
                st.error = f"request {p.rid}: {e}"
                STATS.checksum_failures += 1
                rec = None
            if rec is None:
                continue
            ks.append(rec[lidx, 0].to(k_buf.dtype))
            vs.append(rec[lidx, 1].to(v_buf.dtype))
            poss.append(torch.arange(page * P, page * P + P, device=pages.device))
        return torch.cat(ks), torch.cat(vs), torch.cat(poss)
