"""FlashInfer inputs of the routed decode reproduce the routed torch path (float64), on CPU.

Oracle chain: tables -> `flashinfer_semantics` (what FlashInfer computes, float64 torch) ==
`mux_kernels.reference.routed_decode` (float64 attention over exactly the selected positions), and, for a
selection of every page, == dense float64 attention over the whole request.
"""

from __future__ import annotations

import math

import flashinfer_semantics as fi
import pytest
import torch
from kv_pool import D, HKV, HQ, SCALE, as_page_list, make_pool, random_selection
from mux_kernels import reference as ref

from sglang_mux.attention.flashinfer_tables import (
    TableBuffers,
    build_bsr_layout,
    build_page_table,
    build_token_table,
    bsr_block_cols,
    plan_routed_counts,
    plan_step_table,
    write_page_ids_on_device,
    write_token_slots_on_device,
)

ATOL = 1e-10


def _routed(pool, q, selections):
    page_list, counts = as_page_list(selections, max(s.numel() for s in selections))
    return pool.reference(q, page_list, counts, SCALE)


def _selections(seq_lens, page_size, max_pages, seed=0):
    return [random_selection(n, page_size, max_pages, seed + i) for i, n in enumerate(seq_lens)]


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_token_table_reproduces_routed_decode(aligned, page_size):
    seq_lens = [37, 5 * page_size, 3]
    pool = make_pool(seq_lens, page_size, HKV, D, aligned=aligned, seed=page_size)
    sel = _selections(seq_lens, page_size, max_pages=4)
    q = torch.randn(len(seq_lens), HQ, D, generator=torch.Generator().manual_seed(1))
    t = build_token_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size)
    assert t.page_size == 1 and t.kv_indices.dtype == torch.int32
    assert torch.equal(t.kv_last_page_len, torch.ones(3, dtype=torch.int32))
    out = fi.paged_decode(q, pool.k_buffer[:, None], pool.v_buffer[:, None], t.kv_indptr, t.kv_indices,
                          t.kv_last_page_len, SCALE)
    torch.testing.assert_close(out, _routed(pool, q, sel), atol=ATOL, rtol=0)


@pytest.mark.parametrize("page_size", [4, 16])
def test_page_table_reproduces_routed_decode(page_size):
    seq_lens = [9 * page_size + 3, 4 * page_size, 1, 2 * page_size + 1]
    pool = make_pool(seq_lens, page_size, HKV, D, aligned=True, seed=7)
    sel = _selections(seq_lens, page_size, max_pages=5, seed=3)
    q = torch.randn(len(seq_lens), HQ, D, generator=torch.Generator().manual_seed(2))
    t = build_page_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size)
    assert t.page_size == page_size
    assert t.kv_last_page_len.tolist() == [3, page_size, 1, 1]
    k_cache = pool.k_buffer.view(-1, page_size, HKV, D)
    v_cache = pool.v_buffer.view(-1, page_size, HKV, D)
    out = fi.paged_decode(q, k_cache, v_cache, t.kv_indptr, t.kv_indices, t.kv_last_page_len, SCALE)
    torch.testing.assert_close(out, _routed(pool, q, sel), atol=ATOL, rtol=0)


