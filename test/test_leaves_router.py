"""The static spine router and the leaves as pure functions of integers (the worked examples in their docstrings)."""

import torch

from sglang_mux.config import MuxConfig
from sglang_mux.leaves import LEAVES, LeafContext
from sglang_mux.leaves.recent import RecentLeaf
from sglang_mux.leaves.sink_heavy import SinkHeavyLeaf
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.router.grant import Grant, grant_for
from sglang_mux.router.spine import StaticSpineRouter


def test_grant_worked_example():
    split = {"sink": 64, "recent": 512, "heavy": 256, "retrieval": 1216}
    g = grant_for(20000, 2048, 16, split)
    assert (g["sink"], g["recent"], g["heavy"], g["retrieval"]) == (4, 32, 16, 76)
    assert g.total_pages == 2048 // 16


def test_rounding_to_pages_loses_no_budget():
    # the grant.py example: 15/31/15/65 tokens would round to 0+1+0+4 pages; the lost 2 go to the largest leaf
    g = grant_for(1000, 126, 16, {"sink": 15, "recent": 31, "heavy": 15, "retrieval": 65})
    assert (g["sink"], g["recent"], g["heavy"], g["retrieval"]) == (0, 1, 0, 6)
    for budget in (17, 100, 126, 254, 1000, 4095):
        for P in (1, 4, 16, 64):
            cfg = MuxConfig(budget=budget, page_size=P)
            for spec in ("", "sink=64,recent=rest", "sink=16,heavy=rest", "sink=16,retrieval=rest",
                         "sink=5,recent=7,heavy=3,retrieval=rest"):
                if spec.startswith("sink=64") and budget < 64:
                    continue
                split = cfg.replace(leaves=spec).leaf_split(budget)
                g = grant_for(budget * 10, budget, P, split)
                got = (g["sink"], g["recent"], g["heavy"], g["retrieval"])
                assert sum(got) == budget // P, (budget, P, spec, split, got)
                floor = [split[k] // P for k in ("sink", "recent", "heavy", "retrieval")]
                assert all(a >= b for a, b in zip(got, floor))  # only ever more than the leaf's own tokens give
    # fixed leaves summing below the budget keep their sizes: only rounding losses move
    g = grant_for(1000, 256, 16, {"sink": 8, "recent": 40, "heavy": 0, "retrieval": 0})
    assert (g["sink"], g["recent"], g["heavy"], g["retrieval"]) == (0, 3, 0, 0)  # 48 tokens: 3 pages


def test_fits_or_forced_means_exact():
    split = MuxConfig().leaf_split(2048)
    assert grant_for(2048, 2048, 16, split).exact
    assert not grant_for(2049, 2048, 16, split).exact
    assert grant_for(10**6, 2048, 16, split, force_exact=True).exact


def test_pages_read_bound_holds_for_any_split():
    for budget in (16, 100, 1000, 4096):
        for P in (1, 4, 16, 64):
            cfg = MuxConfig(budget=budget, page_size=P, sink_tokens=0, window_tokens=0)
            for spec in ("", "sink=0,recent=0,retrieval=rest", "recent=rest", "sink=5,recent=7,heavy=3,retrieval=rest"):
                g = grant_for(budget * 10, budget, P, cfg.replace(leaves=spec).leaf_split(budget))
                assert g.total_pages <= budget // P + 1


def test_per_request_budget_overrides_server():
    router = StaticSpineRouter(MuxConfig(budget=2048, page_size=16))
    assert router.grant(3000, MuxRequestOptions()).exact is False
    assert router.grant(3000, MuxRequestOptions(budget=4096)).exact is True
    g = router.grant(3000, MuxRequestOptions(budget=256, leaves="sink=0,recent=rest"))
    assert (g["recent"], g["retrieval"], g["heavy"]) == (16, 0, 0)


def _ctx(n, scores=None):
    return LeafContext(num_pages=n, taken=torch.zeros(n, dtype=torch.bool), heavy_scores=scores)


def test_recent_leaf_example():
    assert RecentLeaf().select(_ctx(9), Grant(False, {"recent": 3})).tolist() == [6, 7, 8]
    assert RecentLeaf().select(_ctx(9), Grant(False, {"recent": 0})).tolist() == [8]  # the tail page, always


def test_sink_heavy_leaf_example():
    scores = torch.tensor([0, 9, 1, 7, 0, 2, 0, 0, 0], dtype=torch.float32)
    got = SinkHeavyLeaf().select(_ctx(9, scores), Grant(False, {"sink": 1, "heavy": 2}))
    assert got.tolist() == [0, 1, 3]


def test_leaves_registry_order_window_first():
    assert list(LEAVES) == ["recent", "sink_heavy", "retrieval", "chunk"]


def test_finished_request_without_kv_is_forgotten_but_one_holding_kv_waits_for_the_cache():
    from types import SimpleNamespace

    from sglang_mux.router.hooks import after_stream_output
    from sglang_mux.memory.requests import REGISTRY

    REGISTRY.admit("aborted", None)
    REGISTRY.admit("holding", None)
    reqs = [
        SimpleNamespace(rid="aborted", finished=lambda: True, kv=SimpleNamespace(holds_kv=False)),
        SimpleNamespace(rid="holding", finished=lambda: True, kv=SimpleNamespace(holds_kv=True)),
    ]
    after_stream_output(None, None, reqs, False)  # AFTER hook: (result, self, reqs, return_logprob)
    assert REGISTRY.peek("aborted") is None and REGISTRY.peek("holding") is not None
    REGISTRY.release("holding")


def test_batch_reopens_only_after_mux_freed_slots():
    from types import SimpleNamespace

    from sglang_mux.metrics import STATS
    from sglang_mux.router.hooks import reopen_batch_after_freeing

    sched = SimpleNamespace(running_batch=SimpleNamespace(batch_is_full=True))
    reopen_batch_after_freeing(sched)  # sync with the counter
    sched.running_batch.batch_is_full = True
    reopen_batch_after_freeing(sched)
    assert sched.running_batch.batch_is_full is True  # nothing freed since: SGLang's mark stands
    STATS.freed_device_tokens += 16
    reopen_batch_after_freeing(sched)
    assert sched.running_batch.batch_is_full is False


def test_top_free_equals_a_stable_sort_of_the_free_pages():
    """top_free (a topk threshold) must choose what a stable descending sort of the free pages chooses, ties to the
    lower page id; scores with many ties (integers 0..3) make that part matter."""
    import random

    from sglang_mux.leaves.base import top_free

    def reference(scores, taken, k):
        free = (~taken).nonzero().flatten()
        if free.numel() <= k:
            return free
        order = torch.sort(-scores[free].float(), stable=True).indices[:k]
        return torch.sort(free[order]).values

    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 60)
        scores = torch.tensor([float(rng.randint(0, 3)) for _ in range(n + rng.randint(0, 5))])
        taken = torch.tensor([rng.random() < 0.4 for _ in range(n)])
        k = rng.randint(1, n + 2)
        assert torch.equal(top_free(scores, taken, k), reference(scores, taken, k)), (scores, taken, k)
