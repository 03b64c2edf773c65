"""MuxStats: what the mux memory is doing, per scheduler process; served at ``/mux/stats`` and in ``/server_info``.

Counters only grow; ``last_*`` fields describe the most recent decode step. Pages read are counted per request
per layer (the largest over layers), so "pages read per step" is comparable with ``budget / page_size``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MuxStats:
    page_size: int = 0
    budget_tokens: int = 0
    kv_bytes_per_token: int = 0
    summary_bytes: int = 0
    decode_steps: int = 0
    routed_request_steps: int = 0
    exact_request_steps: int = 0
    last_routed_requests: int = 0
    last_exact_requests: int = 0
    last_max_pages_read: int = 0
    max_pages_read: int = 0
    last_max_context_tokens: int = 0
    last_pages_by_leaf: dict = field(default_factory=dict)
    dropped_tokens: int = 0
    freed_device_tokens: int = 0  # device slots given back by drop or demotion (both modes)
    max_routed_kv_tokens_held: int = 0
    demoted_pages: int = 0
    staging_hits: int = 0
    staging_waited: int = 0
    staging_skipped: int = 0
    checksum_failures: int = 0
    disk_write_failures: int = 0  # disk page writes that failed (ENOSPC, EIO, ...): the page stayed above
    disk_stale_files_removed: int = 0  # page files of dead servers removed from the disk folder at start
    integrity_checks: int = 0  # --mux-debug-invariants: scheduler steps whose memory invariants were verified
    failed_requests: int = 0
    tier_bytes: dict = field(default_factory=dict)
    # of tier_bytes, the bytes of running requests' demoted pages (the rest: reclaimable prefix-cache copies);
    # every tier is back to 0 when no request runs
    tier_request_bytes: dict = field(default_factory=dict)
    staging_bytes: int = 0
    last_tiered_request: dict = field(default_factory=dict)
    pool_free_tokens: int = 0
    # PD: requests whose heavy-hitter scores this prefill server wrote into the transfer / this decode server
    # received with it (disagg/heavy_scores.py)
    pd_heavy_scores_sent: int = 0
    pd_heavy_scores_received: int = 0
    device_kv_tokens_held: dict = field(default_factory=dict)
    # router policies (router/spine.py, router/adaptive.py): request-steps whose query-aware leaves scored the query
    # (refresh) or reused their last pages; steps whose signals were read; split and layer-spread changes; requests
    # flagged by the fallback and their boosted steps; page scorings (one per routed request and layer)
    router_refresh_request_steps: int = 0
    router_reuse_request_steps: int = 0
    router_observed_request_steps: int = 0
    router_split_changes: int = 0
    router_layer_changes: int = 0
    router_flagged_requests: int = 0
    router_boosted_request_steps: int = 0
    page_scorings: int = 0
    # drop mode with --mux-cold-bits < 16: cold pages kept as quantized copies instead of being dropped
    quantized_cold_pages: int = 0
    # tier fetches of several pages in one request (a chunk's pages, in wait mode; their pages count in staging_waited)
    staging_batched_fetches: int = 0
    # device KV bytes of the last decode step's requests by precision: "exact" (the pages still in the pool, the
    # model's dtype) and "int8" / "int4" / "int2" (quantized cold-page copies, memory/quantized_pages.py)
    device_kv_bytes_by_precision: dict = field(default_factory=dict)
    # control plane
    # requests admitted with per-request mux fields (custom_params, or custom_labels through sglang-router), and
    # those fields of the last one (serving/label_options.py)
    requests_with_mux_options: int = 0
    last_request_mux_options: dict = field(default_factory=dict)
    # --mux-slo-policy (serving/admission.py): requests held in the waiting queue because admitting them would
    # break --mux-slo-tpot, scheduler steps that held at least one, requests admitted with a smaller budget
    # instead, requests held right now; decode steps timed for the online TPOT model, its fit and last prediction
    slo_deferred_requests: int = 0
    slo_deferred_steps: int = 0
    slo_shrunk_requests: int = 0
    slo_waiting_held: int = 0
    slo_step_samples: int = 0
    slo_tpot_model: dict = field(default_factory=dict)
    slo_last_predicted_tpot_ms: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["device_bytes"] = {
            "summaries": self.summary_bytes,
            "kv_per_token": self.kv_bytes_per_token,
        }
        d["tiers"] = self.tiers_section(self.tier_bytes)
        return d

    def tiers_section(self, tier_bytes: dict[str, int]) -> dict:
        """``/mux/stats`` ``tiers``: the device KV running requests hold, then each lower tier's bytes."""
        held = sum(self.device_kv_tokens_held.values())
        return {
            "device": {"kv_tokens_held_by_running_requests": held, "kv_bytes": held * self.kv_bytes_per_token},
            **{name: {"kv_bytes": b} for name, b in tier_bytes.items()},
        }


STATS = MuxStats()
