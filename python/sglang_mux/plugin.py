"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers everything sglang-mux adds.

SGLang calls :func:`register` in every process (launcher, Engine, schedulers, detokenizer). It is
idempotent: a second call in the same process does nothing, or raises again the startup error of the first.
SGLang imports are done here, not at package import, so ``import sglang_mux`` stays cheap.

Hooks: every installer only registers (the table is ``sglang_hooks.HOOKS``); they are applied together, by
SGLang's ``load_plugins`` after the last plugin ran or, when :func:`register` is called outside it, here, once
all are registered (applying after each installer would skip a later hook on an already patched target).
Then :func:`sglang_mux.sglang_hooks.check_installed` fails the start, in one line naming the target, if a
target is missing or a hook will not take effect. Inside ``load_plugins`` SGLang only logs a plugin's error,
so the launcher's own second call of :func:`register` raises it again.
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)

BACKEND_NAME = "mux"
_registered = False
_startup_error: str | None = None  # the first call's hook check error, raised again by every later call


def register() -> None:
    global _registered, _startup_error
    if _registered:
        if _startup_error is not None:
            from sglang_mux.sglang_hooks import HookCheckError

            raise HookCheckError(_startup_error)
        return
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, _current_plugin_source

    from sglang_mux.attention.backend import build_mux_attention_backend
    from sglang_mux.disagg.hooks import install_pd_hooks
    from sglang_mux.memory.radix_cache import build_mux_radix_cache
    from sglang_mux.router.hooks import install_scheduler_hooks
    from sglang_mux.serving.hooks import install_request_validation
    from sglang_mux.sglang_hooks import HookCheckError, check_installed

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, build_mux_radix_cache)
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(build_mux_attention_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    installed = install_scheduler_hooks()
    if multiprocessing.current_process().name == "MainProcess":
        # The HTTP server runs in the launcher's main process; schedulers are spawned children.
        from sglang_mux.router.http_routes import install_stats_route

        installed += install_stats_route()
    installed += install_request_validation()
    installed += install_pd_hooks()
    inside_load_plugins = _current_plugin_source.get() is not None
    if not inside_load_plugins:
        HookRegistry.apply_hooks()
    _registered = True
    try:
        check_installed(installed, applied=not inside_load_plugins)
    except HookCheckError as e:
        _startup_error = str(e)
        raise
    logger.debug("sglang-mux plugin registered (%d SGLang hooks)", len(installed))
