"""Scheduler-process hooks of the router, each a named patch of SGLang behaviour.

Which SGLang method each one patches, how, why, and what breaks if SGLang changes it: one row per hook in the table
of ``sglang_hooks.py`` (group ``router``), the one place they are listed. The plugin installs them from there
(:func:`install_scheduler_hooks`) and the startup check verifies them.
"""

from __future__ import annotations

import logging

from sglang.srt.managers.schedule_batch import FINISH_ABORT

from sglang_mux.config import MuxConfig
from sglang_mux.metrics import STATS
from sglang_mux.router.placement_live import FINISHED
from sglang_mux.memory.requests import REGISTRY
from sglang_mux.sglang_hooks import SGLangHook, hooks_in, register_hooks

logger = logging.getLogger(__name__)


def admit_request(scheduler, recv_req, *args, **kwargs):
    sp = getattr(recv_req, "sampling_params", None)
    custom = getattr(sp, "custom_params", None) if sp is not None else None
    rid = getattr(recv_req, "rid", None)
    if rid is not None:
        tokens = getattr(recv_req, "input_ids", None)
        REGISTRY.admit(rid, custom, tokens, getattr(scheduler, "tokenizer", None))
        mux = {k: v for k, v in custom.items() if isinstance(k, str) and k.startswith("mux_")} if isinstance(custom, dict) else {}
        if mux:  # per-request mux fields reached this scheduler (directly, or via custom_labels through the router)
            STATS.requests_with_mux_options += 1
            STATS.last_request_mux_options = mux
    return None  # arguments unchanged


def readmit_retracted_request(result, req, *args, **kwargs):
    """AFTER ``Req.reset_for_retract``: SGLang retracted ``req`` (decode ran out of KV, a priority preemption, a
    paused generation); the cache's release just dropped its mux state with its KV. A request that goes back to a
    queue gets its options again, so its new prefill and later decode steps use its own budget and leaves, not
    the server's. One that is being aborted instead (``to_finish`` set) is not recorded: nothing would release it."""
    if req.to_finish is None and not req.finished():
        sp = getattr(req, "sampling_params", None)
        tokens = list(getattr(req, "origin_input_ids", None) or ()) + list(getattr(req, "output_ids", None) or ())
        REGISTRY.readmit(req.rid, getattr(sp, "custom_params", None), tokens, getattr(req, "tokenizer", None))
    return None


def live_stats(scheduler) -> dict:
    """The ``/mux/stats`` values read from live objects, not counted in STATS: staging bytes, tier bytes (only
    when the cache has tiers), the requests tracked and those readmitted after a retraction. Read-only."""
    live = {
        "staging_bytes": sum(st.staging.nbytes() for st in REGISTRY.states() if st.staging is not None),
        "running_requests_tracked": len(REGISTRY),
        "retracted_requests": REGISTRY.readmitted,
    }
    tiers = getattr(getattr(scheduler, "tree_cache", None), "tiers", None)
    if tiers is not None:
        live["tier_bytes"] = tiers.bytes_by_tier()
    return live


def add_mux_stats(result, scheduler, *args, **kwargs):
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        alloc = getattr(scheduler, "token_to_kv_pool_allocator", None)
        if alloc is not None:
            STATS.pool_free_tokens = int(alloc.available_size())
        live = live_stats(scheduler)
        STATS.staging_bytes = live.pop("staging_bytes")
        STATS.tier_bytes = live.pop("tier_bytes", STATS.tier_bytes)
        stats = STATS.as_dict()
        stats.update(live)
        placement = _placement_config()
        if placement is not None:
            stats["placement"] = FINISHED.recommendation(placement)
        state["mux"] = stats
    return result


def abort_failed_requests(scheduler, batch, *args, **kwargs):
    """BEFORE ``Scheduler.process_batch_result``: a request whose memory failed it (e.g. a lower-tier page that
    failed its checksum) is finished with an error to its client; the others go on."""
    for req in getattr(batch, "reqs", None) or ():
        st = REGISTRY.peek(req.rid)
        if st is not None and st.error and not req.finished() and req.to_finish is None:
            # Not set_finish_with_abort: that is for requests not yet prefilled (it replaces the prompt by one
            # token), and a running request's release would then key its KV under the wrong tokens.
            logger.error("%s", st.error)
            req.to_finish = FINISH_ABORT(st.error, status_code=500, err_type="PageIntegrityError")
    return None


_PLACEMENT_CFG: list = []  # [MuxConfig or None], resolved once per process


def _placement_config():
    """The server's config when it has ``--mux-placement-costs``, else None (read once from the environment)."""
    if not _PLACEMENT_CFG:
        try:
            cfg = MuxConfig.from_env()
            _PLACEMENT_CFG.append(cfg if cfg.placement_costs else None)
        except Exception:  # validated at launch; a bad environment here only means no recommendation
            logger.exception("mux: reading the placement config failed")
            _PLACEMENT_CFG.append(None)
    return _PLACEMENT_CFG[0]


def after_stream_output(result, streamer, reqs, *args, **kwargs):
    """AFTER ``SchedulerOutputStreamer.stream_output``, one pass over the requests just streamed:

    * a request that finished without holding KV (aborted while waiting, or on a PD bootstrap/transfer failure)
      never reaches the cache's release, so its mux state is dropped here (requests still holding KV are released
      by the cache, which needs their state to free it correctly);
    * with ``--mux-placement-costs``, each finished request's lengths go to the placement window of ``/mux/stats``.
    """
    placement = _placement_config() is not None
    try:
        for req in reqs or ():
            if not req.finished():
                continue
            if not req.kv.holds_kv:
                REGISTRY.release(req.rid)
            if placement and not getattr(req, "_mux_placement_seen", False):
                req._mux_placement_seen = True
                FINISHED.record(len(req.origin_input_ids), len(req.output_ids))
    except Exception:  # bookkeeping must never take the scheduler down
        logger.exception("mux: bookkeeping of finished requests failed")
    return None


_freed_seen = 0


def reopen_batch_after_freeing(scheduler, *args, **kwargs):
    """BEFORE ``Scheduler.get_next_batch_to_run``: SGLang marks the running batch full when a new request does not
    fit and clears the mark only when a request finishes; it does not know that drop mode or demotion gave device
    slots back mid-request. Clearing the mark lets it try to admit waiting requests (it sets it again if they still
    do not fit), so bounded per-request memory turns into more concurrent requests."""
    global _freed_seen
    if STATS.freed_device_tokens != _freed_seen:
        _freed_seen = STATS.freed_device_tokens
        batch = getattr(scheduler, "running_batch", None)
        if batch is not None:
            batch.batch_is_full = False
    return None


def install_scheduler_hooks() -> list[SGLangHook]:
    """Register the hooks above with SGLang's HookRegistry (applied by ``plugin.register`` or ``load_plugins``)."""
    return register_hooks(hooks_in("router"))
