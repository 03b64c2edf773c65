"""Mux gauges and counters in SGLang's Prometheus ``/metrics`` (``--enable-metrics``); docs/metrics.md lists them.

How they reach ``/metrics``: SGLang's schedulers run in child processes and export through prometheus_client's
multiprocess mode (the launcher sets ``PROMETHEUS_MULTIPROC_DIR`` before spawning them; the HTTP process serves a
``MultiProcessCollector`` over that folder). Ours take the same path: in each scheduler that has SGLang's metrics
collector, the hook below (AFTER ``Scheduler.process_batch_result``, table ``sglang_hooks.py``) creates
prometheus_client metrics with the collector's labels (model_name, tp_rank, ...) and copies the values that
``/mux/stats`` shows into them, after every batch (only the values that changed are written). Read only: nothing
here writes ``STATS``, the scheduler or a request. With metrics off, or mux off, nothing is created.

:data:`METRICS` is the mapping (name, type, unit, what it reads from the ``/mux/stats`` section); :func:`samples`
applies it to such a section and is what the exporter writes, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# imported here, not in current_stats: a module that binds STATS by name must be loaded before tests swap STATS
from sglang_mux.router.hooks import live_stats

PREFIX = "sglang_mux_"
COUNTER, GAUGE = "counter", "gauge"
UNITS = ("bytes", "tokens", "pages", "steps", "requests", "lookups", "failures", "files", "seconds", "changes",
         "scorings", "fetches")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the Prometheus sample name (counters end in _total)
    kind: str  # COUNTER or GAUGE
    unit: str  # one of UNITS: bytes / tokens / pages are named in the metric, the others are counts
    help: str
    read: Callable[[dict], dict[str, float]]  # /mux/stats section -> {label value: value}; key "" when unlabelled
    label: str | None = None  # the label the keys of ``read`` go to (tier, leaf, mode, ...)


def _field(key: str) -> Callable[[dict], dict[str, float]]:
    return lambda s: {"": s[key]}


def _fields(**by_label: str) -> Callable[[dict], dict[str, float]]:
    return lambda s: {value: s[key] for value, key in by_label.items()}


def _tier_kv_bytes(s: dict) -> dict[str, float]:
    return {tier: t["kv_bytes"] for tier, t in s["tiers"].items()}


METRICS: tuple[MetricSpec, ...] = (
    # ---- counters (since the scheduler started)
    MetricSpec("sglang_mux_decode_steps_total", COUNTER, "steps", "Decode batches planned by the mux attention backend.",
               _field("decode_steps")),
    MetricSpec("sglang_mux_request_steps_total", COUNTER, "steps",
               "Per-request decode steps, by mode: routed (reads only the selected pages) or exact (full attention).",
               _fields(routed="routed_request_steps", exact="exact_request_steps"), "mode"),
    MetricSpec("sglang_mux_dropped_tokens_total", COUNTER, "tokens",
               "Tokens of cold pages dropped for good (--mux-drop-cold).", _field("dropped_tokens")),
    MetricSpec("sglang_mux_freed_device_tokens_total", COUNTER, "tokens",
               "Device KV slots given back mid-request by drop or demotion.", _field("freed_device_tokens")),
    MetricSpec("sglang_mux_demoted_pages_total", COUNTER, "pages",
               "Cold pages copied to a lower tier (host/disk) and freed on the device.", _field("demoted_pages")),
    MetricSpec("sglang_mux_staging_lookups_total", COUNTER, "lookups",
               "Reads of off-device pages through the staging area, by result: hit (already staged), waited "
               "(fetched on the spot, --mux-missing-page wait), skipped (fetched in the background, not read this "
               "step, --mux-missing-page skip).",
               _fields(hit="staging_hits", waited="staging_waited", skipped="staging_skipped"), "result"),
    MetricSpec("sglang_mux_checksum_failures_total", COUNTER, "failures",
               "Lower-tier pages that failed their checksum when read back (the request is failed).",
               _field("checksum_failures")),
    MetricSpec("sglang_mux_failed_requests_total", COUNTER, "requests",
               "Routed-decode failures that finished a request with an error (counted per failing step).",
               _field("failed_requests")),
    MetricSpec("sglang_mux_pd_heavy_scores_total", COUNTER, "requests",
               "PD: requests whose heavy-hitter scores this server sent (prefill) or received (decode).",
               _fields(sent="pd_heavy_scores_sent", received="pd_heavy_scores_received"), "direction"),
    MetricSpec("sglang_mux_disk_write_failures_total", COUNTER, "failures",
               "Disk-tier page writes that failed (ENOSPC, EIO, ...); the page stayed in the tier above.",
               _field("disk_write_failures")),
    MetricSpec("sglang_mux_disk_stale_files_removed_total", COUNTER, "files",
               "Page files of dead servers removed from the disk folder at start.", _field("disk_stale_files_removed")),
    MetricSpec("sglang_mux_integrity_checks_total", COUNTER, "steps",
               "Scheduler steps whose memory invariants were verified (--mux-debug-invariants).",
               _field("integrity_checks")),
    # control plane: per-request fields, SLO admission (serving/label_options.py, serving/admission.py)
    MetricSpec("sglang_mux_requests_with_options_total", COUNTER, "requests",
               "Requests admitted with per-request mux fields (custom_params, or custom_labels through sglang-router).",
               _field("requests_with_mux_options")),
    MetricSpec("sglang_mux_slo_deferred_requests_total", COUNTER, "requests",
               "Requests held in the waiting queue because admitting them would break --mux-slo-tpot (each once).",
               _field("slo_deferred_requests")),
    MetricSpec("sglang_mux_slo_deferred_steps_total", COUNTER, "steps",
               "Scheduler steps that held at least one waiting request for the TPOT objective.",
               _field("slo_deferred_steps")),
    MetricSpec("sglang_mux_slo_shrunk_requests_total", COUNTER, "requests",
               "Requests admitted with a smaller device-KV budget so the predicted TPOT fits (--mux-slo-policy shrink).",
               _field("slo_shrunk_requests")),
    MetricSpec("sglang_mux_slo_step_samples_total", COUNTER, "steps",
               "Decode steps timed for the online TPOT model.", _field("slo_step_samples")),
    # router policies and cold pages (router/adaptive.py, memory/cold_pages.py; docs/router.md)
    MetricSpec("sglang_mux_router_request_steps_total", COUNTER, "steps",
               "Routed request-steps under the adaptive/learned router by trigger outcome: refresh = the query-aware "
               "leaves scored the query, reuse = they reused their last pages.",
               _fields(refresh="router_refresh_request_steps", reuse="router_reuse_request_steps"), "outcome"),
    MetricSpec("sglang_mux_router_changes_total", COUNTER, "changes",
               "Splits and layer spreads the adaptive/learned router changed (after hysteresis).",
               _fields(split="router_split_changes", layers="router_layer_changes"), "kind"),
    MetricSpec("sglang_mux_router_flagged_requests_total", COUNTER, "requests",
               "Requests whose out-of-window attention stayed above --mux-router-fail-mass (each once).",
               _field("router_flagged_requests")),
    MetricSpec("sglang_mux_router_boosted_request_steps_total", COUNTER, "steps",
               "Request-steps of flagged requests that read --mux-router-boost x their ranked pages.",
               _field("router_boosted_request_steps")),
    MetricSpec("sglang_mux_page_scorings_total", COUNTER, "scorings",
               "Query-aware page scorings (one per routed request and layer that ran retrieval scoring).",
               _field("page_scorings")),
    MetricSpec("sglang_mux_quantized_cold_pages_total", COUNTER, "pages",
               "Cold pages kept as quantized copies in drop mode (--mux-drop-cold with --mux-cold-bits < 16).",
               _field("quantized_cold_pages")),
    MetricSpec("sglang_mux_staging_batched_fetches_total", COUNTER, "fetches",
               "Lower-tier fetches of several pages in one request (a chunk's pages).",
               _field("staging_batched_fetches")),
    # ---- gauges (now)
    MetricSpec("sglang_mux_device_kv_bytes_by_precision", GAUGE, "bytes",
               "Device KV bytes of the last decode step's requests: exact pages and quantized cold copies by width.",
               lambda s: dict(s.get("device_kv_bytes_by_precision") or {}), "precision"),
    MetricSpec("sglang_mux_slo_waiting_held_requests", GAUGE, "requests",
               "Waiting requests held for the TPOT objective at the last scheduling step.", _field("slo_waiting_held")),
    MetricSpec("sglang_mux_slo_predicted_tpot_seconds", GAUGE, "seconds",
               "Predicted decode step (TPOT) of the batch after the last admission decision.",
               lambda s: {"": s["slo_last_predicted_tpot_ms"] / 1000.0}),
    MetricSpec("sglang_mux_slo_step_model_seconds", GAUGE, "seconds",
               "The online TPOT model's terms: fixed (a step of one request), per_request (each extra request), "
               "per_1k_kv_tokens (each 1,024 KV tokens read); 0 until fitted.",
               lambda s: {term: (s["slo_tpot_model"] or {}).get(f"{term}_ms", 0.0) / 1000.0
                          for term in ("fixed", "per_request", "per_1k_kv_tokens")}, "term"),
    MetricSpec("sglang_mux_tier_request_bytes", GAUGE, "bytes",
               "Bytes in each lower tier owned by running requests (0 when idle; the rest of sglang_mux_kv_bytes is "
               "reclaimable prefix copies).", lambda s: dict(s.get("tier_request_bytes") or {}), "tier"),
    MetricSpec("sglang_mux_kv_bytes", GAUGE, "bytes",
               "KV bytes by tier: device = held by running requests; host / disk / remote = pages in that tier.",
               _tier_kv_bytes, "tier"),
    MetricSpec("sglang_mux_summary_bytes", GAUGE, "bytes", "Device bytes of the per-page key summaries.",
               _field("summary_bytes")),
    MetricSpec("sglang_mux_staging_bytes", GAUGE, "bytes", "Bytes in the running requests' staging areas.",
               _field("staging_bytes")),
    MetricSpec("sglang_mux_kv_bytes_per_token", GAUGE, "bytes", "KV bytes of one token (all layers, K and V).",
               _field("kv_bytes_per_token")),
    MetricSpec("sglang_mux_page_size_tokens", GAUGE, "tokens", "Mux page size.", _field("page_size")),
    MetricSpec("sglang_mux_budget_tokens", GAUGE, "tokens", "Server-wide device KV budget per request (--mux-budget).",
               _field("budget_tokens")),
    MetricSpec("sglang_mux_running_requests_tracked", GAUGE, "requests",
               "Requests whose mux state this scheduler holds (should return to 0 when idle).",
               _field("running_requests_tracked")),
    MetricSpec("sglang_mux_last_step_requests", GAUGE, "requests", "Requests in the last decode batch, by mode.",
               _fields(routed="last_routed_requests", exact="last_exact_requests"), "mode"),
    MetricSpec("sglang_mux_last_step_max_pages_read", GAUGE, "pages",
               "Pages read in the last decode step by its largest request (max over layers).",
               _field("last_max_pages_read")),
    MetricSpec("sglang_mux_last_step_leaf_pages", GAUGE, "pages",
               "Pages each leaf chose for the last routed request (layer 0).", lambda s: dict(s["last_pages_by_leaf"]),
               "leaf"),
    MetricSpec("sglang_mux_max_pages_read", GAUGE, "pages", "Most pages one request read in any decode step.",
               _field("max_pages_read")),
    MetricSpec("sglang_mux_last_step_max_context_tokens", GAUGE, "tokens",
               "Longest context in the last decode batch.", _field("last_max_context_tokens")),
    MetricSpec("sglang_mux_max_routed_kv_tokens_held", GAUGE, "tokens",
               "Most device KV tokens one routed request held at any step.", _field("max_routed_kv_tokens_held")),
)


def samples(stats: dict) -> list[tuple[str, dict[str, str], float]]:
    """``(sample name, extra labels, value)`` for every metric, from a ``/mux/stats`` ``mux`` section."""
    out = []
    for m in METRICS:
        for key, value in m.read(stats).items():
            out.append((m.name, {m.label: str(key)} if m.label else {}, float(value)))
    return out


def current_stats(scheduler) -> dict:
    """The ``mux`` section ``/mux/stats`` would show now (with ``router/hooks.py::live_stats``, as ``add_mux_stats``
    refreshes it), as far as :data:`METRICS` reads it. Built shallowly each batch (``MuxStats.as_dict`` deep-copies
    every field, ~10x the cost; a test keeps the two equal); STATS itself is not written."""
    from sglang_mux.metrics import STATS

    stats = {**vars(STATS), **live_stats(scheduler)}
    stats["tiers"] = STATS.tiers_section(stats["tier_bytes"])
    return stats


class PrometheusExporter:
    """One per scheduler process: the prometheus_client metrics and the values last written to them."""

    def __init__(self, labels: dict, registry=None):
        # imported here: prometheus_client picks multiprocess mode from PROMETHEUS_MULTIPROC_DIR at import
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = REGISTRY if registry is None else registry

        self.labels = {k: str(v) for k, v in labels.items()}
        names = tuple(self.labels)
        self.metrics = {}
        for m in METRICS:
            label_names = names + ((m.label,) if m.label else ())
            if m.kind == COUNTER:
                self.metrics[m.name] = Counter(m.name, m.help, label_names, registry=registry)
            else:  # the scheduler's own value wins, as SGLang's scheduler gauges do
                self.metrics[m.name] = Gauge(m.name, m.help, label_names, registry=registry,
                                              multiprocess_mode="mostrecent")
        self.written: dict[tuple, float] = {}
        self._children: dict[tuple, object] = {}

    def export(self, stats: dict) -> None:
        now = {}
        for name, extra, value in samples(stats):
            now[(name, *sorted(extra.items()))] = (name, extra, value)
        # a labelled gauge whose label value left the stats (e.g. a leaf) goes to 0 rather than keep its old value
        for key in self.written.keys() - now.keys():
            if key[0] in self.metrics and not key[0].endswith("_total"):
                now[key] = (key[0], dict(key[1:]), 0.0)
        for key, (name, extra, value) in now.items():
            old = self.written.get(key)
            if old == value:
                continue
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self.metrics[name].labels(**self.labels, **extra)
            if name.endswith("_total"):
                if value > (old or 0.0):
                    child.inc(value - (old or 0.0))
            else:
                child.set(value)
            self.written[key] = value


def _exporter(scheduler) -> PrometheusExporter | None:
    """This scheduler's exporter, made on its first batch: None when SGLang has no metrics collector here
    (``--enable-metrics`` off, or a rank that does not log metrics) or mux is off."""
    found = scheduler.__dict__.get("_mux_prometheus")
    if found is None:
        collector = getattr(scheduler, "metrics_collector", None)
        mux_on = getattr(getattr(scheduler, "server_args", None), "radix_cache_backend", None) == "mux"
        found = PrometheusExporter(collector.labels) if collector is not None and mux_on else False
        scheduler._mux_prometheus = found
    return found or None


def export_after_batch(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.process_batch_result`` (every scheduler loop, PD ones included, calls it once per batch,
    after the batch's mux bookkeeping is done): copy the mux stats into the Prometheus metrics."""
    exporter = _exporter(scheduler)
    if exporter is not None:
        try:
            exporter.export(current_stats(scheduler))
        except Exception:  # exporting must never take the scheduler down
            import logging

            logging.getLogger(__name__).exception("mux: exporting Prometheus metrics failed")
            scheduler._mux_prometheus = False
    return result
