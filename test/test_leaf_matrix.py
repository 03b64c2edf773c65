"""Every registered leaf x every cold-page mode x {exact, routed}, on a small pool, no server (kvpress-style matrix).

Each case plans one decode step through the backend (the grant and the cold-page policy the config asks for:
keep every page, drop cold pages, or tier them to the host), poisons every device slot that was given back (as
another request would reuse it), then attends, and checks against float64 oracles:

* the output == float64 attention over the original K/V of exactly the pages the leaves selected (exact: all pages);
* the leaf under test chose pages, within its grant; the tail page is read; pages read <= budget / P + 1;
* no dropped page is read; every page a leaf declares device-resident (``device_pages``, ``device_best_pages``) is
  still on the device; something left the device in drop / tier mode and nothing did in keep mode or when exact;
* conservation: the allocator got back exactly the slots of the pages that left the device; the host tier holds
  exactly the demoted pages (bytes == pages x record bytes, ``TierManager.check_integrity``), each a bit-exact copy.

A leaf added to the registry is picked up by the parametrization; ``run_case`` is also what
test/test_leaf_registry.py runs a throwaway leaf through.
"""

from __future__ import annotations

import pytest
import torch
from cpu_pools import paged_allocator
from test_routed_decode import HKV, HQ, D, decode_request, make_backend, ref_attention

from sglang_mux.attention.routed_decode import page_positions
from sglang_mux.config import MuxConfig
from sglang_mux.leaves import LEAVES, get_leaf
from sglang_mux.memory.tiers import TierManager, record_nbytes

P, L = 8, 300  # 38 pages, the last one partial
ROUTED_BUDGET, EXACT_BUDGET = 64, 512
MODES = ("keep", "drop", "tier")


def leaf_spec(leaf_name: str) -> str:
    """The leaf's shares take the whole budget (the first ones 16 tokens each, the last the rest); others get 0."""
    shares = list(get_leaf(leaf_name).share_places())
    return ",".join([f"{s}=16" for s in shares[:-1]] + [f"{shares[-1]}=rest"])


def mode_config(leaf_name: str, mode: str, routed: bool) -> MuxConfig:
    extra = {"drop": {"drop_cold": True}, "tier": {"host_bytes": 1 << 20, "missing_page": "wait"}}.get(mode, {})
    return MuxConfig(budget=ROUTED_BUDGET if routed else EXACT_BUDGET, page_size=P, leaves=leaf_spec(leaf_name),
                     **extra)


def run_case(leaf_name: str, mode: str, routed: bool, seed: int = 0) -> dict:
    cfg = mode_config(leaf_name, mode, routed)
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=seed)
    k_all, v_all = kv.get_key_buffer(0)[slots].clone(), kv.get_value_buffer(0)[slots].clone()
    n = (L + P - 1) // P
    # every slot of the pool is in use, so what the cold-page policy frees is exactly what the allocator gets back
    alloc = paged_allocator(kv, 4096, P)
    alloc.alloc(alloc.available_size())
    be.cold.allocator = alloc
    if mode == "tier":
        be.cold.tiers = be.tiers = TierManager(host_bytes=1 << 20)  # this case's own, not the process's
    st, fb, g = decode_request(be, L, seed=100 + seed)  # owns every page, random heavy-hitter scores
    be._plan_step(fb)
    (p,) = be._plan
    assert p.grant.exact is not routed
    off = st.off_device_pages()
    for page in off:  # reused by another request
        kv.get_key_buffer(0)[slots[page * P : (page + 1) * P]] = 1e4
        kv.get_value_buffer(0)[slots[page * P : (page + 1) * P]] = -1e4

    q = torch.randn(1, HQ * D, generator=g)
    if routed:
        pages, by_leaf, *_ = be.planner.select(p, 0, q.view(HQ, D), r2t.req_to_token[1], layer.scaling)
        positions = page_positions(pages, L, P)
    else:
        pages, by_leaf, positions = torch.arange(n), {}, torch.arange(L)
    out = be._routed_decode(q, layer, be._plan)
    assert st.error is None, st.error
    want = ref_attention(q.view(HQ, D), k_all[positions], v_all[positions], layer.scaling)
    torch.testing.assert_close(out.view(HQ, D).double(), want, rtol=1e-5, atol=1e-5)

    chosen = pages.tolist()
    if routed:
        leaf = get_leaf(leaf_name)
        assert chosen == sorted(set(chosen)) and n - 1 in chosen  # unique, sorted, the tail page read
        assert len(chosen) <= cfg.budget // P + 1 and len(chosen) <= p.grant.total_pages
        assert 0 < by_leaf[leaf_name] <= leaf.max_pages(p.grant), by_leaf
        assert not set(chosen) & st.dropped_pages
        resident = set()
        for lf in LEAVES.values():
            resident |= set(lf.device_pages(n, p.grant))
        assert not resident & off
        best = sum(lf.device_best_pages(p.grant, dropping=mode == "drop") for lf in LEAVES.values())
        on_device_owned = set(range(n - 1)) - off
        assert len(on_device_owned - resident) >= min(best, n - 1 - len(resident))
    moved = routed and mode != "keep"
    assert bool(off) == moved, (mode, routed, off)
    assert bool(st.dropped_pages) == (moved and mode == "drop") and bool(st.demoted) == (moved and mode == "tier")

    # conservation: the allocator and the tier
    freed = set(alloc.get_all_free_pages().tolist())
    assert freed == {int(slots[page * P]) // P for page in off}
    if mode == "tier":
        be.tiers.check_integrity()
        rec_bytes = 2 * P * HKV * D * 4  # one layer, K and V, float32
        assert be.tiers.bytes_by_tier() == {"host": len(st.demoted) * rec_bytes}
        for page, key in st.demoted.items():
            assert be.tiers.tier_of(key) == "host"
            rec = be.tiers.get(key)
            assert record_nbytes(rec) == rec_bytes
            assert torch.equal(rec[0, 0], k_all[page * P : (page + 1) * P])
            assert torch.equal(rec[0, 1], v_all[page * P : (page + 1) * P])
    return {"pages": chosen, "by_leaf": by_leaf, "off": off, "grant": p.grant}


@pytest.mark.parametrize("routed", [False, True], ids=["exact", "routed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("leaf_name", list(LEAVES))
def test_leaf_matrix(leaf_name, mode, routed):
    run_case(leaf_name, mode, routed)
