"""The GPU-path pieces agree with the routed torch path the `mux` backend runs on CPU
(`sglang_mux.attention.routed_decode`, `sglang_mux.leaves.base.top_free`).

- FlashInfer's semantics over the built tables == the backend's `attend` over the selected slots.
- Quest scores: the kernel reference (and the Triton kernel, see triton_cases) == `quest_page_scores`, under
  both retrieval score rules (`bound`, `mass`).
- On-device selection (`select_pages`) == forced pages + the backend leaves' `top_free` on the rest.
"""

from __future__ import annotations

import flashinfer_semantics as fi
import pytest
import torch
from kv_pool import D, HKV, HQ, SCALE, make_pool, random_selection
from mux_kernels import reference as ref

from sglang_mux.attention.flashinfer_tables import build_page_table, build_token_table
from sglang_mux.attention.routed_decode import (
    attend,
    page_positions,
    quest_page_scores,
    quest_page_scores_head_major,
)
from sglang_mux.leaves.base import top_free


@pytest.mark.parametrize("form", ["token", "page"])
def test_tables_reproduce_the_backend_attend(form):
    page_size, seq_lens = 8, [77, 24, 9]
    pool = make_pool(seq_lens, page_size, HKV, D, aligned=True, seed=21)
    sel = [random_selection(n, page_size, 4, 40 + i) for i, n in enumerate(seq_lens)]
    q = torch.randn(3, HQ, D, generator=torch.Generator().manual_seed(8))
    build = build_page_table if form == "page" else build_token_table
    t = build(pool.req_to_token, pool.req_pool_indices, pool.seq_lens, sel, page_size)
    width = t.page_size
    out = fi.paged_decode(q, pool.k_buffer.view(-1, width, HKV, D), pool.v_buffer.view(-1, width, HKV, D),
                          t.kv_indptr, t.kv_indices, t.kv_last_page_len, SCALE)
    for b, n in enumerate(seq_lens):
        slots = pool.req_to_token[b + 1, page_positions(sel[b], n, page_size)].long()
        want, _ = attend(q[b], pool.k_buffer[slots], pool.v_buffer[slots], SCALE)
        torch.testing.assert_close(out[b].float(), want, atol=1e-5, rtol=1e-5)


def test_quest_scores_agree_with_the_backend():
    page_size = 4
    pool = make_pool([45], page_size, HKV, D, seed=3)
    slots = pool.req_to_token[1, :45].long()
    kmin, kmax = ref.page_summaries(pool.k_buffer, slots, page_size)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(4))
    n = kmin.shape[0]
    ours = ref.page_scores(q, kmin, kmax, torch.arange(n)[None], torch.tensor([n]))[0].amax(dim=0)
    torch.testing.assert_close(ours, quest_page_scores(q[0], kmin, kmax), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["bound", "mass"])
def test_combined_head_scores_agree_with_the_backend(rule):
    """`combine_head_scores` over the kernel's per-head scores == the backend's score under the same rule."""
    page_size, scale = 4, 0.3
    pool = make_pool([53], page_size, HKV, D, seed=5)
    kmin, kmax = ref.page_summaries(pool.k_buffer, pool.req_to_token[1, :53].long(), page_size)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(6))
    n = kmin.shape[0]
    table = torch.cat([torch.arange(n), torch.zeros(3, dtype=torch.long)])[None]  # 3 padding pages past num_pages
    head = ref.page_scores(q, kmin, kmax, table, torch.tensor([n]), per_head=True)
    ours = ref.combine_head_scores(head, torch.tensor([n]), rule, scale)[0]
    theirs = quest_page_scores_head_major(q[0], kmin.transpose(0, 1), kmax.transpose(0, 1), rule, scale)
    torch.testing.assert_close(ours[:n], theirs, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(ours[n:]).all()


def test_on_device_selection_equals_forced_pages_plus_top_free():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 30, (1,), generator=g))
        budget, sink, recent = 8, 2, 3
        scores = torch.randint(0, 5, (n,), generator=g).float()  # ties on purpose
        page_list, counts = ref.select_pages(scores[None], torch.tensor([n]), budget, sink, recent)
        taken = torch.zeros(n, dtype=torch.bool)
        taken[:sink] = True
        taken[max(0, n - recent):] = True
        extra = top_free(scores, taken, budget - int(taken.sum()))
        want = torch.sort(torch.cat([taken.nonzero().flatten(), extra])).values
        assert page_list[0, : int(counts[0])].tolist() == want.tolist(), trial


