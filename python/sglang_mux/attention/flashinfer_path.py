"""The GPU path of the routed decode: FlashInfer's paged decode over a reduced page table.

Importable anywhere; constructed only where CUDA and flashinfer are present (the constructor says which is
missing). One instance serves one attention backend:

    per step  (host ints, once):  plan_step(seq_lens_cpu, page_counts)   -> indptr / last_page_len, wrapper.plan
    per layer (device, no sync):  route_layer(q, kmin, kmax, ...)          -> page_list   (Triton scoring + top-k)
                                  run_layer(q, k_buffer, v_buffer, page_list, ...) -> write kv_indices, wrapper.run

The per-request page count of a step is the same in every layer (`plan_routed_counts`), so one plan serves
all layers and only `kv_indices` (fixed-capacity storage, see `TableBuffers`) changes between layers; the
per-layer work is tensor ops and kernels that a CUDA graph can capture. That needs `use_cuda_graph=True` (the
default): only then does the wrapper read the indices from our storage at run time; without it each layer
re-plans. A selection built on the host (the
same for all layers) goes through `plan_selections` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sglang_mux.attention.flashinfer_tables import (
    DecodeTable,
    TableBuffers,
    build_page_table,
    build_token_table,
    plan_step_table,
    write_page_ids_on_device,
    write_token_slots_on_device,
)

DEFAULT_WORKSPACE_BYTES = 128 * 1024 * 1024


class FlashInferUnavailable(RuntimeError):
    """The FlashInfer routed path cannot be built on this machine."""


def _import_flashinfer():
    if not torch.cuda.is_available():
        raise FlashInferUnavailable("the FlashInfer routed decode needs a CUDA device; none is available")
    try:
        import flashinfer
    except Exception as exc:  # noqa: BLE001 - report any import failure the same way
        raise FlashInferUnavailable(f"flashinfer is not importable: {exc}") from exc
    return flashinfer


class FlashInferRoutedDecode:
    """Routed paged decode through `BatchDecodeWithPagedKVCacheWrapper` with fixed-capacity tables.

    form "page": FlashInfer page size = mux page size P (the KV pool must be page-aligned; the layer buffer is
    viewed as [-1, P, H_kv, D]). form "token": FlashInfer page size 1, any slot layout (as SGLang's own
    flashinfer backend).
    """

    def __init__(
        self,
        *,
        max_batch: int,
        budget_pages: int,
        page_size: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        kv_dtype: torch.dtype,
        q_dtype: torch.dtype | None = None,
        form: str = "page",
        use_cuda_graph: bool = True,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        device: str | torch.device = "cuda",
    ):
        self._flashinfer = _import_flashinfer()
        self.buffers = TableBuffers(max_batch, budget_pages, page_size, form, device=device)
        self.page_size = page_size
        self.form = form
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_dtype = kv_dtype
        self.q_dtype = q_dtype or kv_dtype
        self.use_cuda_graph = use_cuda_graph
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self._wrappers: dict[int, object] = {}
        self._batch = 0
        self._table: DecodeTable | None = None

    # ---- wrappers: one per batch size in CUDA-graph mode (FlashInfer fixes the batch size there) ----
    def _wrapper(self, batch: int):
        key = batch if self.use_cuda_graph else 0
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            cls = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper
            if self.use_cuda_graph:
                wrapper = cls(
                    self.workspace,
                    "NHD",
                    use_cuda_graph=True,
                    paged_kv_indptr_buffer=self.buffers.kv_indptr[: batch + 1],
                    paged_kv_indices_buffer=self.buffers.kv_indices[: self.buffers.capacity],
                    paged_kv_last_page_len_buffer=self.buffers.kv_last_page_len[:batch],
                )
            else:
                wrapper = cls(self.workspace, "NHD")
            self._wrappers[key] = wrapper
        return wrapper

    def _plan(self, table: DecodeTable, sm_scale: float) -> None:
        batch = table.kv_indptr.numel() - 1
        self._wrapper(batch).plan(
            table.kv_indptr,
            table.kv_indices,
            table.kv_last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            table.page_size,
            sm_scale=sm_scale,
            q_data_type=self.q_dtype,
            kv_data_type=self.kv_dtype,
        )
        self._batch = batch
        self._table = table
        self._sm_scale = sm_scale

    # ---- per step ----
    def plan_step(self, seq_lens_cpu: Sequence[int], page_counts: Sequence[int], sm_scale: float) -> DecodeTable:
        """Plan a step whose page lists are chosen per layer on the device (`run_layer(page_list=...)`)."""
        table = plan_step_table(seq_lens_cpu, page_counts, self.page_size, self.buffers)
        self._plan(table, sm_scale)
        return table

    def plan_selections(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: Sequence[int] | torch.Tensor,
        seq_lens_cpu: Sequence[int],
        selections: Sequence[torch.Tensor],
        sm_scale: float,
    ) -> DecodeTable:
        """Plan a step from host-side selections (sorted page ids with the tail), the same for all layers."""
        build = build_page_table if self.form == "page" else build_token_table
        table = build(req_to_token, req_pool_indices, seq_lens_cpu, selections, self.page_size, self.buffers)
        self._plan(table, sm_scale)
        return table

    # ---- per layer ----
    def run_layer(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        *,
        page_list: torch.Tensor | None = None,
        req_to_token: torch.Tensor | None = None,
        req_pool_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode attention of q [B, Hq, D] for one layer; with `page_list` [B, K] (sorted logical ids, tail
        last, counts as planned) the layer's indices are written first, on the device."""
        if self._table is None:
            raise RuntimeError("run_layer before plan_step/plan_selections")
        if page_list is not None:
            if req_to_token is None or req_pool_indices is None:
                raise ValueError("page_list needs req_to_token and req_pool_indices")
            write = write_page_ids_on_device if self.form == "page" else write_token_slots_on_device
            write(page_list, req_to_token, req_pool_indices, self.page_size, self.buffers, self._batch)
            if not self.use_cuda_graph:
                # Only in CUDA-graph mode does the wrapper read indices from our storage at run time; otherwise
                # it keeps what it was given at plan time, so plan again (a host sync per layer).
                self._plan(self._table, self._sm_scale)
        p = self._table.page_size
        k_cache = k_buffer.view(-1, p, self.num_kv_heads, self.head_dim)
        v_cache = v_buffer.view(-1, p, self.num_kv_heads, self.head_dim)
        return self._wrapper(self._batch).run(q.contiguous(), (k_cache, v_cache))

    @staticmethod
    def route_layer(
        q: torch.Tensor,
        kmin: torch.Tensor,
        kmax: torch.Tensor,
        summary_table: torch.Tensor,
        num_pages: torch.Tensor,
        budget_pages: int,
        sink_pages: int = 0,
        recent_pages: int = 1,
        forced: torch.Tensor | None = None,
        blocked: torch.Tensor | None = None,
        rule: str = "mass",
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query-aware page choice for one layer on the GPU (`mux_kernels.select_pages_on_device`): top-k by
        page score plus sinks, recent window, tail and the `forced` mask (pages other leaves chose), never a
        `blocked` page. `rule` / `scale`: `--mux-retrieval-score` and the layer's scale divided by
        `--mux-retrieval-temperature`, as on the CPU path. Plan the step with
        `plan_routed_counts(..., blocked_pages=...)` for the same counts."""
        import mux_kernels

        return mux_kernels.select_pages_on_device(
            q, kmin, kmax, summary_table, num_pages, budget_pages, sink_pages, recent_pages,
            forced=forced, blocked=blocked, rule=rule, scale=scale,
        )
