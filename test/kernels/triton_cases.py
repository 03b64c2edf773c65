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


def _triton_matches_reference(pool, q, page_list, counts, scale, tol, *, upcast=False, **kw):
    """The Triton routed decode over ``pool`` (with ``upcast``: on fp32 copies of q, K and V) equals the float64
    reference within ``tol``."""
    if upcast:
        out = pool.triton(q.float(), page_list, counts, scale, k=pool.k_buffer.float(), v=pool.v_buffer.float(), **kw)
    else:
        out = pool.triton(q, page_list, counts, scale, **kw)
    torch.testing.assert_close(out.double(), pool.reference(q, page_list, counts, scale), atol=tol, rtol=tol)
    return out


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
    out = _triton_matches_reference(pool, q, page_list, counts, scale, tol, num_splits=num_splits)
    assert out.dtype == dtype


@cpu_only
def test_routed_decode_interpreter_per_group_lists():
    page_size, seq_lens = 4, [29, 12]
    pool, _, counts, q = _routed_case(torch.float32, "cpu", 4, 2, 16, page_size, seq_lens, 3, seed=6)
    scores = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(2))
    lists, counts = ref.select_pages_per_group(scores, torch.tensor([8, 3]), 3, sink_pages=0, recent_pages=1)
    assert not torch.equal(lists[:, 0], lists[:, 1])
    _triton_matches_reference(pool, q, lists, counts, 0.25, 1e-5, num_splits=2)


@cpu_only
def test_routed_decode_interpreter_bf16_data_upcast():
    pool, page_list, counts, q = _routed_case(torch.bfloat16, "cpu", 4, 2, 16, 4, [19, 8], 3, seed=4)
    _triton_matches_reference(pool, q, page_list, counts, 0.25, 1e-5, upcast=True, num_splits=2)


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


def _mass_oracle(head_scores: torch.Tensor, num_pages: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """float64, spelled out: per head the softmax over the valid pages of scale * bound, summed over the heads of
    each group, log taken; invalid pages -inf. [B, groups, P]."""
    b, hq, p = head_scores.shape
    out = torch.full((b, groups, p), float("-inf"), dtype=torch.float64)
    for i in range(b):
        n = int(num_pages[i])
        x = head_scores[i, :, :n].double() * scale
        w = torch.exp(x - x.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        out[i, :, :n] = torch.log(w.reshape(groups, hq // groups, n).sum(dim=1))
    return out


@cpu_only
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
def test_mass_rule_scores_and_selection_interpreter(dtype, tol):
    """The kernel's per-head scores == the reference's; the `mass` rule == the spelled-out float64 softmax sum;
    the device selection under `mass` == `select_pages` on those scores (all heads, and per kv-head group)."""
    q, kmin, kmax, table, num_pages = _summary_case(dtype, "cpu", 4, 2, 8, rows=12, max_pages=10, seed=3)
    got = mux_kernels.score_pages(q, kmin, kmax, table, num_pages, block_pages=8, block_dim=4, per_head=True)
    want = ref.page_scores(q, kmin, kmax, table, num_pages, per_head=True)
    assert got.shape == (3, 4, 10)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # per group, the max over its heads is the bound score the kernel returns without per_head
    grouped = mux_kernels.score_pages(q, kmin, kmax, table, num_pages, block_pages=8, block_dim=4)
    torch.testing.assert_close(got.reshape(3, 2, 2, 10).amax(dim=2), grouped)
    scale = 0.7
    for groups, kv in ((1, None), (2, 2)):
        mass = ref.combine_head_scores(got, num_pages, "mass", scale, num_kv_heads=kv)
        oracle = _mass_oracle(got, num_pages, scale, groups)
        torch.testing.assert_close(mass.reshape(3, groups, 10).double(), oracle, atol=1e-5, rtol=1e-5)
    mass = ref.combine_head_scores(got, num_pages, "mass", scale)
    page_list, counts = mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 4, 1, 1,
                                                           rule="mass", scale=scale)
    want_list, want_counts = ref.select_pages(mass, num_pages, 4, 1, 1)
    assert torch.equal(page_list, want_list) and torch.equal(counts, want_counts)
    per_group, _ = mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 4, 1, 1, per_group=True,
                                                      rule="mass", scale=scale)
    want_group, _ = ref.select_pages_per_group(ref.combine_head_scores(got, num_pages, "mass", scale, 2),
                                               num_pages, 4, 1, 1)
    assert torch.equal(per_group, want_group)
    with pytest.raises(ValueError, match="rule: allowed: bound, mass"):
        mux_kernels.select_pages_on_device(q, kmin, kmax, table, num_pages, 4, 1, 1, rule="max")


@cpu_only
def test_mass_rule_finds_the_page_a_loud_flat_head_hides_interpreter():
    """Head 0 scores every page about 10 (a flat, loud head); head 1 scores page 5 at 5 and the rest 0. The max over
    heads (Quest's `bound`) ranks by head 0's noise and misses page 5; `mass` picks it."""
    n = 10
    noise = torch.linspace(0.05, 0.0, n)  # page 5 is among the quietest on head 0
    keys = torch.zeros(n, 1, 2)
    keys[:, 0, 0] = 10 + noise
    keys[5, 0, 1] = 5.0
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, Hq=2, D=2], one kv head
    table, num_pages = torch.arange(n)[None], torch.tensor([n])
    args = (q, keys, keys, table, num_pages, 3, 1, 1)  # budget 3: sink page 0, tail page 9, one page by score
    bound, _ = mux_kernels.select_pages_on_device(*args)
    mass, _ = mux_kernels.select_pages_on_device(*args, rule="mass", scale=1.0)
    assert bound[0].tolist() == [0, 1, 9]
    assert mass[0].tolist() == [0, 5, 9]


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
    _triton_matches_reference(pool, q, page_list, counts, 1.0 / math.sqrt(128), 2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_routed_decode_per_group_lists_bf16():
    page_size, seq_lens = 16, [4096, 700, 33]
    pool, _, _, q = _routed_case(torch.bfloat16, "cuda", 32, 8, 128, page_size, seq_lens, 16, seed=5)
    num_pages = torch.tensor([(n + page_size - 1) // page_size for n in seq_lens], device="cuda")
    scores = torch.randn(3, 8, int(num_pages.max()), device="cuda")
    lists, counts = ref.select_pages_per_group(scores, num_pages, 16, sink_pages=1, recent_pages=2)
    _triton_matches_reference(pool, q, lists, counts, 1.0 / math.sqrt(128), 2e-2)


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
