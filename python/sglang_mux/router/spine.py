"""SpineRouter (static policy): each step, each request gets a Grant from its effective config.

The router sees sizes and options, never tree nodes or tensors. ``static`` is the only policy for now:
a fixed split (``--mux-leaves``) of the request's budget; requests that fit get exact attention.
"""

from __future__ import annotations

import functools

from sglang_mux.config import MuxConfig
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.router.grant import Grant, grant_for


class StaticSpineRouter:
    name = "static"

    def __init__(self, config: MuxConfig):
        self.config = config

    @functools.lru_cache(maxsize=256)
    def _split(self, cfg: MuxConfig) -> dict[str, int]:
        return cfg.leaf_split(cfg.budget)

    @functools.lru_cache(maxsize=1024)
    def effective_config(self, options: MuxRequestOptions) -> MuxConfig:
        # Called per request per decode step; building (and validating) a MuxConfig each time is wasted work.
        return options.effective_config(self.config)

    def grant(self, seq_len: int, options: MuxRequestOptions) -> Grant:
        cfg = self.effective_config(options)
        return grant_for(seq_len, cfg.budget, cfg.page_size, self._split(cfg), force_exact=options.exact)
