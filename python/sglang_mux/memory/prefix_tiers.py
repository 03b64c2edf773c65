"""PrefixTierIndex: radix-tree pages that left the device stay matchable from the host/disk tiers.

When the tree evicts a node from the device, or a tiered request finishes with pages already off the device,
those pages are kept in the lower tiers under a key that names their whole token prefix:

    h_0 = xxh64(namespace)                   namespace: the RadixKey's extra key and cache salt
    h_j = xxh64(h_{j-1} || tokens of page j)  page j of the prefix, P tokens (int64 little endian)
(a stable hash, so keys mean the same in every process that shares a remote store)

A later match that stops on the device continues here page by page (h_m, h_{m+1}, ... while present); those pages
are loaded back into freshly allocated device slots, their summaries rebuilt, and inserted into the tree like any
node (HiCache's idea, per page). These copies are *reclaimable*: the TierManager forgets the oldest of them when
a running request needs room.
"""

from __future__ import annotations

from collections.abc import Sequence


def page_hashes(tokens: Sequence[int], namespace, page_size: int, upto_pages: int | None = None) -> list[int]:
    """``[h_1 .. h_n]``: the chained hash after each full page of ``tokens``."""
    import numpy as np
    import xxhash

    n = len(tokens) // page_size if upto_pages is None else min(upto_pages, len(tokens) // page_size)
    arr = np.asarray(tokens[: n * page_size], dtype="<i8")
    out, h = [], xxhash.xxh64(repr(("mux-prefix", namespace)).encode()).intdigest()
    for j in range(n):
        h = xxhash.xxh64(h.to_bytes(8, "little") + arr[j * page_size : (j + 1) * page_size].tobytes()).intdigest()
        out.append(h)
    return out


def namespace_of(radix_key) -> tuple:
    return (getattr(radix_key, "extra_key", None), getattr(radix_key, "cache_salt", None))


def tier_key(h: int) -> tuple:
    return ("prefix", h)
