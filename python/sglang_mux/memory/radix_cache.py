"""MuxRadixCache: SGLang's Python RadixCache, extended to index the multiplexed memory.

Registered as radix cache backend ``mux`` (``--radix-cache-backend mux``) by ``sglang_mux.plugin``.
"""

from __future__ import annotations

import logging

from sglang.srt.mem_cache.radix_cache import RadixCache

from sglang_mux.config import MuxConfig

logger = logging.getLogger(__name__)


class MuxRadixCache(RadixCache):
    def __init__(self, params, mux_config: MuxConfig | None = None):
        self.mux_config = mux_config or MuxConfig.from_env()
        super().__init__(params)


def build_mux_radix_cache(ctx) -> MuxRadixCache:
    """Factory for SGLang's radix cache registry (called inside the scheduler process)."""
    cfg = MuxConfig.from_env()
    cache = MuxRadixCache(ctx.params, cfg)
    logger.info("sglang-mux: radix cache 'mux' (page_size=%d, budget=%d)", cfg.page_size, cfg.budget)
    return cache
