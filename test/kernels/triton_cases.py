"""The Triton kernel checks, collected through test_kernel_triton.py once the kernels are loaded.

Without CUDA they run under Triton's CPU interpreter at tiny shapes in fp32/fp16, with bf16 data upcast to fp32
(bf16 arithmetic is wrong in the interpreter). With CUDA (`-m gpu`) the same checks run compiled, in bf16, at
Llama-3.1-8B head shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import mux_kernels
from kv_pool import as_page_list, make_pool, random_selection
from mux_kernels import reference as ref
from mux_kernels.triton_support import TritonUnavailable, check_runnable

HAS_CUDA = torch.cuda.is_available()

cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on CPU-only machines")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def test_kernels_load_in_the_mode_this_machine_needs():
    from mux_kernels import page_score

    kind = type(page_score._page_score_kernel).__name__
    assert kind == ("JITFunction" if HAS_CUDA else "InterpretedFunction")


@cpu_only
def test_interpreter_refuses_bf16_and_names_the_fix():
    with pytest.raises(TritonUnavailable, match="upcast"):
        check_runnable(torch.zeros(2, dtype=torch.bfloat16))


def _routed_case(dtype, device, hq, hkv, d, page_size, seq_lens, max_pages, seed):
    pool = make_pool(seq_lens, page_size, hkv, d, dtype=dtype, seed=seed, device=device, aligned=seed % 2 == 0)
    sel = [random_selection(n, page_size, max_pages, seed + i) for i, n in enumerate(seq_lens)]
    page_list, counts = as_page_list(sel, max_pages)
    q = torch.randn(len(seq_lens), hq, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return pool, page_list.to(torch.int32).to(device), counts.to(device), q.to(device)


@cpu_only
@pytest.mark.parametrize(
    "dtype, page_size, num_splits, tol",
    [(torch.float32, 4, 1, 1e-5), (torch.float32, 16, 3, 1e-5), (torch.float16, 8, 2, 2e-3),
     (torch.float32, 1, 2, 1e-5)],
)
def test_routed_decode_interpreter(dtype, page_size, num_splits, tol):
    seq_lens = [5 * page_size + 3, 2 * page_size, 1]
    pool, page_list, counts, q = _routed_case(dtype, "cpu", 4, 2, 16, page_size, seq_lens, 4, seed=page_size)
    scale = 1.0 / math.sqrt(16)
    out = mux_kernels.routed_paged_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
                                          pool.req_pool_indices, pool.seq_lens, page_list, counts, page_size,
                                          scale, num_splits=num_splits)
    want = ref.routed_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices,
                             pool.seq_lens, page_list, counts, page_size, scale)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@cpu_only
def test_routed_decode_interpreter_per_group_lists():
    page_size, seq_lens = 4, [29, 12]
    pool, _, counts, q = _routed_case(torch.float32, "cpu", 4, 2, 16, page_size, seq_lens, 3, seed=6)
    scores = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(2))
    lists, counts = ref.select_pages_per_group(scores, torch.tensor([8, 3]), 3, sink_pages=0, recent_pages=1)
    assert not torch.equal(lists[:, 0], lists[:, 1])
    out = mux_kernels.routed_paged_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
                                          pool.req_pool_indices, pool.seq_lens, lists, counts, page_size, 0.25,
                                          num_splits=2)
    want = ref.routed_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices,
                             pool.seq_lens, lists, counts, page_size, 0.25)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@cpu_only
def test_routed_decode_interpreter_bf16_data_upcast():
    pool, page_list, counts, q = _routed_case(torch.bfloat16, "cpu", 4, 2, 16, 4, [19, 8], 3, seed=4)
    up = [t.float() for t in (q, pool.k_buffer, pool.v_buffer)]
    out = mux_kernels.routed_paged_decode(up[0], up[1], up[2], pool.req_to_token, pool.req_pool_indices,
                                          pool.seq_lens, page_list, counts, 4, 0.25, num_splits=2)
    want = ref.routed_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices,
                             pool.seq_lens, page_list, counts, 4, 0.25)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def _summary_case(dtype, device, hq, hkv, d, rows, max_pages, seed):
    g = torch.Generator().manual_seed(seed)
    kmin = torch.randn(rows, hkv, d, generator=g)
    kmax = kmin + torch.rand(rows, hkv, d, generator=g)
    table = torch.randint(0, rows, (3, max_pages), generator=g, dtype=torch.int32)
    num_pages = torch.tensor([max_pages, max_pages // 2, 1], dtype=torch.int32)
    q = torch.randn(3, hq, d, generator=g)
    return [t.to(device) for t in (q.to(dtype), kmin.to(dtype), kmax.to(dtype), table, num_pages)]


@cpu_only
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_page_scores_and_selection_interpreter(dtype, tol):
    q, kmin, kmax, table, num_pages = _summary_case(dtype, "cpu", 4, 2, 8, rows=12, max_pages=10, seed=1)
    got = mux_kernels.score_pages(q, kmin, kmax, table, num_pages, block_pages=8, block_dim=4)
    want = ref.page_scores(q, kmin, kmax, table, num_pages)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    page_list, counts = mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 4, 1, 1)
    want_list, want_counts = ref.select_pages(got.amax(dim=1), num_pages, 4, 1, 1)
    assert torch.equal(page_list, want_list) and torch.equal(counts, want_counts)
    assert counts.tolist() == [4, 4, 1] and page_list[0, 0] == 0 and page_list[0, 3] == 9
    per_group, group_counts = mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 4, 1, 1,
                                                                 per_group=True)
    want_group, _ = ref.select_pages_per_group(got, num_pages, 4, 1, 1)
    assert torch.equal(per_group, want_group) and torch.equal(group_counts, want_counts)
    forced = torch.zeros(3, 10, dtype=torch.bool)
    forced[0, 4] = True
    blocked = torch.zeros(3, 10, dtype=torch.bool)
    blocked[0, 1] = blocked[1, 0] = True
    page_list, counts = mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 4, 1, 1,
                                                           forced=forced, blocked=blocked)
    want_list, want_counts = ref.select_pages(got.amax(dim=1), num_pages, 4, 1, 1, forced, blocked)
    assert torch.equal(page_list, want_list) and torch.equal(counts, want_counts)
    assert 4 in page_list[0].tolist() and 1 not in page_list[0].tolist() and 0 not in page_list[1].tolist()


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_scatter_pages_interpreter(dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(40, 2, 8, generator=g).to(dtype)
    ids = torch.tensor([7, 0, 3], dtype=torch.int32)
    staged = mux_kernels.gather_pages(src, ids, 4, block_w=8)
    assert torch.equal(staged, ref.gather_pages(src, ids, 4))
    dst, want = torch.zeros_like(src), torch.zeros_like(src)
    mux_kernels.scatter_pages(dst, ids, staged, 4, block_w=8)
    assert torch.equal(dst, ref.scatter_pages(want, ids, staged, 4))
    with pytest.raises(ValueError, match="staged has 8 rows, expected 12"):
        mux_kernels.scatter_pages(dst, ids, staged[:8], 4)


# ---- GPU: compiled Triton, bf16, Llama-3.1-8B head shapes ----


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page_size", [16, 64])
def test_gpu_routed_decode_bf16(page_size):
    seq_lens = [4096, 1000, 17, 2 * page_size]
    pool, page_list, counts, q = _routed_case(torch.bfloat16, "cuda", 32, 8, 128, page_size, seq_lens, 24, seed=3)
    scale = 1.0 / math.sqrt(128)
    out = mux_kernels.routed_paged_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
                                          pool.req_pool_indices, pool.seq_lens, page_list, counts, page_size, scale)
    want = ref.routed_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices,
                             pool.seq_lens, page_list, counts, page_size, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_routed_decode_per_group_lists_bf16():
    page_size, seq_lens = 16, [4096, 700, 33]
    pool, _, _, q = _routed_case(torch.bfloat16, "cuda", 32, 8, 128, page_size, seq_lens, 16, seed=5)
    num_pages = torch.tensor([(n + page_size - 1) // page_size for n in seq_lens], device="cuda")
    scores = torch.randn(3, 8, int(num_pages.max()), device="cuda")
    lists, counts = ref.select_pages_per_group(scores, num_pages, 16, sink_pages=1, recent_pages=2)
    scale = 1.0 / math.sqrt(128)
    out = mux_kernels.routed_paged_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
                                          pool.req_pool_indices, pool.seq_lens, lists, counts, page_size, scale)
    want = ref.routed_decode(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.req_pool_indices,
                             pool.seq_lens, lists, counts, page_size, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_page_scores_selection_and_copies_bf16():
    q, kmin, kmax, table, num_pages = _summary_case(torch.bfloat16, "cuda", 32, 8, 128, rows=600, max_pages=512, seed=2)
    got = mux_kernels.score_pages(q, kmin, kmax, table, num_pages)
    torch.testing.assert_close(got, ref.page_scores(q, kmin, kmax, table, num_pages), atol=0.1, rtol=1e-2)
    page_list, counts = mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 64, 4, 8)
    want_list, _ = ref.select_pages(got.amax(dim=1), num_pages, 64, 4, 8)
    assert torch.equal(page_list, want_list)
    src = torch.randn(64 * 16, 8, 128, device="cuda").to(torch.bfloat16)
    ids = torch.tensor([5, 63, 0, 17], dtype=torch.int32, device="cuda")
    staged = mux_kernels.gather_pages(src, ids, 16)
    assert torch.equal(staged, ref.gather_pages(src, ids, 16))
    dst = torch.zeros_like(src)
    mux_kernels.scatter_pages(dst, ids, staged, 16)
    assert torch.equal(dst, ref.scatter_pages(torch.zeros_like(src), ids, staged, 16))
