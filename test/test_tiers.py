"""Host and disk tiers as units: exact round trips, capacity bounds, spill order, checksums, startup checks."""

from __future__ import annotations

import os

import pytest
import torch

from sglang_mux.config import MuxConfig, MuxConfigError, split_mux_args
from sglang_mux.launch_server import build_sglang_argv
from sglang_mux.memory.tiers import DiskTier, HostTier, PageIntegrityError, TierConfigError, TierManager


def rec(seed, dtype=torch.float32):
    return torch.randn((2, 2, 4, 2, 8), generator=torch.Generator().manual_seed(seed)).to(dtype)


NB = rec(0).numel() * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disk_round_trip_is_exact(tmp_path, dtype):
    d = DiskTier(str(tmp_path), 10 * NB)
    r = rec(1, dtype)
    assert d.put(("a", 3), r)
    got = d.get(("a", 3))
    assert got.dtype == dtype and torch.equal(got, r)
    d.check_integrity()


def test_corrupted_disk_page_is_detected_not_used(tmp_path):
    d = DiskTier(str(tmp_path), 10 * NB)
    d.put(("r", 1), rec(2))
    (f,) = list(tmp_path.glob("*.kv"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PageIntegrityError, match="checksum"):
        d.get(("r", 1))
    assert d.checksum_failures == 1
    f.write_bytes(bytes(data[:20]))  # truncated
    with pytest.raises(PageIntegrityError):
        d.get(("r", 1))


def test_capacity_is_a_hard_bound_and_conserved():
    h = HostTier(2 * NB)
    assert h.put(1, rec(1)) and h.put(2, rec(2))
    assert not h.put(3, rec(3))
    assert h.size_info().used_bytes == 2 * NB and h.size_info().free_bytes == 0
    h.evict(1)
    assert h.put(3, rec(3))
    h.check_integrity()


def test_manager_spills_oldest_host_pages_to_disk_then_refuses(tmp_path):
    m = TierManager(host_bytes=2 * NB, disk_path=str(tmp_path), disk_bytes=2 * NB)
    assert [m.demote(i, rec(i)) for i in range(4)] == ["host", "host", "host", "host"]
    assert m.tier_of(0) == "disk" and m.tier_of(1) == "disk" and m.tier_of(3) == "host"
    assert m.demote(9, rec(9)) is None  # host and disk full: the caller keeps the page on the device
    for i in range(4):
        assert torch.equal(m.get(i), rec(i))
    assert m.bytes_by_tier() == {"host": 2 * NB, "disk": 2 * NB}
    m.check_integrity()
    for i in range(4):
        m.evict(i)
    assert m.bytes_by_tier() == {"host": 0, "disk": 0} and not list(tmp_path.glob("*.kv"))


def test_disk_write_failure_keeps_page_in_higher_tier(tmp_path):
    m = TierManager(host_bytes=NB, disk_path=str(tmp_path / "gone"), disk_bytes=10 * NB)
    assert m.demote(0, rec(0)) == "host"
    # the disk directory disappears while serving: writes fail, pages stay where they were
    assert m.demote(1, rec(1)) is None
    assert m.tier_of(0) == "host" and torch.equal(m.get(0), rec(0))
    assert m.disk.write_failures >= 1


def test_startup_rejects_unwritable_or_too_small_disk(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TierConfigError, match="--mux-disk-path: .* is not writable"):
        DiskTier.check_startup(str(blocker / "sub"), 1024)
    with pytest.raises(TierConfigError, match="--mux-disk-bytes"):
        DiskTier.check_startup(str(tmp_path), 1 << 62)
    with pytest.raises(MuxConfigError, match="not writable"):
        build_sglang_argv(["--mux-disk-path", str(blocker / "sub"), "--mux-disk-bytes", "1024"], env={})


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--mux-disk-path", "/tmp/x"], "give both"),
        (["--mux-disk-bytes", "100"], "give both"),
        (["--mux-host-bytes", "-1"], "--mux-host-bytes"),
        (["--mux-missing-page", "maybe"], "allowed: wait, skip"),
        (["--mux-host-bytes", "1000", "--mux-drop-cold"], "cannot be combined"),
    ],
)
def test_tier_flags_validated(argv, needle):
    with pytest.raises(MuxConfigError, match=needle):
        split_mux_args(argv)


def test_tiered_property():
    assert not MuxConfig().tiered and MuxConfig(host_bytes=1).tiered
    assert MuxConfig(budget=512, page_size=16).staging == 32


