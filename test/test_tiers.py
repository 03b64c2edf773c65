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
