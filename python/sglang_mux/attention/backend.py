"""MuxAttentionBackend: the attention backend ``mux``, wrapping the platform backend.

* Extend/prefill: delegated to the wrapped backend unchanged (exact; ``select()`` and prompt logprobs rely on
  it). Afterwards, the page summaries of the written pages are rebuilt and, for requests long enough to be
  routed later, heavy-hitter scores are taken from the observation window.
* Decode: per request, the spine router's grant says exact or routed. A batch of exact requests is delegated
  to the wrapped backend (identical results to stock SGLang). Otherwise each routed request attends, per layer,
  to the union of the leaves' pages (recent window, sinks + heavy hitters, query-aware retrieval, always the
  tail page), chosen here at forward time so the overlap scheduler never makes the choice stale.
Anything else SGLang asks of an attention backend (CUDA-graph state included) is answered by the wrapped backend:
every method of SGLang's ``AttentionBackend`` is overridden explicitly, since ``__getattr__`` only covers names the
base class does not define. Two stay mux's own: no fused KV writer (summaries must see every write) and no
metadata glue graph (the step plan is made on the host).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_mux.disagg.heavy_scores import register_local_layout
from sglang_mux.attention.batched_decode import DecodeStep, padded_exact_attention, routed_batch_attention
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
from sglang_mux.leaves import LEAVES, LeafContext
from sglang_mux.memory.page_summaries import PageSummaryStore, RequestSummaryCache
from sglang_mux.memory.cold_pages import ColdPageMover
from sglang_mux.memory.tiers import PageIntegrityError, shared_tier_manager
from sglang_mux.metrics import STATS
from sglang_mux.platform import platform_attention_backend
from sglang_mux.router.grant import Grant
from sglang_mux.router.layer_budget import RANKED_SHARES, adaptive_factors, pyramid_factors
from sglang_mux.router.requests import REGISTRY, RequestState
from sglang_mux.router.route_rule import heavy_ranked_tokens, scores_heavy_hitters
from sglang_mux.router.spine import StaticSpineRouter

logger = logging.getLogger(__name__)


@dataclass
class _ReqPlan:
    rid: str
    row: int
    seq_len: int
    grant: Grant
    state: RequestState


class MuxAttentionBackend(AttentionBackend):
    def __init__(self, model_runner, inner: AttentionBackend, mux_config: MuxConfig):
        super().__init__()
        self.inner = inner
        self.mux_config = mux_config
        self.router = StaticSpineRouter(mux_config)
        self.registry = REGISTRY
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_pool = model_runner.token_to_kv_pool
        self.page_size = mux_config.page_size
        start = getattr(self.kv_pool, "start_layer", 0) or 0
        self.num_layers = self.kv_pool.layer_num
        self.summaries = PageSummaryStore.for_pool(self.kv_pool, self.page_size)
        k_buffers = self.summaries.k_buffers
        self.start_layer = start
        self.tiers = shared_tier_manager(mux_config)
        self.cold = ColdPageMover(
            kv_pool=self.kv_pool, allocator=getattr(model_runner, "token_to_kv_pool_allocator", None), req_to_token=self.req_to_token, summaries=self.summaries,
            tiers=self.tiers, page_size=self.page_size, num_layers=self.num_layers, start_layer=start,
        )
        self._plan: list[_ReqPlan] | None = None
        self._step: DecodeStep | None = None
        self._all_exact = True
        STATS.page_size = self.page_size
        STATS.budget_tokens = mux_config.budget
        STATS.summary_bytes = self.summaries.nbytes()
        kb = k_buffers[0]
        register_local_layout(self.num_layers, kb.device)  # PD: heavy scores cross with SGLang's metadata
        STATS.kv_bytes_per_token = 2 * self.num_layers * kb.shape[1] * kb.shape[2] * kb.element_size()

    def __getattr__(self, name):
        # Only reached for attributes not found on self: delegate to the wrapped backend.
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # ------------------------------------------------------------------ metadata
    def init_forward_metadata(self, forward_batch):
        self.inner.init_forward_metadata(forward_batch)
        self._plan_step(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        self.inner.init_forward_metadata_out_graph(forward_batch, in_capture)
        self._plan_step(forward_batch)

    def init_forward_metadata_in_graph(self, forward_batch):
        return self.inner.init_forward_metadata_in_graph(forward_batch)

    # ------------------------------------------------------------------ forwarded to the wrapped backend
    # Every method SGLang's AttentionBackend defines must be overridden here: ``__getattr__`` is never reached
    # for a name the base class has, so an inherited default (often ``raise NotImplementedError``) would answer
    # instead of the wrapped backend. test/test_backend_forwarding.py checks this list against the base class.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        return self.inner.init_cuda_graph_state(max_bs, max_num_tokens)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    def validate_elastic_cuda_graph_recapture(self):
        return self.inner.validate_elastic_cuda_graph_recapture()

    def on_after_cuda_graph_warmup(self):
        return self.inner.on_after_cuda_graph_warmup()

    def init_forward_metadata_for_breakable_cuda_graph_capture(self, forward_batch):
        return self.inner.init_forward_metadata_for_breakable_cuda_graph_capture(forward_batch)

    def prepare_forward_metadata_for_breakable_cuda_graph_replay(self, capture_metadata, forward_batch, **kwargs):
        return self.inner.prepare_forward_metadata_for_breakable_cuda_graph_replay(
            capture_metadata, forward_batch, **kwargs
        )

    def prepare_full_cuda_graph_chunked_prefix(self, forward_batch, **kwargs):
        return self.inner.prepare_full_cuda_graph_chunked_prefix(forward_batch, **kwargs)

    def draft_extend_metadata_captured_in_graph(self):
        return self.inner.draft_extend_metadata_captured_in_graph()

    def shared_read_ends(self, fm):
        return self.inner.shared_read_ends(fm)

    def resolve_prefill_shared_read_ends(self, forward_batch, **kwargs):
        return self.inner.resolve_prefill_shared_read_ends(forward_batch, **kwargs)

    def _snapshot_prefill_shared_reads(self, forward_batch, **kwargs):
        return self.inner._snapshot_prefill_shared_reads(forward_batch, **kwargs)

    def late_layer_num_tokens(self, forward_batch):
        return self.inner.late_layer_num_tokens(forward_batch)

    @property
    def verify_mask(self):
        return self.inner.verify_mask

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        return self.inner.update_verify_buffers_to_fill_after_draft(spec_info, cuda_graph_bs)

    def forward_mixed(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self.inner.forward_mixed(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)

    def get_indexer_metadata(self, layer_id: int, forward_batch):
        return self.inner.get_indexer_metadata(layer_id, forward_batch)

    def support_triton(self):
        return self.inner.support_triton()

    # Kept as SGLang's defaults on purpose (not forwarded): mux must see every KV write and plans on the host.
    def get_fused_kv_write_buffers(self, layer, forward_batch):
        """None: the model must hand K/V to ``forward_*`` (``save_kv_cache=True``), so the page summaries follow
        every write; a fused writer in the wrapped backend would bypass them."""
        return None

    def glue_target_verify_metadata(self) -> str:
        return "mux plans each step on the host (the request's grant and pages), which a graph cannot replay"

    def glue_draft_metadata(self) -> str:
        return "mux plans each step on the host (the request's grant and pages), which a graph cannot replay"

    def _plan_step(self, fb) -> None:
        self._plan = None
        if fb.rids is None:
            return
        if fb.forward_mode.is_extend() and fb.extend_prefix_lens_cpu is not None:
            # A request's first extend starts after its matched prefix, which the radix tree owns.
            for rid, prefix in zip(fb.rids, fb.extend_prefix_lens_cpu):
                st = self.registry.get(rid)
                st.summarized = True  # forward_extend rebuilds the summaries of what it writes
                st.summary_cache = None  # (re)prefilled: its pages may have moved
                if st.protected_len is None:
                    st.protected_len = int(prefix)
            return
        if not fb.forward_mode.is_decode():
            return
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        rows = fb.req_pool_indices.tolist()
        plan = []
        for rid, row, L in zip(fb.rids, rows, seq_lens):
            st = self.registry.get(rid)
            st.row = row
            if not st.summarized:
                self._summarize_received_kv(row, L - 1)
                st.summarized = True
            p = _ReqPlan(rid, row, L, self.router.grant(L, st.options), st)
            plan.append(p)
            if not p.grant.exact:
                cfg = self.router.effective_config(st.options)
                try:
                    if cfg.drop_cold:
                        self.cold.drop(p)
                    elif self.tiers is not None and self.tiers.takes_running_pages:
                        self.cold.demote(p, cfg)
                except Exception as e:
                    self._fail_request(p, e)
            held = L - len(st.off_device_pages()) * self.page_size
            STATS.device_kv_tokens_held[rid] = held
            if st.demoted:
                STATS.last_tiered_request = self.cold.accounting(st, L, held)
            if not p.grant.exact:
                STATS.max_routed_kv_tokens_held = max(STATS.max_routed_kv_tokens_held, held)
        self._plan = plan
        self._all_exact = all(p.grant.exact for p in plan)
        routed = sum(not p.grant.exact for p in plan)
        STATS.decode_steps += 1
        STATS.routed_request_steps += routed
        STATS.exact_request_steps += len(plan) - routed
        STATS.last_routed_requests = routed
        STATS.last_exact_requests = len(plan) - routed
        STATS.last_max_context_tokens = max(seq_lens) if seq_lens else 0
        if routed == 0:
            STATS.last_max_pages_read = max((num_pages_of(L, self.page_size) for L in seq_lens), default=0)

    def _summarize_received_kv(self, row: int, n_tokens: int) -> None:
        """Summaries for KV that was written elsewhere (PD transfer): rebuilt from the keys, every layer.

        Rebuilding costs one read of the request's keys, once; shipping summaries would cost 2/P of the KV
        bytes on the wire for every request, so the decode side rebuilds (docs/memory.md).
        """
        req_row = self.req_to_token[row]
        for i in range(self.num_layers):
            self.summaries.rebuild_from_keys(self.start_layer + i, req_row, 0, n_tokens)

    # ------------------------------------------------------------------ drop mode
    # ------------------------------------------------------------------ extend (exact)
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        sparse = self._sparse_prefill_rows(layer, forward_batch, k, v, save_kv_cache)
        if sparse is None:
            o = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        else:
            o = self._extend_with_sparse_prefill(q, k, v, layer, forward_batch, sparse)
        if layer.is_cross_attention or not save_kv_cache:
            return o
        fb = forward_batch
        prefix = fb.extend_prefix_lens_cpu
        ext = fb.extend_seq_lens_cpu
        rows = fb.req_pool_indices.tolist()
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        qv = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        start_q = 0
        for i, (row, L) in enumerate(zip(rows, seq_lens)):
            n_ext = int(ext[i])
            req_row = self.req_to_token[row]
            self.summaries.rebuild_from_keys(layer.layer_id, req_row, int(prefix[i]), L)
            rid = fb.rids[i] if fb.rids is not None else None
            if rid is not None and n_ext > 0 and self._wants_heavy_scores(rid, L):
                self._score_observation_window(layer, qv[start_q : start_q + n_ext], req_row, L, rid)
            start_q += n_ext
        return o

    def _sparse_prefill_rows(self, layer, fb, k, v, save_kv_cache: bool) -> list[bool] | None:
        """Per request of this extend batch, whether its attention is block-sparse (the sparse_prefill leaf);
        ``None`` when none is (the whole batch is then delegated unchanged). The rule is
        ``MuxRequestOptions.prefills_sparsely`` on the tokens prefilled so far (matched prefix + this chunk):
        with chunked prefill, the chunks of a prompt before it reaches the threshold are exact. Decoder
        self-attention without a sliding window only."""
        if (
            fb.rids is None or not save_kv_cache or k is None or v is None or layer.is_cross_attention
            or getattr(layer, "sliding_window_size", -1) not in (None, -1)
            or getattr(getattr(layer, "attn_type", None), "name", "DECODER") != "DECODER"
        ):
            return None
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        rows = [
            self.registry.get(rid).options.prefills_sparsely(self.mux_config, int(L))
            for rid, L in zip(fb.rids, seq_lens)
        ]
        return rows if any(rows) else None

    def _extend_with_sparse_prefill(self, q, k, v, layer, fb, sparse: list[bool]) -> torch.Tensor:
        """The extend attention of a batch holding at least one sparse-prefill request, computed here: the new KV
        is written to the pool (as the wrapped backend would), then each request attends over its prefix + chunk
        read from the pool through ``req_to_token``: block-sparse (``sparse_prefill``) or, for the others, exact
        causal attention."""
        from sglang_mux.attention.sparse_prefill import SparsePrefillParams, dense_block_count, sparse_prefill_attention

        self.kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, None), k, v)
        # Key blocks computed vs a dense prefill's (first layer, all KV heads), summed over sparse prefills.
        blocks = self.__dict__.setdefault("sparse_prefill_blocks", [0, 0])
        hq, hk, d, dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
        qv = q.view(-1, hq, d)
        o = q.new_empty((qv.shape[0], hq * dv))
        k_buf = self.kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.kv_pool.get_value_buffer(layer.layer_id)
        seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        rows = fb.req_pool_indices.tolist()
        start = 0
        for i, (row, L) in enumerate(zip(rows, seq_lens)):
            n, L = int(fb.extend_seq_lens_cpu[i]), int(L)
            prefix = L - n
            if n == 0:
                continue
            slots = self.req_to_token[row, :L].long()
            keys, values = k_buf[slots].to(qv.dtype), v_buf[slots].to(qv.dtype)
            q_req = qv[start : start + n]
            if sparse[i]:
                cfg = self.router.effective_config(self.registry.get(fb.rids[i]).options)
                params = SparsePrefillParams.from_config(cfg)
                out, _, computed = sparse_prefill_attention(q_req, keys, values, prefix, layer.scaling, params)
                if layer.layer_id == self.start_layer:
                    blocks[0] += computed
                    blocks[1] += dense_block_count(prefix, n, params.block, hk)
            else:  # exact; an explicit [n, L] mask only when a prefix offsets the queries
                causal = None
                if prefix:
                    causal = torch.arange(L, device=q.device).view(1, -1) <= torch.arange(prefix, L, device=q.device).view(-1, 1)
                out = scaled_dot_product_attention(
                    q_req.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                    values.transpose(0, 1).unsqueeze(0), attn_mask=causal, is_causal=causal is None,
                    scale=layer.scaling, enable_gqa=hq != hk,
                )[0].transpose(0, 1)
            o[start : start + n] = out.reshape(n, hq * dv).to(o.dtype)
            start += n
        return o

    def _wants_heavy_scores(self, rid: str, seq_len: int) -> bool:
        st = self.registry.get(rid)
        cfg = self.router.effective_config(st.options)
        return scores_heavy_hitters(seq_len, cfg.budget, heavy_ranked_tokens(cfg), st.options.exact)

    def _score_observation_window(self, layer, q_ext, req_row, L: int, rid: str) -> None:
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

    # ------------------------------------------------------------------ decode (routed)
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        fb = forward_batch
        plan = self._plan
        if plan is None or layer.is_cross_attention:
            return self.inner.forward_decode(q, k, v, layer, fb, save_kv_cache=save_kv_cache, **kwargs)
        if self._all_exact:
            o = self.inner.forward_decode(q, k, v, layer, fb, save_kv_cache=save_kv_cache, **kwargs)
        else:
            if save_kv_cache and k is not None and v is not None:
                self.kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, None), k, v)
            o = self._routed_decode(q, layer, plan)
        if save_kv_cache and k is not None:
            self._step = step = DecodeStep.of(self._step, plan, fb.out_cache_loc.device)
            self.summaries.update_decode(
                layer.layer_id, fb.out_cache_loc, step.positions, k.view(-1, layer.tp_k_head_num, layer.qk_head_dim)
            )
        return o

    def _routed_decode(self, q, layer, plan: list[_ReqPlan]) -> torch.Tensor:
        """One layer of a batch holding routed requests: each routed request's pages are chosen by the leaves,
        then all of them attend in one masked call (``batched_decode``); exact ones in one padded SDPA."""
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        qv = q.reshape(-1, hq, d)
        o = q.new_zeros((qv.shape[0], hq * dv))
        k_buf = self.kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.kv_pool.get_value_buffer(layer.layer_id)
        lidx = layer.layer_id - self.start_layer
        self._step = step = DecodeStep.of(self._step, plan, qv.device)
        max_pages = max((num_pages_of(plan[i].seq_len, self.page_size) for i in step.exact), default=0)
        if step.exact:
            idx, slots, valid = step.exact_slots(self.req_to_token)
            o[idx] = padded_exact_attention(qv[idx], k_buf, v_buf, slots, valid, layer.scaling).flatten(1).to(o.dtype)
        ok, pages, staged = [], [], {}
        for i in step.routed:
            p = plan[i]
            req_row = self.req_to_token[p.row]
            try:
                sel, by_leaf = self.select_pages(qv[i], lidx, req_row, p, layer.scaling)
                if p.state.demoted:  # some pages left the device: this request's K/V come from _gather_kv
                    staged[len(ok)] = self._gather_kv(p, sel, lidx, k_buf, v_buf, req_row)
            except Exception as e:  # one request's failure must not take the batch (or the server) down
                self._fail_request(p, e)
                continue
            ok.append(i)
            pages.append(sel)
            max_pages = max(max_pages, sel.numel())
            if lidx == 0:
                STATS.last_pages_by_leaf = by_leaf
        if ok:
            heavy = [None if plan[i].state.heavy_scores is None else plan[i].state.heavy_scores[lidx] for i in ok]
            rows, lens, qs = step.select(ok, qv)
            out = routed_batch_attention(qs, k_buf, v_buf, self.req_to_token, rows, lens, pages, layer.scaling,
                                         self.page_size, heavy, staged)
            o[ok] = out.flatten(1).to(o.dtype)
        if lidx == 0:
            STATS.last_max_pages_read = max_pages
        STATS.max_pages_read = max(STATS.max_pages_read, max_pages)
        return o

    def _gather_kv(self, p: _ReqPlan, pages, lidx: int, k_buf, v_buf, req_row):
        """K, V and positions of the selected pages of a request with demoted pages: device slots for resident
        pages, the staging area for pages that left the device (fetched now in ``wait`` mode; skipped and fetched in the background in ``skip``)."""
        st, P = p.state, self.page_size
        off = torch.tensor([int(x) in st.demoted for x in pages.tolist()], dtype=torch.bool, device=pages.device)
        pos = page_positions(pages[~off], p.seq_len, P)
        slots = req_row[pos].long()
        ks, vs, poss = [k_buf[slots]], [v_buf[slots]], [pos]
        wait = self.mux_config.missing_page == "wait"
        for page in pages[off].tolist():
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

    def _fail_request(self, p: _ReqPlan, err: Exception) -> None:
        """Second line of defence: the request is finished with an error by the scheduler hook
        (``router/hooks.py::abort_failed_requests``); the rest of the batch goes on. Logged once per request."""
        if p.state.error is None:
            logger.exception("mux: routed decode failed for request %s; aborting it", p.rid, exc_info=err)
            p.state.error = f"mux routed decode failed for this request: {type(err).__name__}: {err}"
        STATS.failed_requests += 1

    def select_pages(self, q_req, lidx: int, req_row, p: _ReqPlan, scale: float | None = None) -> tuple[torch.Tensor, dict]:
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
                memo.append(self.page_scores(q_req, lidx, req_row, p, scale))
            return memo[0]

        cfg = self.router.effective_config(p.state.options)

        def chunk_spans() -> tuple[torch.Tensor, torch.Tensor]:
            return p.state.chunk_spans(p.seq_len, P, cfg.chunk_tokens)

        scores = p.state.heavy_scores[lidx] if p.state.heavy_scores is not None else None
        if scores is not None and scores.numel() < n:
            scores = p.state.scores(self.num_layers, n, dev)[lidx]
        heavy_rank = cfg.chunk_score == "heavy" and scores is not None
        ctx = LeafContext(num_pages=n, taken=taken, heavy_scores=scores, page_scores=page_scores, chunk_spans=chunk_spans,
                          chunk_scores=(lambda: scores) if heavy_rank else page_scores)
        grant = self.layer_grant(p, lidx)
        chosen, by_leaf = [], {}
        for name, leaf in LEAVES.items():
            pages = leaf.select(ctx, grant)
            by_leaf[name] = int(pages.numel())
            ctx.taken[pages] = True
            chosen.append(pages)
        return torch.sort(torch.cat(chosen)).values, by_leaf

    def layer_grant(self, p: _ReqPlan, lidx: int) -> Grant:
        """The request's grant at one layer (``--mux-layer-budget``, router/layer_budget.py): the step's grant itself
        when uniform; otherwise its ranked shares spread over the layers, computed once per step."""
        cfg = self.router.effective_config(p.state.options)
        if p.grant.exact or cfg.layer_budget == "uniform":
            return p.grant
        return p.state.layer_grants(p.grant, lambda: self._layer_factors(p, cfg.layer_budget))[lidx]

    def _layer_factors(self, p: _ReqPlan, policy: str) -> list[float]:
        if policy == "pyramid":
            return pyramid_factors(self.num_layers)
        st, g = p.state, p.grant
        if st.heavy_scores is None:  # nothing measured at prefill: uniform
            return [1.0] * self.num_layers
        n = num_pages_of(p.seq_len, self.page_size)
        ranked = sum(g[s] for s in RANKED_SHARES)
        return adaptive_factors(st.heavy_scores[:, :n], ranked, g["sink"], max(g["recent"], 1))

    def page_scores(self, q_req, lidx: int, req_row, p: _ReqPlan, scale: float | None = None) -> torch.Tensor:
        """Retrieval score of every page of one routed request at one layer (``[num_pages]``): the per-head Quest
        bounds combined by ``--mux-retrieval-score`` (``combine_head_bounds``); two-level (groups of
        ``--mux-retrieval-group-pages`` pages first) when that is > 1."""
        P = self.page_size
        n = num_pages_of(p.seq_len, P)
        n_full = (p.seq_len - 1) // P  # pages whose summaries are final (not the one holding this step's token)
        layer_id = self.start_layer + lidx
        st = p.state
        grant = self.layer_grant(p, lidx)
        keep = grant["retrieval"] + grant["chunk"]  # the query-aware leaves' pages: groups worth scoring
        # Drop mode scores every page: its dropped pages' summaries are stale (their slots are reused), and a
        # group bound over them would pick groups with nothing left to read; what it may pick is bounded anyway.
        cfg = self.router.effective_config(st.options)
        G = 1 if cfg.drop_cold else self.mux_config.retrieval_group_pages
        rule = cfg.retrieval_score
        scale = (q_req.shape[-1] ** -0.5 if scale is None else scale) / cfg.retrieval_temperature
        use_cache = self._uses_summary_cache(p)
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

    def _uses_summary_cache(self, p: _ReqPlan) -> bool:
        """Keep mode only: there the request's exact KV stays on the device, so a copy of its summaries (1/P of
        its keys) is proportionate; drop and tier modes keep device memory bounded and gather instead (tier mode
        keeps only the group summaries, 1/G of that)."""
        st = p.state
        if st.demoted or st.dropped_pages or (self.tiers is not None and self.tiers.takes_running_pages):
            return False
        return not self.router.effective_config(st.options).drop_cold


def build_mux_attention_backend(model_runner) -> MuxAttentionBackend:
    """Factory for SGLang's attention registry: wrap the platform backend."""
    cfg = MuxConfig.effective_for_server(model_runner.page_size)
    inner_name = platform_attention_backend() if cfg.inner_backend == "auto" else cfg.inner_backend
    if inner_name == "mux" or inner_name not in ATTENTION_BACKENDS:
        allowed = sorted(n for n in ATTENTION_BACKENDS if n != "mux")
        raise ValueError(f"--mux-inner-backend: unknown backend {inner_name!r}; allowed: auto, {', '.join(allowed)}")
    inner = ATTENTION_BACKENDS[inner_name](model_runner)
    logger.info("sglang-mux: attention backend 'mux' wrapping %s (page size %d)", inner_name, cfg.page_size)
    return MuxAttentionBackend(model_runner, inner, cfg)
