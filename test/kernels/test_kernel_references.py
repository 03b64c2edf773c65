"""The torch references of mux_kernels against independent oracles (plain loops, worked examples)."""

from __future__ import annotations

import itertools

import pytest
import torch
from kv_pool import make_pool
from mux_kernels import reference as ref


def test_select_pages_worked_example():
    # num_pages=10, budget=4, sink=1, recent=1, best middle pages 6 then 3 -> [0, 3, 6, 9]
    scores = torch.zeros(1, 10)
    scores[0, 6], scores[0, 3], scores[0, 0], scores[0, 9] = 5.0, 4.0, -9.0, -9.0
    page_list, counts = ref.select_pages(scores, torch.tensor([10]), 4, sink_pages=1, recent_pages=1)
    assert page_list.tolist() == [[0, 3, 6, 9]] and counts.tolist() == [4]


def test_select_pages_ties_go_to_lower_id_and_short_requests_keep_all():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 7.0], [3.0, 3.0, 3.0, -1.0, -1.0, -1.0]])
    page_list, counts = ref.select_pages(scores, torch.tensor([6, 3]), 3, sink_pages=0, recent_pages=1)
    assert page_list.tolist() == [[1, 2, 5], [0, 1, 2]]
    assert counts.tolist() == [3, 3]
    page_list, counts = ref.select_pages(scores, torch.tensor([6, 2]), 4, sink_pages=0, recent_pages=1)
    assert page_list.tolist() == [[1, 2, 3, 5], [0, 1, -1, -1]] and counts.tolist() == [4, 2]


def test_select_pages_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 14, (1,), generator=g))
        budget = int(torch.randint(3, 8, (1,), generator=g))
        scores = torch.randint(0, 4, (1, 14), generator=g).float()  # many ties
        page_list, counts = ref.select_pages(scores, torch.tensor([n]), budget, sink_pages=1, recent_pages=2)
        if n <= budget:
            want = list(range(n))
        else:
            forced = {0, n - 2, n - 1}
            middle = sorted((p for p in range(n) if p not in forced), key=lambda p: (-float(scores[0, p]), p))
            want = sorted(forced | set(middle[: budget - len(forced)]))
        assert page_list[0, : int(counts[0])].tolist() == want, trial


def test_select_pages_rejects_budget_below_forced():
    with pytest.raises(ValueError, match="budget_pages=2 is smaller than the forced pages"):
        ref.select_pages(torch.zeros(1, 8), torch.tensor([8]), 2, sink_pages=2, recent_pages=1)
    with pytest.raises(ValueError, match="recent_pages must be >= 1"):
        ref.select_pages(torch.zeros(1, 8), torch.tensor([8]), 2, sink_pages=0, recent_pages=0)


def test_page_summaries_and_scores_match_loops():
    page_size, hkv, hq, d = 4, 2, 4, 3
    pool = make_pool([10], page_size, hkv, d, seed=3)
    slots = pool.req_to_token[1, :10].long()
    kmin, kmax = ref.page_summaries(pool.k_buffer, slots, page_size)
    assert kmin.shape == (3, hkv, d)
    for p in range(3):
        keys = pool.k_buffer[slots[p * page_size : min(10, (p + 1) * page_size)]]
        assert torch.equal(kmin[p], keys.amin(0)) and torch.equal(kmax[p], keys.amax(0))
    q = torch.randn(1, hq, d, generator=torch.Generator().manual_seed(1))
    table = torch.tensor([[2, 0, 1, 0]])
    s = ref.page_scores(q, kmin, kmax, table, torch.tensor([3]))
    for h, p in itertools.product(range(hkv), range(4)):
        if p >= 3:
            assert s[0, h, p] == float("-inf")
            continue
        row = int(table[0, p])
        per_head = [
            sum(max(float(q[0, qh, i]) * float(kmin[row, h, i]), float(q[0, qh, i]) * float(kmax[row, h, i]))
                for i in range(d))
            for qh in range(h * 2, h * 2 + 2)
        ]
        assert abs(float(s[0, h, p]) - max(per_head)) < 1e-5


def test_page_score_bounds_every_key_in_the_page():
    """The Quest score is an upper bound of q.k over the page's keys (the property that makes it safe)."""
    page_size, hkv, d = 8, 2, 16
    pool = make_pool([64], page_size, hkv, d, seed=8)
    slots = pool.req_to_token[1, :64].long()
    kmin, kmax = ref.page_summaries(pool.k_buffer, slots, page_size)
    q = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(5))
    s = ref.page_scores(q, kmin, kmax, torch.arange(8)[None], torch.tensor([8]))
    keys = pool.k_buffer[slots].reshape(8, page_size, hkv, d)
    qk = torch.einsum("hd,ptkd->pthk", q[0], keys)  # [page, tok, q head, kv head]
    for h in range(hkv):
        true_max = qk[:, :, 2 * h : 2 * h + 2, h].amax(dim=(1, 2))
        assert bool((s[0, h] >= true_max - 1e-5).all())


def test_per_group_routed_decode_equals_one_list_per_kv_head():
    page_size, hq, hkv, d = 4, 6, 3, 8
    pool = make_pool([30, 11], page_size, hkv, d, seed=2)
    q = torch.randn(2, hq, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    g = torch.Generator().manual_seed(1)
    group_scores = torch.randn(2, hkv, 8, generator=g)
    num_pages = torch.tensor([8, 3])
    lists, counts = ref.select_pages_per_group(group_scores, num_pages, 4, sink_pages=1, recent_pages=1)
    assert lists.shape == (2, hkv, 4) and counts.tolist() == [4, 3]
    for h in range(hkv):
        one, one_counts = ref.select_pages(group_scores[:, h], num_pages, 4, sink_pages=1, recent_pages=1)
        assert torch.equal(lists[:, h], one) and torch.equal(counts, one_counts)
    got = pool.reference(q, lists, counts, 0.3)
    for h in range(hkv):
        heads = slice(h * 2, h * 2 + 2)
        want = pool.reference(q[:, heads], lists[:, h], counts, 0.3, k=pool.k_buffer[:, h : h + 1],
                              v=pool.v_buffer[:, h : h + 1])
        torch.testing.assert_close(got[:, heads], want, atol=1e-12, rtol=0)
    assert not torch.allclose(got[:, 0:2], pool.reference(q, lists[:, 1], counts, 0.3)[:, 0:2]), \
        "different lists per group must change the output"
