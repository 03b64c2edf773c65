"""A chunk's pages come back from the lower tiers in one request (``TierManager.get_many``; disk files read
concurrently), not one fetch per page: the routed step's output stays the exact one."""

from __future__ import annotations

import torch
from test_routed_decode import HQ, D, make_backend

from sglang_mux.attention.step_planner import RequestPlan
from sglang_mux.config import MuxConfig
from sglang_mux.memory.requests import RequestMemory
from sglang_mux.memory.staging import StagingArea
from sglang_mux.memory.tiers import TierManager
from sglang_mux.metrics import STATS
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.router.spine import StaticSpineRouter


def test_disk_get_many_equals_get(tmp_path):
    tiers = TierManager(host_bytes=0, disk_path=str(tmp_path), disk_bytes=1 << 24)
    recs = {("r", i): torch.randn(1, 2, 8, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    for k, r in recs.items():
        assert tiers.demote(k, r) == "disk"
    keys = list(recs)[::-1]
    got = tiers.get_many(keys)
    assert all(torch.equal(g, recs[k]) for g, k in zip(got, keys))


def test_selected_demoted_pages_are_fetched_in_one_request(tmp_path):
    P, L = 8, 400
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=8,recent=8,retrieval=rest", host_bytes=1 << 20,
                    missing_page="wait")
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=7)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(2))
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    pages, *_ = be.planner.select(RequestPlan("r", 1, L, grant, RequestMemory()), 0, q[0], r2t.req_to_token[1])
    want = be._routed_decode(q.reshape(1, -1), layer, [RequestPlan("r", 1, L, grant, RequestMemory())])

    tiers = TierManager(host_bytes=0, disk_path=str(tmp_path), disk_bytes=1 << 24)  # every page on disk
    be.cold.tiers = be.tiers = tiers
    calls = []
    get_many = tiers.get_many
    tiers.get_many = lambda keys: calls.append(list(keys)) or get_many(keys)
    st = RequestMemory()
    st.staging = StagingArea(16, "cpu")
    retrieved = [int(x) for x in pages.tolist() if 1 <= x < (L // P) - 1]
    be.cold._grow_cold_summaries(st, (L + P - 1) // P, "cpu")
    for page in retrieved:
        s = slots[page * P : (page + 1) * P]
        tiers.demote(("r", page), torch.stack([torch.stack([kv.get_key_buffer(0)[s], kv.get_value_buffer(0)[s]])]))
        st.demoted[page] = ("r", page)
        kmin, kmax = be.summaries.get(0, s[:1])
        st.cold_kmin[0, page], st.cold_kmax[0, page] = kmin[0], kmax[0]
        kv.get_key_buffer(0)[s] = 1e3  # the device page is reused by someone else
    assert len(retrieved) >= 3
    before = (STATS.staging_batched_fetches, STATS.staging_waited)
    got = be._routed_decode(q.reshape(1, -1), layer, [RequestPlan("r", 1, L, grant, st)])
    assert torch.allclose(got, want, atol=1e-5)
    assert calls == [[("r", page) for page in retrieved]]  # one request for all of them
    assert (STATS.staging_batched_fetches, STATS.staging_waited) == (before[0] + 1, before[1] + len(retrieved))
    got = be._routed_decode(q.reshape(1, -1), layer, [RequestPlan("r", 1, L, grant, st)])  # staged: no fetch
    assert torch.allclose(got, want, atol=1e-5) and len(calls) == 1