def test_evicted_tree_pages_are_matched_from_host_and_loaded_back_exactly():
    from cpu_pools import mux_radix_cache
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sglang_mux.memory.page_summaries import PageSummaryStore

    P, size = 4, 256
    kv, alloc, cache = mux_radix_cache(size, P, head_dim=8, layer_num=2)
    cache.tiers = TierManager(host_bytes=1 << 20)
    toks = list(range(100, 100 + 6 * P))
    slots = alloc.alloc(6 * P).long()
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        kv.get_key_buffer(layer)[slots] = torch.randn(6 * P, 2, 8, generator=g)
        kv.get_value_buffer(layer)[slots] = torch.randn(6 * P, 2, 8, generator=g)
    want_k = [kv.get_key_buffer(layer)[slots].clone() for layer in range(2)]
    want_v = [kv.get_value_buffer(layer)[slots].clone() for layer in range(2)]
    cache.insert(InsertParams(key=RadixKey(toks), value=slots))
    cache.evict(EvictParams(num_tokens=6 * P))
    assert alloc.available_size() == size and sum(1 for _ in cache.iter_nodes()) == 0
    assert cache.tiers.bytes_by_tier()["host"] > 0
    # overwrite the freed device pages, as other requests would
    for layer in range(2):
        kv.get_key_buffer(layer)[:] = 0
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(toks + [7, 7])))
    assert m.device_prefix_len == 6 * P and cache.loaded_back_pages == 6
    got = cache.path_device_indices(m.last_device_node).long()
    for layer in range(2):
        assert torch.equal(kv.get_key_buffer(layer)[got], want_k[layer])
        assert torch.equal(kv.get_value_buffer(layer)[got], want_v[layer])
    store = PageSummaryStore.for_pool(kv, P)
    kmin, kmax = store.get(1, got[::P])
    assert torch.equal(kmin, want_k[1].view(6, P, 2, 8).amin(1)) and torch.equal(kmax, want_k[1].view(6, P, 2, 8).amax(1))
    # an unrelated prefix matches nothing
    m2 = cache.match_prefix(MatchPrefixParams(key=RadixKey(list(range(500, 500 + 2 * P)))))
    assert m2.device_prefix_len == 0
    # /flush_cache (reset): the tree and the prefix copies below it are gone; a running request's page stays
    cache.tiers.demote(("req", 1), torch.zeros(2, 2, P, 2, 8))
    cache.evict(EvictParams(num_tokens=6 * P))  # the loaded-back pages go down again
    assert len(cache.tiers.prefix_bytes_by_tier()) and cache.tiers.prefix_bytes_by_tier()["host"] > 0
    cache.reset()
    assert cache.tiers.prefix_bytes_by_tier()["host"] == 0 and cache.tiers.tier_of(("req", 1)) == "host"
    assert cache.prefix_pages == 0
    m3 = cache.match_prefix(MatchPrefixParams(key=RadixKey(toks + [7, 7])))
    assert m3.device_prefix_len == 0


def test_remote_tier_over_sglang_hicache_file_backend(tmp_path):
    from sglang_mux.memory.remote_tier import RemoteTier

    remote = RemoteTier.from_hicache("file", str(tmp_path / "store"), 10 * NB)
    m = TierManager(host_bytes=NB, remote=remote)
    assert m.demote(("prefix", 1), rec(1), reclaimable=True) == "host"
    assert m.demote(("prefix", 2), rec(2), reclaimable=True) == "remote"  # host full: the store takes the copy
    assert m.demote(("req", 3), rec(3)) is None or m.tier_of(("req", 3)) != "remote"  # never a running page
    assert torch.equal(m.get(("prefix", 2)), rec(2))
    (f,) = [p for p in (tmp_path / "store").iterdir() if p.suffix == ".bin"]
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PageIntegrityError, match="checksum"):
        m.get(("prefix", 2))
    with pytest.raises(TierConfigError, match="--mux-remote-backend"):
        RemoteTier.from_hicache("bogus", "", 1)


def test_prefix_hashes_are_stable_and_chained():
    from sglang_mux.memory.prefix_tiers import page_hashes

    a = page_hashes(list(range(12)), None, 4)
    assert a == page_hashes(list(range(12)), None, 4) and len(a) == 3
    b = page_hashes([99] + list(range(1, 12)), None, 4)
    assert a[0] != b[0] and a[1] != b[1]  # a change in page 0 changes every later key
    assert page_hashes(list(range(12)), ("lora", None), 4)[0] != a[0]


def test_disk_tier_after_a_killed_server_starts_clean(tmp_path):
    d = DiskTier(str(tmp_path), 10 * NB)
    d.put(("old", 1), rec(1))
    d.put(("old", 2), rec(2))
    # while d's owner lives, a second server on the same directory leaves its pages alone
    assert DiskTier(str(tmp_path), 10 * NB).stale_removed == 0 and len(list(tmp_path.glob("page-*.kv"))) == 2
    # the process dies here (no evict): the OS drops its lock (test/test_faults.py does it with kill -9)
    os.close(d._owner_fd)
    d._owner_fd = None
    d2 = DiskTier(str(tmp_path), 10 * NB)
    assert d2.stale_removed == 2 and not list(tmp_path.glob("page-*.kv"))
    assert d2.size_info().used_bytes == 0 and d2.put(("new", 1), rec(3))
    assert torch.equal(d2.get(("new", 1)), rec(3))
