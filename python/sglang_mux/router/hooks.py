"""Scheduler-process hooks of the router (each a named patch of SGLang behaviour, installed by the plugin).

* ``admit_request``  BEFORE ``Scheduler.handle_generate_request``: record the request's mux options
  (``sampling_params.custom_params``) in the registry, keyed by request id, before it can be scheduled.
* ``add_mux_stats``  AFTER ``Scheduler.get_internal_state``: add ``MuxStats`` under the key ``mux``, so
  ``/server_info`` carries it and ``/mux/stats`` can serve it (the HTTP server lives in another process).
"""

from __future__ import annotations

from sglang_mux.metrics import STATS
from sglang_mux.router.requests import REGISTRY

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"


def admit_request(scheduler, recv_req, *args, **kwargs):
    sp = getattr(recv_req, "sampling_params", None)
    custom = getattr(sp, "custom_params", None) if sp is not None else None
    rid = getattr(recv_req, "rid", None)
    if rid is not None:
        REGISTRY.admit(rid, custom)
    return None  # arguments unchanged


def add_mux_stats(result, scheduler, *args, **kwargs):
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        alloc = getattr(scheduler, "token_to_kv_pool_allocator", None)
        if alloc is not None:
            STATS.pool_free_tokens = int(alloc.available_size())
        stats = STATS.as_dict()
        stats["running_requests_tracked"] = len(REGISTRY)
        state["mux"] = stats
    return result


def install_scheduler_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{SCHEDULER}.handle_generate_request", admit_request, HookType.BEFORE)
    HookRegistry.register(f"{SCHEDULER}.get_internal_state", add_mux_stats, HookType.AFTER)
