"""FlashInfer inputs for a routed decode: pure builders over torch tensors (no flashinfer import).

A routed selection for one layer of a batch is, per request, a sorted unique 1-D int64 tensor of logical page
ids (page p covers positions [p*P, min((p+1)*P, L))) that always contains the last page. FlashInfer's paged
decode reads, for request b, the pages `kv_indices[kv_indptr[b]:kv_indptr[b+1]]` of a paged cache, all full
except the last, of which `kv_last_page_len[b]` tokens count. Three forms are built here:

    token form (FlashInfer page size 1, as SGLang drives it): one entry per selected position = its token slot,
        in position order; kv_last_page_len = 1.
        P=4, L=10, pages [0, 2], slots of positions 0..9 = s0..s9  ->  indices [s0 s1 s2 s3 s8 s9], last 1
    page form (FlashInfer page size P; needs a page-aligned pool: the slots of a page are base..base+P-1 with
        base % P == 0): one entry per selected page = base // P; the tail page is the last entry and
        kv_last_page_len = L - (num_pages-1)*P.
        same example, s0 = 8, s8 = 20  ->  indices [2, 5], last_page_len 2
    BSR (block-sparse rows, `BlockSparseAttentionWrapper` over a whole layer buffer): row block b (R=1) is
        request b's query; its column blocks are slot blocks of width C. C = P fits when the pool is
        page-aligned and every request's tail page is full; C = 1 (token slots) always fits.

Fixed capacity: `TableBuffers` preallocates int32 storage for `max_batch` requests of up to
`budget_pages + 1` pages; builders write into it and return views, so CUDA graphs can capture the storage.
The `write_*_on_device` functions fill the same buffers from a per-layer `page_list [B, K]` with tensor ops only
(no host sync), for a page choice made on the GPU between layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FORMS = ("token", "page")


@dataclass(frozen=True)
class DecodeTable:
    """Inputs of `BatchDecodeWithPagedKVCacheWrapper.plan` for one batch (int32 views)."""

    kv_indptr: torch.Tensor  # [B + 1]
    kv_indices: torch.Tensor  # [kv_indptr[-1]]
    kv_last_page_len: torch.Tensor  # [B], each in [1, page_size]
    page_size: int  # FlashInfer's page size: 1 (token form) or P (page form)


@dataclass(frozen=True)
class BsrLayout:
    """Inputs of `BlockSparseAttentionWrapper.plan`: scipy-style BSR over an [M, N] mask of R x C blocks."""

    indptr: torch.Tensor  # int32 [M // R + 1]
    indices: torch.Tensor  # int32 [nnz], column block ids
    M: int  # query rows (one per request)
    N: int  # key rows (slots of the layer buffer)
    R: int
    C: int


class TableBuffers:
    """Preallocated int32 storage for one table form: capacity `max_batch * (budget_pages + 1)` pages.

    `kv_indices` holds that many entries in page form and `page_size` times as many in token form, plus one
    trailing scratch entry that the on-device writers use as a sink for unused lanes (never part of a view).
    """

    def __init__(self, max_batch: int, budget_pages: int, page_size: int, form: str, device="cpu"):
        if form not in FORMS:
            raise ValueError(f"form: unknown {form!r}; allowed: {', '.join(FORMS)}")
        if max_batch < 1 or budget_pages < 1:
            raise ValueError(f"max_batch and budget_pages must be >= 1; got {max_batch}, {budget_pages}")
        _check_page_size(page_size)
        self.max_batch = max_batch
        self.budget_pages = budget_pages
        self.page_size = page_size
        self.form = form
        self.max_pages_per_request = budget_pages + 1
        entries = max_batch * self.max_pages_per_request * (page_size if form == "token" else 1)
        self.capacity = entries
        self.kv_indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(entries + 1, dtype=torch.int32, device=device)
        self.kv_last_page_len = torch.ones(max_batch, dtype=torch.int32, device=device)

    def view(self, batch: int, nnz: int) -> DecodeTable:
        if batch > self.max_batch or nnz > self.capacity:
            raise ValueError(f"table of batch {batch} with {nnz} entries exceeds the buffers "
                             f"(max_batch {self.max_batch}, capacity {self.capacity})")
        return DecodeTable(
            self.kv_indptr[: batch + 1],
            self.kv_indices[:nnz],
            self.kv_last_page_len[:batch],
            1 if self.form == "token" else self.page_size,
        )


def _check_page_size(page_size: int) -> None:
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 1; got {page_size}")


def _num_pages(seq_len: int, page_size: int) -> int:
    return (seq_len + page_size - 1) // page_size


def check_selection(pages: torch.Tensor, seq_len: int, page_size: int, index: int = 0) -> None:
    """Raise ValueError unless `pages` is a sorted unique 1-D list of valid page ids ending with the tail page."""
    n = _num_pages(seq_len, page_size)
    where = f"selection of request {index}"
    if pages.dim() != 1 or pages.numel() == 0:
        raise ValueError(f"{where}: must be a non-empty 1-D tensor of page ids")
    if pages.numel() > 1 and not bool((pages[1:] > pages[:-1]).all()):
        raise ValueError(f"{where}: page ids must be sorted and unique")
    if int(pages[0]) < 0 or int(pages[-1]) != n - 1:
        raise ValueError(f"{where}: ids must lie in [0, {n - 1}] and include the last page {n - 1} (seq_len={seq_len})")


def _request_slots(req_to_token, req_pool_idx: int, pages: torch.Tensor, seq_len: int, page_size: int):
    """Token slots of the selected positions, in position order, as a host int64 tensor (plan-time work)."""
    pages = pages.detach().to("cpu", torch.int64)
    pos = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    pos = pos[pos < seq_len]
    return req_to_token[req_pool_idx, pos.to(req_to_token.device)].to("cpu", torch.int64)


def _prepare(req_pool_indices, seq_lens, selections, page_size, buffers, form):
    _check_page_size(page_size)
    rpi = [int(x) for x in req_pool_indices]
    lens = [int(x) for x in seq_lens]
    if not (len(rpi) == len(lens) == len(selections)):
        raise ValueError(
            f"req_pool_indices ({len(rpi)}), seq_lens ({len(lens)}) and selections ({len(selections)}) differ in length"
        )
    for i, (pages, length) in enumerate(zip(selections, lens)):
        check_selection(pages, length, page_size, i)
    if buffers is not None:
        if buffers.form != form or buffers.page_size != page_size:
            raise ValueError(
                f"buffers hold form={buffers.form!r} page_size={buffers.page_size}; "
                f"this table needs form={form!r} page_size={page_size}"
            )
        if len(rpi) > buffers.max_batch:
            raise ValueError(f"batch {len(rpi)} exceeds the buffers' max_batch {buffers.max_batch}")
        for i, pages in enumerate(selections):
            if pages.numel() > buffers.max_pages_per_request:
                raise ValueError(
                    f"selection of request {i}: {pages.numel()} pages exceed budget_pages+1 = "
                    f"{buffers.max_pages_per_request}"
                )
    return rpi, lens


def _emit(indptr, indices, last, buffers, page_size_fi, device) -> DecodeTable:
    indptr_t = torch.tensor(indptr, dtype=torch.int32)
    last_t = torch.tensor(last, dtype=torch.int32)
    idx_t = torch.cat(indices).to(torch.int32) if indices else torch.zeros(0, dtype=torch.int32)
    if buffers is None:
        return DecodeTable(indptr_t.to(device), idx_t.to(device), last_t.to(device), page_size_fi)
    table = buffers.view(len(last), idx_t.numel())
    table.kv_indptr.copy_(indptr_t)
    table.kv_indices.copy_(idx_t)
    table.kv_last_page_len.copy_(last_t)
    return table


def build_token_table(
    req_to_token: torch.Tensor,
    req_pool_indices: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    selections: Sequence[torch.Tensor],
    page_size: int,
    buffers: TableBuffers | None = None,
) -> DecodeTable:
    """Token form: the selected positions' token slots in position order; FlashInfer page size 1."""
    rpi, lens = _prepare(req_pool_indices, seq_lens, selections, page_size, buffers, "token")
    indptr, indices = [0], []
    for r, pages, length in zip(rpi, selections, lens):
        slots = _request_slots(req_to_token, r, pages, length, page_size)
        indices.append(slots)
        indptr.append(indptr[-1] + slots.numel())
    return _emit(indptr, indices, [1] * len(lens), buffers, 1, req_to_token.device)


