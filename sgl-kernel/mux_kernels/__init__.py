"""mux_kernels: Triton kernels of sglang-mux with their torch references next to them.

Importing this package never needs a GPU or Triton: the kernel modules (which import Triton) load on first
use of a kernel function. `mux_kernels.reference` holds the torch references.

On a CPU, `load_kernels(interpret=True)` first loads them for Triton's interpreter.

Kernels (each `f(...)` checks it can run, see `triton_support.check_runnable`):
- `score_pages`          page-summary scores per kv-head group (or per query head)  (page_score.py)
- `select_pages_on_device` top-k + forced pages per request, sorted      (page_score.py, torch ops)
- `routed_paged_decode`  decode attention over a per-layer page list     (routed_decode.py)
- `gather_pages` / `scatter_pages`  page moves between a layer buffer and a staging area (page_copy.py)
"""

from __future__ import annotations

import importlib

from mux_kernels.triton_support import (
    TritonUnavailable,
    check_runnable,
    interpreter_enabled,
    load_kernels,
    triton_installed,
)

_LAZY = {
    "score_pages": "mux_kernels.page_score",
    "select_pages_on_device": "mux_kernels.page_score",
    "routed_paged_decode": "mux_kernels.routed_decode",
    "gather_pages": "mux_kernels.page_copy",
    "scatter_pages": "mux_kernels.page_copy",
}

__all__ = ["TritonUnavailable", "check_runnable", "interpreter_enabled", "load_kernels", "triton_installed", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mux_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