def test_all_pages_equals_dense_attention():
    page_size, seq_lens = 4, [22, 8]
    pool = make_pool(seq_lens, page_size, HKV, D, aligned=True, seed=5)
    sel = [torch.arange((n + page_size - 1) // page_size) for n in seq_lens]
    q = torch.randn(2, HQ, D, generator=torch.Generator().manual_seed(3))
    t = build_page_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size)
    out = fi.paged_decode(q, pool.k_buffer.view(-1, page_size, HKV, D), pool.v_buffer.view(-1, page_size, HKV, D),
                          t.kv_indptr, t.kv_indices, t.kv_last_page_len, SCALE)
    for b, n in enumerate(seq_lens):
        slots = pool.req_to_token[b + 1, :n].long()
        dense = torch.nn.functional.scaled_dot_product_attention(
            q[b].double()[:, None], pool.k_buffer[slots].double().repeat_interleave(HQ // HKV, 1).transpose(0, 1),
            pool.v_buffer[slots].double().repeat_interleave(HQ // HKV, 1).transpose(0, 1), scale=SCALE,
        )[:, 0]
        torch.testing.assert_close(out[b], dense, atol=ATOL, rtol=0)


def test_worked_example_from_module_doc():
    # P=4, L=10, pages [0, 2]; page 0 at slots 8..11, page 1 at 12..15, page 2 at 20..23.
    r2t = torch.zeros(1, 16, dtype=torch.int32)
    r2t[0, :10] = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15, 20, 21], dtype=torch.int32)
    sel = [torch.tensor([0, 2])]
    tok = build_token_table(r2t, [0], [10], sel, 4)
    assert tok.kv_indices.tolist() == [8, 9, 10, 11, 20, 21] and tok.kv_indptr.tolist() == [0, 6]
    page = build_page_table(r2t, [0], [10], sel, 4)
    assert page.kv_indices.tolist() == [2, 5] and page.kv_last_page_len.tolist() == [2]
    assert page.kv_indptr.tolist() == [0, 2]


def test_page_table_refuses_unaligned_pool():
    pool = make_pool([20], 4, HKV, D, aligned=False, seed=1)
    with pytest.raises(ValueError, match="page-aligned"):
        build_page_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, [torch.tensor([0, 4])], 4)


@pytest.mark.parametrize(
    "pages, match",
    [([2, 1, 4], "sorted"), ([0, 1], "last page"), ([1, 1, 4], "sorted"), ([-1, 4], r"\[0, 4\]"), ([], "non-empty")],
)
def test_bad_selections_are_named(pages, match):
    pool = make_pool([20], 4, HKV, D, seed=1)
    with pytest.raises(ValueError, match=match):
        build_token_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens,
                          [torch.tensor(pages, dtype=torch.int64)], 4)


def test_fixed_capacity_buffers_are_reused_views():
    page_size, budget = 4, 3
    buffers = TableBuffers(max_batch=4, budget_pages=budget, page_size=page_size, form="page")
    assert buffers.capacity == 4 * (budget + 1)
    ptr = buffers.kv_indices.data_ptr()
    for seed in range(2):
        seq_lens = [30, 13 + seed]
        pool = make_pool(seq_lens, page_size, HKV, D, seed=seed)
        sel = _selections(seq_lens, page_size, max_pages=budget + 1, seed=seed)
        t = build_page_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size, buffers)
        assert t.kv_indices.data_ptr() == ptr and t.kv_indptr.data_ptr() == buffers.kv_indptr.data_ptr()
        assert t.kv_last_page_len.data_ptr() == buffers.kv_last_page_len.data_ptr()
        fresh = build_page_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size)
        assert torch.equal(t.kv_indices, fresh.kv_indices) and torch.equal(t.kv_indptr, fresh.kv_indptr)
    too_many = [torch.arange(budget + 2)]
    pool = make_pool([(budget + 2) * page_size], page_size, HKV, D)
    with pytest.raises(ValueError, match="budget_pages"):
        build_page_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, too_many, page_size, buffers)
    with pytest.raises(ValueError, match="form"):
        build_token_table(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, too_many, page_size, buffers)
    with pytest.raises(ValueError, match="form: unknown 'rows'; allowed: token, page"):
        TableBuffers(1, 1, 4, "rows")


@pytest.mark.parametrize("full_tails", [True, False])
def test_bsr_layout_reproduces_routed_decode(full_tails):
    page_size = 4
    seq_lens = [24, 12, 8] if full_tails else [23, 12, 5]
    pool = make_pool(seq_lens, page_size, HKV, D, aligned=True, seed=11)
    sel = _selections(seq_lens, page_size, max_pages=3, seed=5)
    num_slots = pool.k_buffer.shape[0]
    cols = bsr_block_cols(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size, num_slots)
    assert cols == (page_size if full_tails else 1)
    layout = build_bsr_layout(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size, num_slots)
    assert (layout.M, layout.N, layout.R, layout.C) == (3, num_slots, 1, cols)
    for b in range(3):
        row = layout.indices[layout.indptr[b] : layout.indptr[b + 1]]
        assert torch.equal(row, torch.sort(row).values)
    q = torch.randn(3, HQ, D, generator=torch.Generator().manual_seed(4))
    out = fi.block_sparse(q, pool.k_buffer, pool.v_buffer, layout.indptr, layout.indices, layout.R, layout.C, SCALE)
    torch.testing.assert_close(out, _routed(pool, q, sel), atol=ATOL, rtol=0)
    if not full_tails:
        with pytest.raises(ValueError, match="partial tail page"):
            build_bsr_layout(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size, num_slots,
                             block_cols=page_size)