def page_bases(req_to_token, req_pool_idx: int, pages: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Physical page ids (`slot // P`) of logical `pages`; ValueError unless the pool is page-aligned there."""
    slots = _request_slots(req_to_token, req_pool_idx, pages, seq_len, page_size)
    lengths = torch.clamp(seq_len - pages.detach().to("cpu", torch.int64) * page_size, max=page_size)
    starts = torch.cumsum(lengths, 0) - lengths
    base = slots[starts]
    expected = torch.repeat_interleave(base, lengths) + (
        torch.arange(slots.numel()) - torch.repeat_interleave(starts, lengths)
    )
    if bool((base % page_size).any()) or not torch.equal(slots, expected):
        raise ValueError(
            f"page form needs page-aligned slots (page p at slots base..base+{page_size - 1}, "
            f"base % {page_size} == 0); request pool index {req_pool_idx} is not; use the token form"
        )
    return base // page_size


def build_page_table(
    req_to_token: torch.Tensor,
    req_pool_indices: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    selections: Sequence[torch.Tensor],
    page_size: int,
    buffers: TableBuffers | None = None,
) -> DecodeTable:
    """Page form: physical page ids of the selected pages, tail last; FlashInfer page size P."""
    rpi, lens = _prepare(req_pool_indices, seq_lens, selections, page_size, buffers, "page")
    indptr, indices, last = [0], [], []
    for r, pages, length in zip(rpi, selections, lens):
        indices.append(page_bases(req_to_token, r, pages, length, page_size))
        indptr.append(indptr[-1] + pages.numel())
        last.append(length - (_num_pages(length, page_size) - 1) * page_size)
    return _emit(indptr, indices, last, buffers, page_size, req_to_token.device)


def bsr_block_cols(req_to_token, req_pool_indices, seq_lens, selections, page_size: int, num_slots: int) -> int:
    """The widest column block that fits: `page_size` when the pool is page-aligned for every selected page,
    every tail page is full and `num_slots % page_size == 0`; otherwise 1."""
    if num_slots % page_size or any(int(n) % page_size for n in seq_lens):
        return 1
    try:
        for r, pages, length in zip(req_pool_indices, selections, seq_lens):
            page_bases(req_to_token, int(r), pages, int(length), page_size)
    except ValueError:
        return 1
    return page_size


def build_bsr_layout(
    req_to_token: torch.Tensor,
    req_pool_indices: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    selections: Sequence[torch.Tensor],
    page_size: int,
    num_slots: int,
    block_cols: int | None = None,
) -> BsrLayout:
    """BSR over [B query rows] x [num_slots key rows] of one layer buffer: row block b = request b (R=1).

    `block_cols` None picks `bsr_block_cols(...)`; 1 always fits; `page_size` raises ValueError unless it fits.
    Column block ids within a row are ascending. `plan` of the block-sparse wrapper syncs with the host and
    has no CUDA-graph support: this form is for eager runs.
    """
    rpi, lens = _prepare(req_pool_indices, seq_lens, selections, page_size, None, "page")
    if block_cols is None:
        block_cols = bsr_block_cols(req_to_token, rpi, lens, selections, page_size, num_slots)
    if block_cols not in (1, page_size):
        raise ValueError(f"block_cols: {block_cols} not allowed; allowed: 1, {page_size}")
    if block_cols == page_size and block_cols > 1:
        if num_slots % page_size:
            raise ValueError(f"block_cols={page_size} needs num_slots ({num_slots}) divisible by it")
        for i, length in enumerate(lens):
            if length % page_size:
                raise ValueError(f"block_cols={page_size}: request {i} has a partial tail page (seq_len={length})")
    indptr, indices = [0], []
    for r, pages, length in zip(rpi, selections, lens):
        if block_cols == 1:
            cols = _request_slots(req_to_token, r, pages, length, page_size)
        else:
            cols = page_bases(req_to_token, r, pages, length, page_size)
        cols = torch.sort(cols).values
        indices.append(cols)
        indptr.append(indptr[-1] + cols.numel())
    return BsrLayout(
        torch.tensor(indptr, dtype=torch.int32, device=req_to_token.device),
        torch.cat(indices).to(torch.int32).to(req_to_token.device),
        M=len(lens),
        N=num_slots,
        R=1,
        C=block_cols,
    )


# ---- per-step plan (host integers) and per-layer fill (device tensors, no host sync) ----


def plan_routed_counts(
    seq_lens: Sequence[int], page_size: int, budget_pages: int, blocked_pages: Sequence[int] | None = None
) -> list[int]:
    """Pages each request decodes over this step: all allowed pages up to the budget, else `budget_pages`
    (`blocked_pages[b]` pages of request b may never be read, e.g. dropped for good).

    Equals the `page_counts` of `mux_kernels.reference.select_pages` for the same inputs, whatever the scores.
    The count must not depend on the layer: the indptr of a FlashInfer plan is then shared by all layers and
    only the indices change per layer.
    """
    blocked = list(blocked_pages) if blocked_pages is not None else [0] * len(seq_lens)
    return [min(_num_pages(int(n), page_size) - int(x), budget_pages) for n, x in zip(seq_lens, blocked)]


def plan_step_table(
    seq_lens: Sequence[int], page_counts: Sequence[int], page_size: int, buffers: TableBuffers
) -> DecodeTable:
    """Write indptr and last page lengths for a step (host ints) into `buffers`; indices are filled per layer.

    Page form: request b takes `page_counts[b]` entries, the last one its tail page. Token form: it takes
    `(page_counts[b]-1)*P + tail_len` entries (the non-tail selected pages are full).
    """
    if len(seq_lens) > buffers.max_batch:
        raise ValueError(f"batch {len(seq_lens)} exceeds the buffers' max_batch {buffers.max_batch}")
    p = buffers.page_size
    indptr, last = [0], []
    for n, c in zip(seq_lens, page_counts):
        n, c = int(n), int(c)
        if not 1 <= c <= min(_num_pages(n, p), buffers.max_pages_per_request):
            raise ValueError(f"page count {c} out of range for seq_len={n} (1..{_num_pages(n, p)}, capacity "
                             f"{buffers.max_pages_per_request})")
        tail = n - (_num_pages(n, p) - 1) * p
        if buffers.form == "token":
            indptr.append(indptr[-1] + (c - 1) * p + tail)
            last.append(1)
        else:
            indptr.append(indptr[-1] + c)
            last.append(tail)
    table = buffers.view(len(last), indptr[-1])
    table.kv_indptr.copy_(torch.tensor(indptr, dtype=torch.int32))
    table.kv_last_page_len.copy_(torch.tensor(last, dtype=torch.int32))
    return table


def _lane_gather(req_to_token, req_pool_indices, pos):
    """req_to_token[req_pool_indices[b], pos[b, j]] for every lane (a gather; no whole rows are copied)."""
    pos = pos.clamp(0, req_to_token.shape[1] - 1)
    return req_to_token[req_pool_indices.to(torch.int64)[:, None], pos].to(torch.int64)


def write_page_ids_on_device(
    page_list: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_size: int,
    buffers: TableBuffers,
    batch: int,
) -> None:
    """Fill the page-form `kv_indices` of a planned step from `page_list [B, K]` (sorted logical ids, -1 unused,
    counts as planned). Physical page = req_to_token[req, page*P] // P. Tensor ops only."""
    indptr = buffers.kv_indptr[: batch + 1].to(torch.int64)
    k = page_list.shape[1]
    lane = torch.arange(k, device=page_list.device)[None, :]
    counts = (indptr[1:] - indptr[:-1])[:, None]
    used = lane < counts
    logical = page_list.to(torch.int64).clamp(min=0)
    phys = _lane_gather(req_to_token, req_pool_indices, logical * page_size) // page_size
    dest = torch.where(used, indptr[:-1, None] + lane, torch.full_like(lane, buffers.capacity))
    buffers.kv_indices.scatter_(0, dest.reshape(-1), phys.reshape(-1).to(torch.int32))


def write_token_slots_on_device(
    page_list: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_size: int,
    buffers: TableBuffers,
    batch: int,
) -> None:
    """Fill the token-form `kv_indices` of a planned step from `page_list [B, K]` (sorted, tail last).

    Non-tail selected pages are full, so lane (j, i) -- entry j, offset i -- goes to indptr[b] + j*P + i and
    the lanes in use are exactly those below the request's planned entry count. Tensor ops only.
    """
    indptr = buffers.kv_indptr[: batch + 1].to(torch.int64)
    bsz, k = page_list.shape
    p = page_size
    lane = torch.arange(k * p, device=page_list.device)[None, :]
    entry, within = lane // p, lane % p
    logical = torch.gather(page_list.to(torch.int64).clamp(min=0), 1, entry.expand(bsz, -1))
    pos = logical * p + within
    used = lane < (indptr[1:] - indptr[:-1])[:, None]
    slots = _lane_gather(req_to_token, req_pool_indices, pos)
    dest = torch.where(used, indptr[:-1, None] + lane, torch.full_like(lane, buffers.capacity))
    buffers.kv_indices.scatter_(0, dest.reshape(-1), slots.reshape(-1).to(torch.int32))
