"""RemoteTier: the lowest tier, a distributed store reached through SGLang's HiCache storage backends.

We do not build a store: any ``HiCacheStorage`` of SGLang 0.5.23 (its file backend, Mooncake Store, 3FS, ...)
holds the bytes. The store may evict on its own (it is a cache), so only *reclaimable* pages go here: copies of
radix-tree prefix pages, whose loss costs a recompute, never the only copy of a running request's page.
Each page is stored as raw bytes under a stable key; shape, dtype and a CRC32 stay with us and are checked on read.
"""

from __future__ import annotations

import threading
import zlib

import torch

from sglang_mux.memory.tier_base import PageIntegrityError, SizeInfo, TierConfigError

BACKENDS = ("file", "mooncake", "hf3fs", "nixl")


def _store_key(key) -> str:
    import xxhash

    return "mux-" + xxhash.xxh64(repr(key).encode()).hexdigest()


class RemoteTier:
    name = "remote"

    def __init__(self, storage, capacity_bytes: int):
        self.storage = storage
        self.capacity = capacity_bytes
        self._meta: dict[object, tuple[str, tuple, torch.dtype, int, int]] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.checksum_failures = 0

    @classmethod
    def from_hicache(cls, backend: str, path: str, capacity_bytes: int) -> "RemoteTier":
        """A tier over one of SGLang's HiCache storage backends (``file`` needs only a directory)."""
        if backend not in BACKENDS:
            raise TierConfigError(f"--mux-remote-backend: allowed: {', '.join(BACKENDS)}; got {backend!r}")
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

        cfg = HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
            enable_storage_metrics=False, is_page_first_layout=True, model_name="sglang-mux",
            extra_config={"file_storage_path": path} if path else None,
        )
        if backend == "file":
            from sglang.srt.mem_cache.hicache_storage import HiCacheFile

            return cls(HiCacheFile(cfg, file_path=path or "/tmp/sglang-mux-remote"), capacity_bytes)
        from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

        try:
            storage = StorageBackendFactory.create_backend(backend, cfg, None)
        except Exception as e:  # the store's own client is missing or cannot connect
            raise TierConfigError(f"--mux-remote-backend: {backend!r} is not usable here ({e})") from None
        return cls(storage, capacity_bytes)

    def put(self, key, record: torch.Tensor) -> bool:
        data = record.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        n = data.numel()
        with self._lock:
            if key in self._meta:
                return True
            if self._used + n > self.capacity:
                return False
            self._used += n
        skey = _store_key(key)
        ok = False
        try:
            ok = bool(self.storage.set(skey, data))
        except Exception:
            ok = False
        with self._lock:
            if not ok:
                self._used -= n
                return False
            self._meta[key] = (skey, tuple(record.shape), record.dtype, n, zlib.crc32(data.numpy().tobytes()))
        return True

    def get(self, key) -> torch.Tensor:
        with self._lock:
            meta = self._meta.get(key)
        if meta is None:
            raise PageIntegrityError(f"remote tier has no page {key!r}")
        skey, shape, dtype, n, crc = meta
        buf = torch.empty(n, dtype=torch.uint8)
        got = self.storage.get(skey, buf)
        if got is None:
            raise PageIntegrityError(f"remote page {skey}: gone from the store")
        if zlib.crc32(buf.numpy().tobytes()) != crc:
            self.checksum_failures += 1
            raise PageIntegrityError(f"remote page {skey}: checksum mismatch")
        return buf.view(dtype).view(shape).clone()

    def evict(self, key) -> None:
        # The store keeps its own LRU; we only forget the page (it is never read through us again).
        with self._lock:
            meta = self._meta.pop(key, None)
            if meta is not None:
                self._used -= meta[3]

    def size_info(self) -> SizeInfo:
        return SizeInfo(self.capacity, self._used, len(self._meta))

    def check_integrity(self) -> None:
        assert sum(m[3] for m in self._meta.values()) == self._used
        assert self._used <= self.capacity