@pytest.mark.parametrize("form", ["page", "token"])
def test_device_side_fill_matches_host_builder(form):
    """Per-layer fill from `select_pages` output (tensor ops only) == host builder, layer after layer."""
    page_size, budget = 4, 4
    seq_lens = [41, 9, 16]
    pool = make_pool(seq_lens, page_size, HKV, D, aligned=True, seed=2)
    buffers = TableBuffers(max_batch=5, budget_pages=budget, page_size=page_size, form=form)
    counts = plan_routed_counts(seq_lens, page_size, budget)
    assert counts == [4, 3, 4]
    plan_step_table(seq_lens, counts, page_size, buffers)
    num_pages = torch.tensor([(n + page_size - 1) // page_size for n in seq_lens])
    build = build_page_table if form == "page" else build_token_table
    write = write_page_ids_on_device if form == "page" else write_token_slots_on_device
    for layer in range(3):  # different scores per layer: the same plan, new indices
        scores = torch.randn(3, int(num_pages.max()), generator=torch.Generator().manual_seed(layer))
        page_list, got_counts = ref.select_pages(scores, num_pages, budget, sink_pages=1, recent_pages=1)
        assert got_counts.tolist() == counts
        write(page_list, pool.req_to_token, pool.req_pool_indices, page_size, buffers, 3)
        sel = [page_list[b, : counts[b]] for b in range(3)]
        host = build(pool.req_to_token, pool.req_pool_indices, seq_lens, sel, page_size)
        nnz = int(buffers.kv_indptr[3])
        assert torch.equal(buffers.kv_indptr[:4], host.kv_indptr)
        assert torch.equal(buffers.kv_indices[:nnz], host.kv_indices)
        assert torch.equal(buffers.kv_last_page_len[:3], host.kv_last_page_len)


def test_plan_step_rejects_counts_beyond_capacity():
    buffers = TableBuffers(max_batch=2, budget_pages=2, page_size=4, form="page")
    with pytest.raises(ValueError, match="page count 4 out of range"):
        plan_step_table([40], [4], 4, buffers)


def test_flashinfer_path_is_importable_without_gpu():
    from sglang_mux.attention import flashinfer_path

    if not torch.cuda.is_available():
        with pytest.raises(flashinfer_path.FlashInferUnavailable, match="CUDA"):
            flashinfer_path.FlashInferRoutedDecode(
                max_batch=1, budget_pages=2, page_size=4, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D,
                kv_dtype=torch.float16,
            )


def _has_flashinfer_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:
        return False
    return True


gpu = pytest.mark.skipif(not _has_flashinfer_gpu(), reason="needs CUDA and flashinfer")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("form", ["page", "token"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_gpu_flashinfer_routed_decode_bf16(form, per_layer):
    from sglang_mux.attention.flashinfer_path import FlashInferRoutedDecode

    hq, hkv, d, page_size, budget = 32, 8, 128, 16, 8
    seq_lens = [1000, 333, 4096, 17]
    pool = make_pool(seq_lens, page_size, hkv, d, aligned=True, dtype=torch.bfloat16, seed=9, device="cuda")
    path = FlashInferRoutedDecode(max_batch=8, budget_pages=budget, page_size=page_size, num_qo_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, kv_dtype=torch.bfloat16, form=form)
    q = torch.randn(len(seq_lens), hq, d, device="cuda").to(torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    if per_layer:
        counts = plan_routed_counts(seq_lens, page_size, budget)
        path.plan_step(seq_lens, counts, scale)
        num_pages = torch.tensor([(n + page_size - 1) // page_size for n in seq_lens], device="cuda")
        scores = torch.randn(len(seq_lens), int(num_pages.max()), device="cuda")
        page_list, page_counts = ref.select_pages(scores, num_pages, budget, sink_pages=1, recent_pages=2)
        out = path.run_layer(q, pool.k_buffer, pool.v_buffer, page_list=page_list,
                             req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices)
    else:
        sel = _selections(seq_lens, page_size, max_pages=budget + 1, seed=1)
        path.plan_selections(pool.req_to_token, pool.req_pool_indices.tolist(), seq_lens, sel, scale)
        page_list, page_counts = as_page_list(sel, budget + 1)
        out = path.run_layer(q, pool.k_buffer, pool.v_buffer)
    want = pool.reference(q, page_list.cuda(), page_counts.cuda(), scale)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_flashinfer_block_sparse_bf16():
    import flashinfer

    hq, hkv, d, page_size = 32, 8, 128, 16
    seq_lens = [512, 256, 1024]
    pool = make_pool(seq_lens, page_size, hkv, d, aligned=True, dtype=torch.bfloat16, seed=4, device="cuda")
    sel = _selections(seq_lens, page_size, max_pages=6, seed=2)
    layout = build_bsr_layout(pool.req_to_token.cpu(), pool.req_pool_indices.cpu(), pool.seq_lens.cpu(), sel,
                              page_size, pool.k_buffer.shape[0])
    assert layout.C == page_size
    wrapper = flashinfer.BlockSparseAttentionWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
    scale = 1.0 / math.sqrt(d)
    wrapper.plan(layout.indptr.cuda(), layout.indices.cuda(), layout.M, layout.N, layout.R, layout.C, hq, hkv, d,
                 sm_scale=scale, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    q = torch.randn(len(seq_lens), hq, d, device="cuda").to(torch.bfloat16)
    out = wrapper.run(q, pool.k_buffer, pool.v_buffer)
    page_list, counts = as_page_list(sel, 6)
    want = pool.reference(q, page_list.cuda(), counts.cuda(), scale)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replays_new_per_layer_page_choices():
    """One captured graph (page choice -> table fill -> FlashInfer run, and the Triton routed decode) replays
    correctly for new scores: the fixed-capacity storage is what the graph reads."""
    from sglang_mux.attention.flashinfer_path import FlashInferRoutedDecode

    hq, hkv, d, page_size, budget = 32, 8, 128, 16, 8
    seq_lens = [1000, 500, 2048]
    pool = make_pool(seq_lens, page_size, hkv, d, aligned=True, dtype=torch.bfloat16, seed=6, device="cuda")
    path = FlashInferRoutedDecode(max_batch=4, budget_pages=budget, page_size=page_size, num_qo_heads=hq,
                                  num_kv_heads=hkv, head_dim=d, kv_dtype=torch.bfloat16, use_cuda_graph=True)
    scale = 1.0 / math.sqrt(d)
    counts = plan_routed_counts(seq_lens, page_size, budget)
    path.plan_step(seq_lens, counts, scale)
    num_pages = torch.tensor([(n + page_size - 1) // page_size for n in seq_lens], device="cuda")
    scores = torch.zeros(len(seq_lens), int(num_pages.max()), device="cuda")
    q = torch.randn(len(seq_lens), hq, d, device="cuda").to(torch.bfloat16)

    def step():
        page_list, page_counts = ref.select_pages(scores, num_pages, budget, sink_pages=1, recent_pages=2)
        fi_out = path.run_layer(q, pool.k_buffer, pool.v_buffer, page_list=page_list,
                                req_to_token=pool.req_to_token, req_pool_indices=pool.req_pool_indices)
        tri_out = pool.triton(q, page_list, page_counts, scale)
        return page_list, page_counts, fi_out, tri_out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        page_list, page_counts, fi_out, tri_out = step()
    for seed in range(3):
        scores.copy_(torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        torch.cuda.synchronize()
        want_list, want_counts = ref.select_pages(scores, num_pages, budget, sink_pages=1, recent_pages=2)
        assert torch.equal(page_list, want_list) and want_counts.tolist() == counts
        want = pool.reference(q, want_list, want_counts, scale)
        torch.testing.assert_close(fi_out.double(), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(tri_out.double(), want, atol=2e-2, rtol=2e-2)
