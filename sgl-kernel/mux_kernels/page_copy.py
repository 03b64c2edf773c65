"""Page moves between a layer buffer and a contiguous staging area (Triton).

`gather_pages`: pages of a device buffer -> one contiguous block (what a device->host copy sends in one DMA).
`scatter_pages`: a contiguous block (arrived from host/disk) -> pages of a device buffer.
A buffer is `[num_rows, ...]` and page p is rows `[p*P, (p+1)*P)` (SGLang's token slots when the pool is
page-aligned). References: `mux_kernels.reference.gather_pages` / `scatter_pages`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mux_kernels.triton_support import check_runnable, launch_env, note_loaded

note_loaded(__name__)


@triton.jit
def _copy_pages_kernel(
    src_ptr, dst_ptr, page_ids_ptr,
    row_width,
    GATHER: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # One program: list entry i, one row of its page, one BLOCK_W-wide chunk of the row.
    i = tl.program_id(0)
    r = tl.program_id(1)
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = w < row_width
    page = tl.load(page_ids_ptr + i).to(tl.int64)
    paged_row = page * PAGE_SIZE + r
    staged_row = i.to(tl.int64) * PAGE_SIZE + r
    if GATHER:
        vals = tl.load(src_ptr + paged_row * row_width + w, mask=wmask)
        tl.store(dst_ptr + staged_row * row_width + w, vals.to(dst_ptr.dtype.element_ty), mask=wmask)
    else:
        vals = tl.load(src_ptr + staged_row * row_width + w, mask=wmask)
        tl.store(dst_ptr + paged_row * row_width + w, vals.to(dst_ptr.dtype.element_ty), mask=wmask)


def _launch(src, dst, page_ids, page_size, gather, block_w):
    row_width = src[0].numel()
    if dst[0].numel() != row_width:
        raise ValueError(f"row widths differ: src {tuple(src.shape[1:])} vs dst {tuple(dst.shape[1:])}")
    if page_ids.numel() == 0:
        return
    block_w = min(block_w, triton.next_power_of_2(row_width))
    grid = (page_ids.numel(), page_size, triton.cdiv(row_width, block_w))
    _copy_pages_kernel[grid](src, dst, page_ids, row_width, GATHER=gather, PAGE_SIZE=page_size, BLOCK_W=block_w)


def gather_pages(
    src: torch.Tensor, page_ids: torch.Tensor, page_size: int, out: torch.Tensor | None = None, block_w: int = 1024
) -> torch.Tensor:
    """Rows of pages `page_ids` of contiguous `src [num_rows, ...]`, concatenated: `[len(page_ids)*P, ...]`."""
    mode = check_runnable(src, page_ids)
    if not src.is_contiguous():
        raise ValueError("gather_pages: src must be contiguous")
    page_ids = page_ids.contiguous()
    if out is None:
        out = torch.empty((page_ids.numel() * page_size, *src.shape[1:]), dtype=src.dtype, device=src.device)
    with launch_env(mode):
        _launch(src, out, page_ids, page_size, True, block_w)
    return out


def scatter_pages(
    dst: torch.Tensor, page_ids: torch.Tensor, staged: torch.Tensor, page_size: int, block_w: int = 1024
) -> torch.Tensor:
    """Write contiguous `staged [len(page_ids)*P, ...]` into pages `page_ids` of `dst` in place; returns dst."""
    mode = check_runnable(dst, page_ids, staged)
    if not dst.is_contiguous() or not staged.is_contiguous():
        raise ValueError("scatter_pages: dst and staged must be contiguous")
    if staged.shape[0] != page_ids.numel() * page_size:
        raise ValueError(f"scatter_pages: staged has {staged.shape[0]} rows, expected {page_ids.numel() * page_size}")
    with launch_env(mode):
        _launch(staged, dst, page_ids.contiguous(), page_size, False, block_w)
    return dst
