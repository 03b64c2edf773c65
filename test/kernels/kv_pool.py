"""Small SGLang-shaped KV pools for the kernel tests: req_to_token, k/v buffers and routed selections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HQ, HKV, D = 8, 2, 16  # the small head shapes the CPU kernel tests share
SCALE = 1.0 / math.sqrt(D)


@dataclass
class KVPool:
    k_buffer: torch.Tensor  # [num_slots, H_kv, D]
    v_buffer: torch.Tensor
    req_to_token: torch.Tensor  # int32 [num_reqs, max_ctx]
    req_pool_indices: torch.Tensor  # int64 [B]
    seq_lens: torch.Tensor  # int32 [B]
    page_size: int

    def reference(self, q, page_list, page_counts, scale, *, k=None, v=None) -> torch.Tensor:
        """The float64 routed decode (``mux_kernels.reference.routed_decode``) over this pool, or over ``k`` /
        ``v`` given instead of its buffers."""
        from mux_kernels import reference as ref

        return ref.routed_decode(q, self.k_buffer if k is None else k, self.v_buffer if v is None else v,
                                 self.req_to_token, self.req_pool_indices, self.seq_lens, page_list, page_counts,
                                 self.page_size, scale)

    def triton(self, q, page_list, page_counts, scale, *, k=None, v=None, **kw) -> torch.Tensor:
        """The Triton routed decode (``mux_kernels.routed_paged_decode``) over this pool; ``kw`` goes to it."""
        import mux_kernels

        return mux_kernels.routed_paged_decode(q, self.k_buffer if k is None else k,
                                               self.v_buffer if v is None else v, self.req_to_token,
                                               self.req_pool_indices, self.seq_lens, page_list, page_counts,
                                               self.page_size, scale, **kw)


def make_pool(seq_lens, page_size, num_kv_heads, head_dim, *, aligned=True, dtype=torch.float32, seed=0,
              device="cpu") -> KVPool:
    """Random keys/values; request b sits in req_to_token row b+1 (row 0 unused, like a freed request).

    aligned: each logical page gets a random physical page (slots base..base+P-1, page 0 reserved as padding,
    like SGLang's pool). Not aligned: every position gets a random slot.
    """
    g = torch.Generator().manual_seed(seed)
    pages_per_req = [(n + page_size - 1) // page_size for n in seq_lens]
    num_phys = sum(pages_per_req) + 3
    num_slots = num_phys * page_size
    max_ctx = max(pages_per_req) * page_size + page_size
    r2t = torch.zeros(len(seq_lens) + 2, max_ctx, dtype=torch.int32)
    if aligned:
        phys = torch.randperm(num_phys - 1, generator=g) + 1
        used = 0
        for b, (n, npg) in enumerate(zip(seq_lens, pages_per_req)):
            slots = (phys[used : used + npg, None] * page_size + torch.arange(page_size)).reshape(-1)[:n]
            r2t[b + 1, :n] = slots.to(torch.int32)
            used += npg
    else:
        perm = torch.randperm(num_slots - page_size, generator=g) + page_size
        used = 0
        for b, n in enumerate(seq_lens):
            r2t[b + 1, :n] = perm[used : used + n].to(torch.int32)
            used += n
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    return KVPool(
        k.to(device), v.to(device), r2t.to(device),
        torch.arange(1, len(seq_lens) + 1, dtype=torch.int64, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), page_size,
    )


def random_selection(seq_len: int, page_size: int, max_pages: int, seed: int) -> torch.Tensor:
    """Sorted unique page ids: up to `max_pages` pages, always the tail page."""
    n = (seq_len + page_size - 1) // page_size
    g = torch.Generator().manual_seed(seed)
    take = min(n, max_pages) - 1
    others = torch.randperm(n - 1, generator=g)[:take] if n > 1 else torch.zeros(0, dtype=torch.int64)
    return torch.sort(torch.cat([others, torch.tensor([n - 1])])).values.to(torch.int64)


def as_page_list(selections, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad selections to `page_list [B, width]` (-1 unused) with `page_counts [B]`."""
    out = torch.full((len(selections), width), -1, dtype=torch.int64)
    for b, s in enumerate(selections):
        out[b, : s.numel()] = s
    return out, torch.tensor([s.numel() for s in selections], dtype=torch.int32)
