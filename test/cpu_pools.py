"""Real SGLang memory objects on CPU for the tests that start no server: a float32 KV pool, a req_to_token pool,
a paged allocator over the KV pool and the mux radix cache over that allocator (a module of its own, imported by
name like ``mux_test_support``)."""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


def kv_pool(size: int, page_size: int, head_num: int, head_dim: int, layer_num: int = 1) -> MHATokenToKVPool:
    """SGLang's MHA KV pool of ``size`` float32 slots on the CPU."""
    return MHATokenToKVPool(size=size, page_size=page_size, dtype=torch.float32, head_num=head_num,
                            head_dim=head_dim, layer_num=layer_num, device="cpu", enable_memory_saver=False)


def req_to_token_pool(size: int, max_context_len: int) -> ReqToTokenPool:
    return ReqToTokenPool(size=size, max_context_len=max_context_len, device="cpu", enable_memory_saver=False)


def paged_allocator(kv: MHATokenToKVPool, size: int, page_size: int) -> PagedTokenToKVPoolAllocator:
    """SGLang's paged allocator over ``kv`` (every page free)."""
    return PagedTokenToKVPoolAllocator(size=size, page_size=page_size, dtype=torch.float32, device="cpu", kvcache=kv,
                                       need_sort=False)


def mux_radix_cache(size: int, page_size: int, head_num: int = 2, head_dim: int = 4, layer_num: int = 1,
                    mux_config=None):
    """The mux radix cache over a fresh KV pool and paged allocator of ``size`` slots: ``(kv, alloc, cache)``."""
    from sglang_mux.memory.radix_cache import MuxRadixCache

    kv = kv_pool(size, page_size, head_num, head_dim, layer_num)
    alloc = paged_allocator(kv, size, page_size)
    cache = MuxRadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=alloc,
                                          page_size=page_size), mux_config)
    return kv, alloc, cache
