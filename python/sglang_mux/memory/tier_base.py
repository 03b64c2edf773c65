"""What every tier shares: the tier contract, its size report and its errors.

A *page record* is the exact KV of one page for every layer: a tensor ``[num_layers, 2, P, H_kv, D]`` (K and V).

    Tier contract (each tier owns its bytes, nothing else reaches into them):
      put(key, record) -> bool      store a copy; False when it does not fit (caller keeps the page elsewhere)
      get(key) -> tensor            the exact record; raises PageIntegrityError if it cannot be trusted
      evict(key)                    forget it (idempotent)
      size_info() -> SizeInfo       used + free == capacity
      check_integrity()             conservation: used bytes == sum of the records' bytes (raises
                                    TierIntegrityError naming what is off)

Host and disk tiers live in ``tiers.py``, the remote tier in ``remote_tier.py``; both import this module and
nothing here imports them.
"""

from __future__ import annotations

from dataclasses import dataclass


class PageIntegrityError(RuntimeError):
    """A page read from a tier does not match what was written (checksum mismatch, short read, missing file)."""


class TierIntegrityError(RuntimeError):
    """A tier's bookkeeping disagrees with what it stores (bytes, index, files): a bug, never a client error."""


class TierConfigError(ValueError):
    """A bad tier setting at startup (one line, naming the flag)."""


@dataclass(frozen=True)
class SizeInfo:
    capacity_bytes: int
    used_bytes: int
    pages: int

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes
