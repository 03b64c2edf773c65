"""What FlashInfer computes for given inputs, written in float64 torch (a test oracle; no flashinfer import).

- Paged decode (`BatchDecodeWithPagedKVCacheWrapper`, NHD layout): request b attends to the concatenation of
  pages `kv_indices[kv_indptr[b]:kv_indptr[b+1]]` of `k_cache [num_pages, page_size, H_kv, D]`, every page
  full except the last, of which the first `kv_last_page_len[b]` rows count. GQA: q head h reads kv head
  h // (Hq // H_kv). Softmax scale `sm_scale`.
- Block-sparse (`BlockSparseAttentionWrapper`, scipy BSR): q row i attends to key rows of the column blocks
  `indices[indptr[i // R]:indptr[i // R + 1]]`, block c covering rows [c*C, (c+1)*C) of `k [N, H_kv, D]`.
"""

from __future__ import annotations

import torch


def _attend(q_row: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float) -> torch.Tensor:
    hq = q_row.shape[0]
    group = hq // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    logits = torch.einsum("hd,thd->ht", q_row.double(), k) * sm_scale
    return torch.einsum("ht,thd->hd", torch.softmax(logits, dim=-1), v)


def paged_decode(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, sm_scale: float) -> torch.Tensor:
    """q [B, Hq, D]; caches [num_pages, page_size, H_kv, D]; returns [B, Hq, D] float64."""
    page_size = k_cache.shape[1]
    out = []
    for b in range(q.shape[0]):
        pages = kv_indices[int(kv_indptr[b]) : int(kv_indptr[b + 1])].to(torch.int64)
        last = int(kv_last_page_len[b])
        assert pages.numel() >= 1 and 1 <= last <= page_size, "FlashInfer needs >= 1 page and 1 <= last <= page_size"
        keys = k_cache[pages].reshape(-1, *k_cache.shape[2:])
        values = v_cache[pages].reshape(-1, *v_cache.shape[2:])
        keep = (pages.numel() - 1) * page_size + last
        out.append(_attend(q[b], keys[:keep], values[:keep], sm_scale))
    return torch.stack(out)


def block_sparse(q, k, v, indptr, indices, R: int, C: int, sm_scale: float) -> torch.Tensor:
    """q [M, Hq, D]; k, v [N, H_kv, D]; returns [M, Hq, D] float64."""
    out = []
    for i in range(q.shape[0]):
        blocks = indices[int(indptr[i // R]) : int(indptr[i // R + 1])].to(torch.int64)
        rows = (blocks[:, None] * C + torch.arange(C)).reshape(-1)
        assert int(rows.max()) < k.shape[0], "column block beyond N"
        out.append(_attend(q[i], k[rows], v[rows], sm_scale))
    return torch.stack(out)
