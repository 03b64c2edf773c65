"""MuxAttentionBackend: the attention backend ``mux``, wrapping the platform backend.

* Extend/prefill: delegated to the wrapped backend unchanged (exact; ``select()`` and prompt logprobs rely on
  it), except for requests that prefill block-sparsely (``sparse_prefill.extend_with_sparse_prefill``).
  Afterwards the step planner rebuilds the page summaries of the written pages and, for requests long enough to
  be routed later, takes heavy-hitter scores from the observation window.
* Decode: the step planner (``step_planner.py``) says, per request, exact or routed. A batch of exact requests
  is delegated to the wrapped backend (identical results to stock SGLang). Otherwise each routed request attends,
  per layer, to the pages the planner selects (the union of the leaves' pages), chosen at forward time so the
  overlap scheduler never makes the choice stale, all in one masked call (``batched_decode.py``).
Anything else SGLang asks of an attention backend (CUDA-graph state included) is answered by the wrapped backend:
every method of SGLang's ``AttentionBackend`` is overridden explicitly, since ``__getattr__`` only covers names the
base class does not define. Two stay mux's own: no fused KV writer (summaries must see every write) and no
metadata glue graph (the step plan is made on the host).
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_mux.disagg.heavy_scores import register_local_layout
from sglang_mux.attention.batched_decode import DecodeStep, padded_exact_attention, routed_batch_attention
from sglang_mux.attention.routed_decode import num_pages_of
from sglang_mux.attention.sparse_prefill import extend_with_sparse_prefill, sparse_prefill_rows
from sglang_mux.attention.step_planner import RequestPlan, StepPlanner
from sglang_mux.config import MuxConfig
from sglang_mux.metrics import STATS
from sglang_mux.platform import platform_attention_backend

logger = logging.getLogger(__name__)


def _on_planner(name: str) -> property:
    """An attribute the step planner owns, read, set and deleted through the backend."""
    return property(lambda self: getattr(self.planner, name), lambda self, v: setattr(self.planner, name, v),
                    lambda self: delattr(self.planner, name))


class MuxAttentionBackend(AttentionBackend):
    # The planner's objects, as the backend always exposed them (tests swap the registry, tiers or cold mover here).
    router, registry, summaries = _on_planner("router"), _on_planner("registry"), _on_planner("summaries")
    tiers, cold, num_layers = _on_planner("tiers"), _on_planner("cold"), _on_planner("num_layers")

    def __init__(self, model_runner, inner: AttentionBackend, mux_config: MuxConfig):
        super().__init__()
        self.inner = inner
        self.mux_config = mux_config
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_pool = model_runner.token_to_kv_pool
        self.page_size = mux_config.page_size
        self.start_layer = getattr(self.kv_pool, "start_layer", 0) or 0
        self.planner = StepPlanner(mux_config, self.kv_pool, self.req_to_token,
                                   getattr(model_runner, "token_to_kv_pool_allocator", None))
        self._plan: list[RequestPlan] | None = None
        self._step: DecodeStep | None = None
        self._all_exact = True
        STATS.page_size = self.page_size
        STATS.budget_tokens = mux_config.budget
        STATS.summary_bytes = self.summaries.nbytes()
        kb = self.summaries.k_buffers[0]
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

    # ------------------------------------------------------------------ the step planner's plan
    # Page choice (``select``, ``page_scores``, ``layer_grant``) is the planner's: callers ask ``self.planner``.
    def _plan_step(self, fb) -> None:
        step = self.planner.plan_step(fb)
        self._plan = None if step is None else step.requests
        self._all_exact = True if step is None else step.all_exact

    # ------------------------------------------------------------------ extend (exact, or block-sparse)
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        fb = forward_batch
        sparse = sparse_prefill_rows(layer, fb, k, v, save_kv_cache, self.registry, self.mux_config)
        if sparse is None:
            o = self.inner.forward_extend(q, k, v, layer, fb, save_kv_cache=save_kv_cache, **kwargs)
        else:
            self.kv_pool.set_kv_buffer(layer, KVWriteLoc(fb.out_cache_loc, None), k, v)
            # Key blocks computed vs a dense prefill's (first layer, all KV heads), summed over sparse prefills.
            blocks = self.__dict__.setdefault("sparse_prefill_blocks", [0, 0])
            o = extend_with_sparse_prefill(
                q, layer, fb, sparse, self.kv_pool.get_key_buffer(layer.layer_id),
                self.kv_pool.get_value_buffer(layer.layer_id), self.req_to_token,
                lambda rid: self.router.effective_config(self.registry.get(rid).options),
                blocks if layer.layer_id == self.start_layer else None,
            )
        if save_kv_cache and not layer.is_cross_attention:
            self.planner.observe_extend(layer, fb, q)
        return o

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

    def _routed_decode(self, q, layer, plan: list[RequestPlan]) -> torch.Tensor:
        """One layer of a batch holding routed requests: each routed request's pages are chosen by the planner's
        leaves, then all of them attend in one masked call (``batched_decode``); exact ones in one padded SDPA."""
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
        ok, pages, staged = self.planner.select_layer(plan, step.routed, lidx, qv, k_buf, v_buf, layer.scaling)
        max_pages = max([max_pages, *(sel.numel() for sel in pages)])
        if ok:
            heavy = [None if plan[i].state.heavy_scores is None else plan[i].state.heavy_scores[lidx] for i in ok]
            rows, lens, qs = step.select(ok, qv)
            mass = [] if self.planner.measuring else None  # the router's signals
            out = routed_batch_attention(qs, k_buf, v_buf, self.req_to_token, rows, lens, pages, layer.scaling,
                                         self.page_size, heavy, staged, mass)
            if mass:
                self.planner.observe_attention(lidx, ok, plan, mass[0])
            o[ok] = out.flatten(1).to(o.dtype)
        if lidx == 0:
            STATS.last_max_pages_read = max_pages
        STATS.max_pages_read = max(STATS.max_pages_read, max_pages)
        return o


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
