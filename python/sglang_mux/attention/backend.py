"""MuxAttentionBackend: the attention backend ``mux``, wrapping the platform backend.

Extend/prefill is delegated to the wrapped backend unchanged (exact). Anything SGLang asks of an
attention backend that we do not define is answered by the wrapped backend.
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_mux.config import MuxConfig
from sglang_mux.platform import platform_attention_backend

logger = logging.getLogger(__name__)


class MuxAttentionBackend(AttentionBackend):
    def __init__(self, model_runner, inner: AttentionBackend, mux_config: MuxConfig):
        super().__init__()
        self.inner = inner
        self.mux_config = mux_config
        self.model_runner = model_runner

    def __getattr__(self, name):
        # Only reached for attributes not found on self: delegate to the wrapped backend.
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def init_forward_metadata(self, forward_batch):
        return self.inner.init_forward_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        return self.inner.init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        return self.inner.init_forward_metadata_in_graph(forward_batch)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def support_triton(self):
        return self.inner.support_triton()


def build_mux_attention_backend(model_runner) -> MuxAttentionBackend:
    """Factory for SGLang's attention registry: wrap the platform backend."""
    cfg = MuxConfig.from_env()
    inner_name = platform_attention_backend() if cfg.inner_backend == "auto" else cfg.inner_backend
    if inner_name == "mux" or inner_name not in ATTENTION_BACKENDS:
        allowed = sorted(n for n in ATTENTION_BACKENDS if n != "mux")
        raise ValueError(f"--mux-inner-backend: unknown backend {inner_name!r}; allowed: auto, {', '.join(allowed)}")
    inner = ATTENTION_BACKENDS[inner_name](model_runner)
    logger.info("sglang-mux: attention backend 'mux' wrapping %s", inner_name)
    return MuxAttentionBackend(model_runner, inner, cfg)
