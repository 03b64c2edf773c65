"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers everything sglang-mux adds.

SGLang calls :func:`register` in every process (launcher, Engine, schedulers, detokenizer). It is
idempotent: a second call in the same process does nothing. SGLang imports are done here, not at
package import, so ``import sglang_mux`` stays cheap.
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)

BACKEND_NAME = "mux"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from sglang_mux.attention.backend import build_mux_attention_backend
    from sglang_mux.memory.radix_cache import build_mux_radix_cache

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, build_mux_radix_cache)
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(build_mux_attention_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    from sglang_mux.router.hooks import install_scheduler_hooks

    install_scheduler_hooks()
    if multiprocessing.current_process().name == "MainProcess":
        # The HTTP server runs in the launcher's main process; schedulers are spawned children.
        from sglang_mux.router.http_routes import install_stats_route

        install_stats_route()
    from sglang_mux.serving.hooks import install_request_validation; install_request_validation()
    from sglang_mux.disagg.hooks import install_pd_hooks; install_pd_hooks()
    _registered = True
    logger.debug("sglang-mux plugin registered")
