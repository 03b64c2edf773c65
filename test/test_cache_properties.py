"""Property-based tests of the mux radix cache on real SGLang pools (CPU, no server).

Random sequences of request admit (match + allocate + write keys + insert) / lock / unlock / finish / evict keep:
* every device page is free xor owned by exactly one tree node or one running request;
* every node's page table agrees with its span (one entry per page, first slots equal);
* the key summaries of every node page equal min/max recomputed from the stored keys (shared prefixes share them);
* after all requests finish and the cache is evicted completely, nothing leaks.
"""

from __future__ import annotations

import torch
from cpu_pools import mux_radix_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from sglang_mux.memory.page_summaries import PageSummaryStore
from sglang_mux.memory.radix_cache import _subtract_ranges

P = 4
POOL = 512


def make():
    kv, alloc, cache = mux_radix_cache(POOL, P)
    store = PageSummaryStore([kv.get_key_buffer(0)], P)
    return kv, alloc, cache, store


def check_invariants(kv, alloc, cache, store, running):
    owners = {}
    for node in cache.iter_nodes():
        pt = cache.page_table(node) if getattr(node, "mux_pages", None) is None else node.mux_pages
        assert pt.agrees_with(node.value, P)
        for s in node.value[::P].tolist():
            page = s // P
            assert page not in owners, f"page {page} owned twice"
            owners[page] = "node"
            kmin, kmax = store.get(0, torch.tensor([s]))
            keys = kv.get_key_buffer(0)[s : s + P]
            assert torch.equal(kmin[0], keys.amin(0)) and torch.equal(kmax[0], keys.amax(0))
    for slots in running.values():
        for s in slots[::P].tolist():
            assert s // P not in owners, "a running request's own page is also in the tree or another request"
            owners[s // P] = "req"
    free = set((alloc.free_pages.tolist()))
    assert not (free & set(owners)), "a page is both free and owned"
    assert len(free) + len(owners) == POOL // P, (len(free), len(owners))


ops = st.lists(
    st.tuples(st.sampled_from(["admit", "finish", "evict"]), st.integers(0, 5), st.integers(1, 6)), min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_cache_invariants_under_random_operations(seq):
    kv, alloc, cache, store = make()
    gen = torch.Generator().manual_seed(0)
    running: dict[int, torch.Tensor] = {}  # request -> its own slots (not in the tree)
    locks: dict[int, object] = {}
    keys: dict[int, list] = {}
    next_id = 0
    for op, a, b in seq:
        if op == "admit":
            # token ids share prefixes: family a, length b pages
            toks = [a * 1000 + i for i in range(b * P)]
            m = cache.match_prefix(MatchPrefixParams(key=RadixKey(toks)))
            matched = m.device_prefix_len
            need = len(toks) - matched
            if need and alloc.available_size() < need:
                cache.evict(EvictParams(num_tokens=need))
                if alloc.available_size() < need:
                    continue
            lock = cache.lock(m.last_device_node)
            prefix_slots = cache.path_device_indices(m.last_device_node)[:matched]
            own = alloc.alloc(need) if need else torch.empty(0, dtype=torch.int64)
            if need:
                kv.get_key_buffer(0)[own] = torch.randn((need, 2, 4), generator=gen)
            row = torch.cat([prefix_slots.long(), own.long()])
            store.rebuild_from_keys(0, row, matched, len(toks))
            running[next_id], locks[next_id], keys[next_id] = own.long(), lock, (toks, row)
            next_id += 1
        elif op == "finish" and running:
            rid = sorted(running)[a % len(running)]
            toks, row = keys.pop(rid)
            res = cache.insert(InsertParams(key=RadixKey(toks), value=row.clone()))
            own_start = len(row) - len(running[rid])
            # Slots of ours the tree already had (inserted meanwhile by a twin request) are duplicates: free them.
            dup_end = max(own_start, res.prefix_len)
            if dup_end > own_start:
                alloc.free(row[own_start:dup_end])
            cache.unlock(locks.pop(rid))
            running.pop(rid)
        elif op == "evict":
            cache.evict(EvictParams(num_tokens=b * P))
        check_invariants(kv, alloc, cache, store, running)
    for rid in list(running):
        alloc.free(running.pop(rid))
        cache.unlock(locks.pop(rid))
    cache.evict(EvictParams(num_tokens=POOL))
    assert alloc.available_size() == POOL
    assert sum(1 for _ in cache.iter_nodes()) == 0


def test_split_keeps_page_tables_aligned():
    kv, alloc, cache, store = make()
    slots = alloc.alloc(4 * P).long()
    cache.insert(InsertParams(key=RadixKey(list(range(4 * P))), value=slots))
    # a second key sharing 2 pages splits the node at page 2
    more = alloc.alloc(P).long()
    cache.insert(InsertParams(key=RadixKey(list(range(2 * P)) + [99] * P), value=torch.cat([slots[: 2 * P], more])))
    (head,) = [n for n in cache.iter_nodes() if n.parent is cache.root_node]
    (tail,) = [n for n in cache.iter_nodes() if n.parent is head and int(n.value[0]) == int(slots[2 * P])]
    assert head.mux_pages.first_slot.tolist() == slots[: 2 * P : P].tolist()
    assert tail.mux_pages.first_slot.tolist() == slots[2 * P :: P].tolist()
    assert head.mux_pages.agrees_with(head.value, P) and tail.mux_pages.agrees_with(tail.value, P)


def test_subtract_ranges_worked_example():
    assert _subtract_ranges([(0, 10)], [(2, 4)]) == [(0, 2), (4, 10)]
    assert _subtract_ranges([(0, 8), (12, 20)], [(4, 16)]) == [(0, 4), (16, 20)]
    assert _subtract_ranges([(0, 4)], [(0, 4)]) == []
