"""Tiers below the device: host DRAM and local disk, behind one TierManager.

A *page record* is the exact KV of one page for every layer: a tensor ``[num_layers, 2, P, H_kv, D]`` (K and V).
The device tier is SGLang's KV pool itself (owned by SGLang; the attention backend frees and refills its slots);
this module holds what left it. Each tier keeps the contract of ``tier_base.py`` (put / get / evict / size_info /
check_integrity).

``TierManager.demote(key, record)`` puts a page in the highest tier with room (host, then disk) and returns the
tier's name, or None when no tier can take it. Disk pages carry a CRC32 of their bytes; a mismatch on read is
detected, counted and raised, never silently used.

Disk folder layout (several servers may share one ``--mux-disk-path``)::

    owner-<id>.lock         one per live DiskTier, flock()ed for its whole life (the OS drops the lock when the
                            process dies, even on kill -9); <id> = <pid>.<random hex>
    page-<id>-<key>.kv      that owner's pages (header: magic, CRC32, length; then the record's bytes)

At start a DiskTier removes the page files (and lock files) of every owner whose lock it can take (a dead
process), and page files that name no live owner; a live owner's files are never touched. A write that fails
(ENOSPC, EIO, a vanished folder) is counted (``disk_write_failures``) and the page stays in the tier above or
on the device; writes then pause for ``WRITE_RETRY_S`` so a full disk is not retried every step.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import torch

from sglang_mux.memory.tier_base import PageIntegrityError, SizeInfo, TierConfigError, TierIntegrityError
from sglang_mux.metrics import STATS

__all__ = ["DiskTier", "HostTier", "PageIntegrityError", "SizeInfo", "TierConfigError", "TierIntegrityError",
           "TierManager", "record_nbytes", "shared_tier_manager"]

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

    def nbytes_of(self, key) -> int:
        with self._lock:
            rec = self._pages.get(key)
        return 0 if rec is None else record_nbytes(rec)

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
        with self._lock:
            total = sum(record_nbytes(r) for r in self._pages.values())
            used = self._used
        if total != used:
            raise TierIntegrityError(f"host tier: used bytes {used} != {total}, the sum of its {len(self._pages)} pages")
        if used > self.capacity:
            raise TierIntegrityError(f"host tier: used bytes {used} > capacity {self.capacity}")


class DiskTier:
    """Files under ``path`` (one per page, CRC32-checked), bounded by ``capacity_bytes``; see the module docstring
    for the folder layout shared by several servers."""

    name = "disk"
    WRITE_RETRY_S = 1.0  # after a failed write, further writes are refused (page kept above) for this long
    READERS = 4  # threads reading the files of one get_many (a chunk's pages) concurrently

    def __init__(self, path: str, capacity_bytes: int):
        self.path = Path(path)
        self.capacity = capacity_bytes
        self._meta: dict[object, tuple[Path, tuple, torch.dtype, int]] = {}
        self._used = 0
        self._lock = threading.Lock()
        self.write_failures = 0
        self.checksum_failures = 0
        self._write_paused_until = 0.0
        self._readers = None  # created by the first get_many
        self.owner = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._owner_fd = self._claim_owner()
        self.stale_removed = self._remove_stale_pages()

    # ------------------------------------------------------------------ ownership of the folder's files
    def _lock_file(self, owner: str) -> Path:
        return self.path / f"owner-{owner}.lock"

    def _claim_owner(self) -> int | None:
        """Create and lock ``owner-<id>.lock`` (locked under a temporary name, then renamed, so no other server
        ever sees it unlocked). None when the folder is not usable now (its writes will fail and be counted)."""
        tmp = self.path / f".owner-{self.owner}.lock.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            logger.warning("disk tier: cannot create an owner lock in %s (%s)", self.path, e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, self._lock_file(self.owner))
        except OSError as e:
            os.close(fd)
            logger.warning("disk tier: cannot lock an owner file in %s (%s)", self.path, e)
            return None
        return fd

    @staticmethod
    def _owner_of(page_file: Path) -> str:
        """``page-<owner>-<key>.kv`` -> ``<owner>`` ('' for a name without one)."""
        rest = page_file.name[len("page-"):]
        return rest.split("-", 1)[0] if "." in rest.split("-", 1)[0] else ""

    def _try_lock(self, lock_file: Path) -> int | None:
        """An fd holding ``lock_file``'s lock if its owner is dead (lock free); None if a live process holds it
        or the file is gone."""
        try:
            fd = os.open(lock_file, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def _owner_alive(self, owner: str) -> bool:
        if owner == self.owner:
            return True
        lock_file = self._lock_file(owner)
        if not owner or not lock_file.exists():
            return False
        fd = self._try_lock(lock_file)
        if fd is None:
            return lock_file.exists()  # held by a live process (or removed by another cleaner meanwhile)
        os.close(fd)
        return False

    def _remove_stale_pages(self) -> int:
        """Page files left by processes that died (a killed server): their keys meant nothing outside that
        process, and counting them would make the capacity lie. Removed at start: the files of every owner whose
        lock is free, and page files naming no owner (an older layout); files of live owners stay. Returns how
        many page files were removed."""
        if not self.path.is_dir():
            return 0
        n = 0
        dead_locks = []
        for lock_file in self.path.glob("owner-*.lock"):
            owner = lock_file.name[len("owner-"):-len(".lock")]
            if owner == self.owner:
                continue
            fd = self._try_lock(lock_file)
            if fd is not None:
                dead_locks.append((lock_file, fd))
        dead = {lf.name[len("owner-"):-len(".lock")] for lf, _ in dead_locks}
        alive: dict[str, bool] = {}
        for f in self.path.glob("page-*.kv"):
            owner = self._owner_of(f)
            if owner not in alive:
                alive[owner] = owner not in dead and self._owner_alive(owner)
            if alive[owner]:
                continue
            try:
                f.unlink()
                n += 1
            except OSError:
                pass
        for lock_file, fd in dead_locks:
            try:
                lock_file.unlink()
            except OSError:
                pass
            os.close(fd)
        for tmp in self.path.glob(".owner-*.lock.tmp"):  # a start that died before renaming its lock
            fd = self._try_lock(tmp)
            if fd is not None:
                try:
                    tmp.unlink()
                except OSError:
                    pass
                os.close(fd)
        if n:
            logger.info("disk tier: removed %d page files of dead servers from %s", n, self.path)
            STATS.disk_stale_files_removed += n
        return n

    def close(self) -> None:
        """Forget every page, remove this owner's files and release its lock (a clean shutdown)."""
        with self._lock:
            files = [m[0] for m in self._meta.values()]
            self._meta.clear()
            self._used = 0
        for f in files:
            try:
                f.unlink()
            except OSError:
                pass
        if self._owner_fd is not None:
            try:
                self._lock_file(self.owner).unlink()
            except OSError:
                pass
            os.close(self._owner_fd)
            self._owner_fd = None

    def __del__(self):
        # An unreachable tier's pages mean nothing: release its lock (the next start removes its files).
        fd = getattr(self, "_owner_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

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
        parts = key if isinstance(key, tuple) else (key,)
        return self.path / ("page-" + "-".join([self.owner, *(str(k) for k in parts)]) + ".kv")

    @staticmethod
    def _write_file(f: Path, header: bytes, payload: bytes) -> None:
        """The one place a page file is written (faults are injected here in tests)."""
        with open(f, "wb") as fh:
            fh.write(header)
            fh.write(payload)

    def put(self, key, record: torch.Tensor) -> bool:
        rec = record.detach().to("cpu").contiguous()
        payload = rec.reshape(-1).view(torch.uint8).numpy().tobytes()
        n = len(payload)
        with self._lock:
            if key in self._meta:
                return True
            if self._used + n > self.capacity or time.monotonic() < self._write_paused_until:
                return False
            self._used += n
        f = self._file(key)
        try:
            self._write_file(f, _HEADER.pack(_MAGIC, zlib.crc32(payload), n), payload)
        except OSError as e:
            with self._lock:
                self._used -= n
                self.write_failures += 1
                self._write_paused_until = time.monotonic() + self.WRITE_RETRY_S
            STATS.disk_write_failures += 1
            try:
                f.unlink()
            except OSError:
                pass
            full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            logger.warning("disk tier: cannot write %s (%s)%s; keeping the page in a higher tier, no disk writes "
                           "for %.0f s", f, e, full, self.WRITE_RETRY_S)
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

    def get_many(self, keys: list) -> list[torch.Tensor]:
        """``get`` of several pages, their files read concurrently (a few reader threads)."""
        if self._readers is None:
            from concurrent.futures import ThreadPoolExecutor

            self._readers = ThreadPoolExecutor(max_workers=self.READERS, thread_name_prefix="mux-disk-read")
        return list(self._readers.map(self.get, keys))

    def nbytes_of(self, key) -> int:
        with self._lock:
            meta = self._meta.get(key)
        return 0 if meta is None else meta[3]

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

    def check_integrity(self, files: bool = False) -> None:
        """Used bytes == the sum of the stored pages, within capacity; with ``files``, also exactly one page file
        of this owner per stored page (none left behind, none missing)."""
        with self._lock:
            total = sum(m[3] for m in self._meta.values())
            used = self._used
            want = {m[0].name for m in self._meta.values()}
        if total != used:
            raise TierIntegrityError(f"disk tier: used bytes {used} != {total}, the sum of its {len(want)} pages")
        if used > self.capacity:
            raise TierIntegrityError(f"disk tier: used bytes {used} > capacity {self.capacity}")
        if files:
            have = {f.name for f in self.path.glob(f"page-{self.owner}-*.kv")} if self.path.is_dir() else set()
            if have != want:
                extra, missing = sorted(have - want), sorted(want - have)
                raise TierIntegrityError(
                    f"disk tier {self.path}: page files do not match the stored pages: "
                    f"{len(extra)} left behind {extra[:3]}, {len(missing)} missing {missing[:3]}"
                )


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
        # Bytes per tier of running requests' pages (not reclaimable): 0 in every tier once no request runs.
        # The process's shared manager publishes this dict as /mux/stats ``tier_request_bytes``.
        self.request_bytes: dict[str, int] = {t.name: 0 for t in self.tiers() if t is not self.remote}

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
                else:
                    self.request_bytes[where] += record_nbytes(record)
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
                if okey not in self._reclaimable:
                    self.request_bytes["host"] -= record_nbytes(orec)
                    self.request_bytes["disk"] += record_nbytes(orec)
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

    def get_many(self, keys: list) -> list[torch.Tensor]:
        """Several pages in one request (a chunk's pages): the disk pages read concurrently, the others in order.
        Raises PageIntegrityError like ``get`` if any of them is missing or corrupt."""
        where = [self._where.get(k) for k in keys]
        for k, t in zip(keys, where):
            if t is None:
                raise PageIntegrityError(f"no tier holds page {k!r}")
        out: list = [None] * len(keys)
        disk = [i for i, t in enumerate(where) if t == "disk"]
        if len(disk) > 1:
            for i, rec in zip(disk, self.disk.get_many([keys[i] for i in disk])):
                out[i] = rec
        for i, (k, t) in enumerate(zip(keys, where)):
            if out[i] is None:
                out[i] = self._tier(t).get(k)
        return out

    def _tier(self, name: str):
        return {"host": self.host, "disk": self.disk, "remote": self.remote}[name]

    def tier_of(self, key) -> str | None:
        return self._where.get(key)

    def rename(self, old, new, reclaimable: bool = True) -> bool:
        """Re-key a stored page (a request's page adopted by the prefix cache); False if ``old`` is not stored.
        When ``new`` is already stored (the same prefix page, kept by an earlier request), ``old`` is dropped: it
        would otherwise stay in its tier owned by no one."""
        tier = self._where.get(old)
        if tier is None:
            return False
        if new in self._where:
            self.evict(old)
            return True
        try:
            rec = self.get(old)
        except PageIntegrityError:  # a bad copy must not become a prefix page (nor stop the request's release)
            self.evict(old)
            return False
        self.evict(old)
        return self.demote(new, rec, reclaimable=reclaimable) is not None

    def evict(self, key) -> None:
        was_reclaimable = self._reclaimable.pop(key, 0) is None
        tier = self._where.pop(key, None)
        if tier is not None:
            t = self._tier(tier)
            if not was_reclaimable and tier in self.request_bytes:
                self.request_bytes[tier] -= t.nbytes_of(key)
            t.evict(key)

    def drop_prefix_copies(self) -> int:
        """Forget every reclaimable prefix-cache copy in host and disk (``/flush_cache``); running requests' pages
        and the remote store (which other servers may share) are kept. Returns how many were dropped."""
        keys = [k for k in self._reclaimable if self._where.get(k) in ("host", "disk")]
        for k in keys:
            self.evict(k)
        return len(keys)

    def bytes_by_tier(self) -> dict[str, int]:
        return {t.name: t.size_info().used_bytes for t in self.tiers()}

    def prefix_bytes_by_tier(self) -> dict[str, int]:
        """Bytes per tier of the reclaimable prefix-cache copies (the rest of ``bytes_by_tier`` belongs to running
        requests' demoted pages)."""
        out = {t.name: 0 for t in self.tiers()}
        for key in self._reclaimable:
            tier = self._where.get(key)
            if tier in ("host", "disk"):
                out[tier] += self._tier(tier).nbytes_of(key)
        if self.remote is not None:  # it only ever holds reclaimable copies
            out[self.remote.name] = self.remote.size_info().used_bytes
        return out

    def check_integrity(self, files: bool = False) -> None:
        """Each tier's bytes equal the sum of its pages; the index (``tier_of``) names exactly the pages each tier
        holds; reclaimable pages are indexed. Raises TierIntegrityError naming what is off."""
        for t in self.tiers():
            if isinstance(t, DiskTier):
                t.check_integrity(files=files)
            else:
                t.check_integrity()
        for t in self.tiers():
            n = t.size_info().pages
            indexed = sum(1 for v in self._where.values() if v == t.name)
            if indexed != n:
                raise TierIntegrityError(f"{t.name} tier holds {n} pages but the index places {indexed} there")
        lost = [k for k in self._reclaimable if k not in self._where]
        if lost:
            raise TierIntegrityError(f"{len(lost)} reclaimable pages are not in any tier, e.g. {lost[0]!r}")
        prefix = self.prefix_bytes_by_tier()
        want = {name: self._tier(name).size_info().used_bytes - prefix[name] for name in self.request_bytes}
        if want != self.request_bytes:
            raise TierIntegrityError(f"request bytes by tier {self.request_bytes} != {want}, the bytes of the "
                                     f"running requests' pages")


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
        STATS.tier_request_bytes = _SHARED[key].request_bytes  # the live dict: /mux/stats reads it as it is
    return _SHARED[key]
