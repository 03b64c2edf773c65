"""Tiers below the device: host DRAM and local disk, behind one TierManager.

A *page record* is the exact KV of one page for every layer: a tensor ``[num_layers, 2, P, H_kv, D]`` (K and V).
The device tier is SGLang's KV pool itself (owned by SGLang; the attention backend frees and refills its slots);
this module holds what left it. Each tier keeps the contract of ``tier_base.py`` (put / get / evict / size_info /
check_integrity).

``TierManager.demote(key, record)`` puts a page in the highest tier with room (host, then disk) and returns the
tier's name, or None when no tier can take it. Disk pages carry a CRC32 of their bytes; a mismatch on read is
detected, counted and raised, never silently used.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import torch

from sglang_mux.memory.tier_base import PageIntegrityError, SizeInfo, TierConfigError

__all__ = ["DiskTier", "HostTier", "PageIntegrityError", "SizeInfo", "TierConfigError", "TierManager",
           "record_nbytes", "shared_tier_manager"]

logger = logging.getLogger(__name__)

_MAGIC = b"MUXPAGE1"
_HEADER = struct.Struct("<8sIQ")  # magic, crc32 of payload, payload length


def record_nbytes(record: torch.Tensor) -> int:
    return record.numel() * record.element_size()


class HostTier:
    """DRAM (pinned on GPU machines, plain on CPU), bounded by ``capacity_bytes``."""

    name = "host"

    def __init__(self, capacity_bytes: int, pin: bool = False):
        self.capacity = capacity_bytes
        self.pin = pin
        self._pages: dict[object, torch.Tensor] = {}
        self._used = 0
        self._lock = threading.Lock()

    def put(self, key, record: torch.Tensor) -> bool:
        n = record_nbytes(record)
        with self._lock:
            if key in self._pages:
                return True
            if self._used + n > self.capacity:
                return False
            copy = record.detach().to("cpu", copy=True)
            if self.pin:
                copy = copy.pin_memory()
            self._pages[key] = copy
            self._used += n
        return True

    def get(self, key) -> torch.Tensor:
        with self._lock:
            rec = self._pages.get(key)
        if rec is None:
            raise PageIntegrityError(f"host tier has no page {key!r}")
        return rec

    def pop_oldest(self):
        """(key, record) of the page stored first, removed from this tier; None when empty."""
        with self._lock:
            if not self._pages:
                return None
            key = next(iter(self._pages))
            rec = self._pages.pop(key)
            self._used -= record_nbytes(rec)
            return key, rec

    def evict(self, key) -> None:
        with self._lock:
            rec = self._pages.pop(key, None)
            if rec is not None:
                self._used -= record_nbytes(rec)

    def size_info(self) -> SizeInfo:
        return SizeInfo(self.capacity, self._used, len(self._pages))

    def check_integrity(self) -> None:
        total = sum(record_nbytes(r) for r in self._pages.values())
        assert total == self._used, (total, self._used)
        assert self._used <= self.capacity


class DiskTier:
    """Files under ``path`` (one per page, CRC32-checked), bounded by ``capacity_bytes``."""

    name = "disk"

    def __init__(self, path: str, capacity_bytes: int):
        self.path = Path(path)
        self.capacity = capacity_bytes
        self._meta: dict[object, tuple[Path, tuple, torch.dtype, int]] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.write_failures = 0
        self.checksum_failures = 0
        self.stale_removed = self._remove_stale_pages()

    def _remove_stale_pages(self) -> int:
        """Page files left by a process that died (killed server): their keys meant nothing outside it, and
        counting them would make the capacity lie. Removed at start; returns how many."""
        n = 0
        if self.path.is_dir():
            for f in self.path.glob("page-*.kv"):
                try:
                    f.unlink()
                    n += 1
                except OSError:
                    pass
        if n:
            logger.info("disk tier: removed %d stale page files from %s", n, self.path)
        return n

    @staticmethod
    def check_startup(path: str, capacity_bytes: int) -> None:
        """One-line errors for a disk tier that cannot work: unwritable path, or less free space than asked."""
        p = Path(path)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".mux-write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise TierConfigError(f"--mux-disk-path: {path!r} is not writable ({e.strerror or e})") from None
        free = shutil.disk_usage(p).free
        if free < capacity_bytes:
            raise TierConfigError(
                f"--mux-disk-bytes: {capacity_bytes} bytes asked but only {free} free under {path!r}"
            )

    def _file(self, key) -> Path:
        return self.path / ("page-" + "-".join(str(k) for k in (key if isinstance(key, tuple) else (key,))) + ".kv")

    def put(self, key, record: torch.Tensor) -> bool:
        rec = record.detach().to("cpu").contiguous()
        payload = rec.reshape(-1).view(torch.uint8).numpy().tobytes()
        n = len(payload)
        with self._lock:
            if key in self._meta:
                return True
            if self._used + n > self.capacity:
                return False
            self._used += n
        f = self._file(key)
        try:
            with open(f, "wb") as fh:
                fh.write(_HEADER.pack(_MAGIC, zlib.crc32(payload), n))
                fh.write(payload)
        except OSError as e:
            with self._lock:
                self._used -= n
                self.write_failures += 1
            try:
                f.unlink()
            except OSError:
                pass
            logger.warning("disk tier: cannot write %s (%s); keeping the page in a higher tier", f, e)
            return False
        with self._lock:
            self._meta[key] = (f, tuple(rec.shape), rec.dtype, n)
        return True

    def get(self, key) -> torch.Tensor:
        with self._lock:
            meta = self._meta.get(key)
        if meta is None:
            raise PageIntegrityError(f"disk tier has no page {key!r}")
        f, shape, dtype, n = meta
        try:
            data = f.read_bytes()
        except OSError as e:
            self.checksum_failures += 1
            raise PageIntegrityError(f"disk page {f.name}: unreadable ({e})") from None
        hdr = data[: _HEADER.size]
        payload = data[_HEADER.size :]
        ok = len(hdr) == _HEADER.size
        if ok:
            magic, crc, length = _HEADER.unpack(hdr)
            ok = magic == _MAGIC and length == n == len(payload) and zlib.crc32(payload) == crc
        if not ok:
            self.checksum_failures += 1
            logger.error("disk tier: checksum mismatch in %s; the page is not used", f)
            raise PageIntegrityError(f"disk page {f.name}: checksum mismatch")
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).view(shape).clone()

    def evict(self, key) -> None:
        with self._lock:
            meta = self._meta.pop(key, None)
            if meta is not None:
                self._used -= meta[3]
        if meta is not None:
            try:
                meta[0].unlink()
            except OSError:
                pass

    def size_info(self) -> SizeInfo:
        return SizeInfo(self.capacity, self._used, len(self._meta))

    def check_integrity(self) -> None:
        total = sum(m[3] for m in self._meta.values())
        assert total == self._used, (total, self._used)
        assert self._used <= self.capacity


class TierManager:
    """Host, then disk: where a page that leaves the device goes, and where it is read back from."""

    def __init__(self, host_bytes: int, disk_path: str = "", disk_bytes: int = 0, pin: bool = False, remote=None):
        self.host = HostTier(host_bytes, pin=pin) if host_bytes > 0 else None
        self.disk = DiskTier(disk_path, disk_bytes) if disk_path and disk_bytes > 0 else None
        self.remote = remote  # a RemoteTier (SGLang HiCache storage backend), reclaimable pages only
        self._where: dict[object, str] = {}
        # Pages kept only to serve future prefix hits (evicted/finished radix-tree pages), oldest first: they
        # make room for pages of running requests, whose exact copies are needed.
        self._reclaimable: dict[object, None] = {}

    @property
    def takes_running_pages(self) -> bool:
        """Host or disk exists: a running request's only copy of a page may leave the device."""
        return self.host is not None or self.disk is not None

    def tiers(self):
        return [t for t in (self.host, self.disk, self.remote) if t is not None]

    def demote(self, key, record: torch.Tensor, reclaimable: bool = False) -> str | None:
        """Store the page in the highest tier with room; host pages spill to disk to make room, and reclaimable
        pages (prefix-cache copies) are forgotten, oldest first, to make room for others. None: no room."""
        while True:
            where = self._place(key, record)
            if where is None and reclaimable and self.remote is not None and self.remote.put(key, record):
                self._where[key] = where = "remote"
            if where is not None:
                if reclaimable:
                    self._reclaimable[key] = None
                return where
            if reclaimable or not self._reclaimable:
                return None
            self.evict(next(iter(self._reclaimable)))

    def _place(self, key, record: torch.Tensor) -> str | None:
        if self.host is not None:
            if self.host.put(key, record):
                self._where[key] = "host"
                return "host"
            # make room on host by moving its oldest pages down, if the disk takes them
            while self.disk is not None:
                old = self.host.pop_oldest()
                if old is None:
                    break
                okey, orec = old
                if not self.disk.put(okey, orec):
                    self.host.put(okey, orec)  # disk full: it stays on host
                    break
                self._where[okey] = "disk"
                if self.host.put(key, record):
                    self._where[key] = "host"
                    return "host"
        if self.disk is not None and self.disk.put(key, record):
            self._where[key] = "disk"
            return "disk"
        return None

    def get(self, key) -> torch.Tensor:
        tier = self._where.get(key)
        if tier is None:
            raise PageIntegrityError(f"no tier holds page {key!r}")
        return self._tier(tier).get(key)

    def _tier(self, name: str):
        return {"host": self.host, "disk": self.disk, "remote": self.remote}[name]

    def tier_of(self, key) -> str | None:
        return self._where.get(key)

    def rename(self, old, new, reclaimable: bool = True) -> bool:
        """Re-key a stored page (a request's page adopted by the prefix cache); False if ``old`` is not stored."""
        tier = self._where.get(old)
        if tier is None or new in self._where:
            return False
        rec = self.get(old)
        self.evict(old)
        return self.demote(new, rec, reclaimable=reclaimable) is not None

    def evict(self, key) -> None:
        self._reclaimable.pop(key, None)
        tier = self._where.pop(key, None)
        if tier is not None:
            self._tier(tier).evict(key)

    def bytes_by_tier(self) -> dict[str, int]:
        return {t.name: t.size_info().used_bytes for t in self.tiers()}

    def check_integrity(self) -> None:
        for t in self.tiers():
            t.check_integrity()
        counts = {t.name: t.size_info().pages for t in self.tiers()}
        for name, n in counts.items():
            assert sum(1 for v in self._where.values() if v == name) == n, (name, n)


_SHARED: dict[tuple, TierManager] = {}


def shared_tier_manager(cfg) -> TierManager | None:
    """The process's TierManager for this config (the attention backend and the cache share it); None if untiered."""
    if not cfg.tiered:
        return None
    key = (cfg.host_bytes, cfg.disk_path, cfg.disk_bytes, cfg.remote_backend, cfg.remote_path, cfg.remote_bytes)
    if key not in _SHARED:
        if cfg.disk_path:
            os.makedirs(cfg.disk_path, exist_ok=True)
        remote = None
        if cfg.remote_backend:
            from sglang_mux.memory.remote_tier import RemoteTier

            remote = RemoteTier.from_hicache(cfg.remote_backend, cfg.remote_path, cfg.remote_bytes)
        _SHARED[key] = TierManager(
            cfg.host_bytes, cfg.disk_path, cfg.disk_bytes, pin=torch.cuda.is_available(), remote=remote
        )
    return _SHARED[key]