def test_kernel_summary_layout_is_the_backend_page_summary_store():
    """`score_pages` reads kmin/kmax pools indexed by physical page (slot // P): the PageSummaryStore layout."""
    from sglang_mux.memory.page_summaries import PageSummaryStore

    page_size, n_tokens = 4, 37
    pool = make_pool([n_tokens], page_size, HKV, D, aligned=True, seed=12)
    store = PageSummaryStore([pool.k_buffer], page_size)
    row = pool.req_to_token[1]
    store.rebuild_from_keys(0, row, 0, n_tokens)
    n = (n_tokens + page_size - 1) // page_size
    first_slots = row[torch.arange(n) * page_size].long()
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(2))
    table = (first_slots // page_size)[None]
    ours = ref.page_scores(q, store.kmin[0], store.kmax[0], table, torch.tensor([n]))[0].amax(dim=0)
    theirs = quest_page_scores(q[0], *store.get(0, first_slots))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    slots = row[:n_tokens].long()
    kmin, kmax = ref.page_summaries(pool.k_buffer, slots, page_size)
    assert torch.equal(store.kmin[0][table[0]], kmin) and torch.equal(store.kmax[0][table[0]], kmax)


def test_selection_with_leaf_chosen_and_dropped_pages_equals_the_leaf_composition():
    """forced = pages other leaves chose (e.g. heavy hitters), blocked = dropped pages: the device selection is
    those plus `top_free` on the rest, and its counts are what `plan_routed_counts` plans."""
    from sglang_mux.attention.flashinfer_tables import plan_routed_counts

    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        n = int(torch.randint(2, 40, (1,), generator=g))
        budget, recent = 10, 2
        scores = torch.randint(0, 4, (n,), generator=g).float()
        blocked = torch.rand(n, generator=g) < 0.2
        blocked[n - recent:] = False
        forced = (torch.rand(n, generator=g) < 0.15) & ~blocked
        page_list, counts = ref.select_pages(scores[None], torch.tensor([n]), budget, 0, recent,
                                             forced=forced[None], blocked=blocked[None])
        taken = forced.clone()
        taken[n - recent:] = True
        if int(taken.sum()) > budget:
            continue  # over-budget forcing is covered by test_forced_overflow_keeps_the_tail
        extra = top_free(scores, taken | blocked, budget - int(taken.sum()))
        want = torch.sort(torch.cat([taken.nonzero().flatten(), extra])).values
        assert page_list[0, : int(counts[0])].tolist() == want.tolist(), trial
        assert counts.tolist() == plan_routed_counts([n], 1, budget, [int(blocked.sum())]), trial


def test_forced_overflow_keeps_the_tail_and_nan_ranks_last():
    scores = torch.tensor([[float("nan"), 1.0, 0.0, 2.0, 0.0, 0.0]])
    forced = torch.tensor([[False, True, True, True, True, False]])
    page_list, counts = ref.select_pages(scores, torch.tensor([6]), 3, 0, 1, forced=forced)
    assert page_list.tolist() == [[1, 2, 5]] and counts.tolist() == [3]
    blocked = torch.tensor([[False, True, False, False, False, False]])
    page_list, _ = ref.select_pages(scores, torch.tensor([6]), 5, 0, 1, blocked=blocked)
    assert page_list.tolist() == [[0, 2, 3, 4, 5]]
    page_list, _ = ref.select_pages(scores, torch.tensor([6]), 4, 0, 1, blocked=blocked)
    assert page_list.tolist() == [[2, 3, 4, 5]]
