"""Mux metrics in SGLang's Prometheus ``/metrics`` (sglang_mux/prometheus_metrics.py, docs/metrics.md).

Without a server:
* names follow Prometheus conventions (prefix, ``_total`` on counters only, the unit in the name), each documented
  in docs/metrics.md;
* the mapping from a ``/mux/stats`` section to samples, on hand-set values;
* the exporter on a private registry writes those values, counters grow by the difference, a leaf that left the
  stats goes to 0; without SGLang's metrics collector (``--enable-metrics`` off) or with mux off nothing is created.

With a server (``--enable-metrics``, one exact and one routed request): ``/metrics`` carries every mux metric next
to SGLang's own, with SGLang's labels, and every value equals what ``/mux/stats`` says.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sglang_mux.metrics import MuxStats
from sglang_mux.prometheus_metrics import (
    COUNTER,
    GAUGE,
    METRICS,
    UNITS,
    PrometheusExporter,
    _exporter,
    export_after_batch,
    samples,
)

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"model_name": "m", "tp_rank": 0}


def scrape(text: str) -> dict[tuple, float]:
    """``{(sample name, frozenset of its labels): value}`` from the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def lookup(scraped: dict, name: str, **labels) -> list[float]:
    want = {(k, str(v)) for k, v in labels.items()}
    return [v for (n, ls), v in scraped.items() if n == name and want <= ls]


def stats_section(**fields) -> dict:
    """A ``/mux/stats`` ``mux`` section, as router/hooks.py builds it."""
    tracked = fields.pop("running_requests_tracked", 0)
    d = MuxStats(**fields).as_dict()
    d["running_requests_tracked"] = tracked
    return d


# ------------------------------------------------------------------ names, units, docs


def test_names_follow_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"sglang_mux_[a-z0-9_]+", m.name), m.name
        assert m.kind in (COUNTER, GAUGE) and m.unit in UNITS and m.help
        assert m.name.endswith("_total") == (m.kind == COUNTER), m.name
        if m.unit in ("bytes", "tokens", "pages"):
            assert f"_{m.unit}" in m.name or m.name.endswith(f"{m.unit}_total"), (m.name, m.unit)
        assert m.label not in LABELS


def test_every_metric_is_documented():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for m in METRICS:
        row = [line for line in doc.splitlines() if line.startswith(f"| `{m.name}`")]
        assert len(row) == 1, m.name
        assert f"| {m.kind} |" in row[0] and (m.label is None or f"`{m.label}`" in row[0]), row[0]


def test_samples_map_the_stats_fields():
    st = stats_section(
        page_size=16, budget_tokens=256, kv_bytes_per_token=1000, summary_bytes=77, decode_steps=9,
        routed_request_steps=5, exact_request_steps=11, staging_hits=3, staging_waited=2, staging_skipped=1,
        checksum_failures=4, dropped_tokens=64, demoted_pages=6, tier_bytes={"host": 4096, "disk": 8192},
        device_kv_tokens_held={"a": 100, "b": 20}, last_pages_by_leaf={"recent": 4, "retrieval": 2},
        last_routed_requests=1, last_exact_requests=2, max_pages_read=17, running_requests_tracked=2,
        disk_write_failures=5, disk_stale_files_removed=7, integrity_checks=8, tier_request_bytes={"host": 512},
        router_refresh_request_steps=6, router_reuse_request_steps=14, router_split_changes=2, page_scorings=90,
        device_kv_bytes_by_precision={"exact": 1000, "int4": 300},
    )
    got = {(n, tuple(sorted(ls.items()))): v for n, ls, v in samples(st)}
    assert got[("sglang_mux_request_steps_total", (("mode", "routed"),))] == 5
    assert got[("sglang_mux_request_steps_total", (("mode", "exact"),))] == 11
    assert got[("sglang_mux_decode_steps_total", ())] == 9
    assert got[("sglang_mux_kv_bytes", (("tier", "device"),))] == 120 * 1000
    assert got[("sglang_mux_kv_bytes", (("tier", "host"),))] == 4096
    assert got[("sglang_mux_kv_bytes", (("tier", "disk"),))] == 8192
    assert got[("sglang_mux_staging_lookups_total", (("result", "hit"),))] == 3
    assert got[("sglang_mux_staging_lookups_total", (("result", "waited"),))] == 2
    assert got[("sglang_mux_staging_lookups_total", (("result", "skipped"),))] == 1
    assert got[("sglang_mux_checksum_failures_total", ())] == 4
    assert got[("sglang_mux_last_step_leaf_pages", (("leaf", "recent"),))] == 4
    assert got[("sglang_mux_last_step_requests", (("mode", "exact"),))] == 2
    assert got[("sglang_mux_max_pages_read", ())] == 17
    assert got[("sglang_mux_summary_bytes", ())] == 77
    assert got[("sglang_mux_running_requests_tracked", ())] == 2
    assert got[("sglang_mux_disk_write_failures_total", ())] == 5
    assert got[("sglang_mux_disk_stale_files_removed_total", ())] == 7
    assert got[("sglang_mux_integrity_checks_total", ())] == 8
    assert got[("sglang_mux_tier_request_bytes", (("tier", "host"),))] == 512
    assert got[("sglang_mux_router_request_steps_total", (("outcome", "refresh"),))] == 6
    assert got[("sglang_mux_router_request_steps_total", (("outcome", "reuse"),))] == 14
    assert got[("sglang_mux_router_changes_total", (("kind", "split"),))] == 2
    assert got[("sglang_mux_page_scorings_total", ())] == 90
    assert got[("sglang_mux_device_kv_bytes_by_precision", (("precision", "int4"),))] == 300
    assert {n for n, _ in got} == {m.name for m in METRICS}


def test_control_plane_samples():
    st = stats_section(requests_with_mux_options=3, slo_deferred_requests=4, slo_deferred_steps=9, slo_shrunk_requests=2,
                       slo_waiting_held=1, slo_step_samples=40, slo_last_predicted_tpot_ms=25.0,
                       slo_tpot_model={"fixed_ms": 10.0, "per_request_ms": 2.0, "per_1k_kv_tokens_ms": 0.5, "samples": 40})
    got = {(n, tuple(sorted(ls.items()))): v for n, ls, v in samples(st)}
    assert got[("sglang_mux_requests_with_options_total", ())] == 3
    assert got[("sglang_mux_slo_deferred_requests_total", ())] == 4
    assert got[("sglang_mux_slo_deferred_steps_total", ())] == 9
    assert got[("sglang_mux_slo_shrunk_requests_total", ())] == 2
    assert got[("sglang_mux_slo_waiting_held_requests", ())] == 1
    assert got[("sglang_mux_slo_step_samples_total", ())] == 40
    assert got[("sglang_mux_slo_predicted_tpot_seconds", ())] == 0.025
    assert got[("sglang_mux_slo_step_model_seconds", (("term", "fixed"),))] == 0.010
    assert got[("sglang_mux_slo_step_model_seconds", (("term", "per_request"),))] == 0.002
    assert got[("sglang_mux_slo_step_model_seconds", (("term", "per_1k_kv_tokens"),))] == 0.0005
    empty = {(n, tuple(sorted(ls.items()))): v for n, ls, v in samples(stats_section())}
    assert empty[("sglang_mux_slo_step_model_seconds", (("term", "fixed"),))] == 0.0  # not fitted yet


def test_current_stats_reads_what_mux_stats_shows(monkeypatch):
    """The exporter's per-batch section (built shallowly) gives the same samples as ``MuxStats.as_dict``, the
    ``/mux/stats`` section, with the tier bytes refreshed from the cache's tiers as router/hooks.py does."""
    from sglang_mux.prometheus_metrics import current_stats
    from sglang_mux.memory.requests import REGISTRY

    fields = dict(page_size=16, kv_bytes_per_token=1000, decode_steps=9, routed_request_steps=5, staging_hits=3,
                  device_kv_tokens_held={"a": 100, "b": 20}, last_pages_by_leaf={"recent": 4}, tier_bytes={"host": 1})
    monkeypatch.setattr("sglang_mux.metrics.STATS", MuxStats(**fields))
    tiers = types.SimpleNamespace(bytes_by_tier=lambda: {"host": 4096, "disk": 512})
    sched = types.SimpleNamespace(tree_cache=types.SimpleNamespace(tiers=tiers))
    want = stats_section(**{**fields, "tier_bytes": {"host": 4096, "disk": 512}}, running_requests_tracked=len(REGISTRY))
    assert sorted(samples(current_stats(sched)), key=repr) == sorted(samples(want), key=repr)


# ------------------------------------------------------------------ the exporter, on a private registry


def test_exporter_writes_values_and_counter_differences():
    reg = CollectorRegistry()
    ex = PrometheusExporter(LABELS, registry=reg)
    ex.export(stats_section(routed_request_steps=5, decode_steps=3, last_pages_by_leaf={"recent": 4, "sink": 1},
                            tier_bytes={"host": 100}))
    ex.export(stats_section(routed_request_steps=8, decode_steps=3, last_pages_by_leaf={"recent": 2},
                            tier_bytes={"host": 40}))
    got = scrape(generate_latest(reg).decode())
    assert lookup(got, "sglang_mux_request_steps_total", mode="routed", model_name="m", tp_rank=0) == [8]
    assert lookup(got, "sglang_mux_decode_steps_total") == [3]
    assert lookup(got, "sglang_mux_kv_bytes", tier="host") == [40]
    assert lookup(got, "sglang_mux_last_step_leaf_pages", leaf="recent") == [2]
    assert lookup(got, "sglang_mux_last_step_leaf_pages", leaf="sink") == [0]


def _scheduler(*, collector: bool, mux: bool):
    return types.SimpleNamespace(
        metrics_collector=types.SimpleNamespace(labels=dict(LABELS)) if collector else None,
        server_args=types.SimpleNamespace(radix_cache_backend="mux" if mux else None),
    )


@pytest.mark.parametrize("collector,mux", [(False, True), (True, False)])
def test_nothing_is_created_without_metrics_or_without_mux(collector, mux, monkeypatch):
    made = []
    monkeypatch.setattr("sglang_mux.prometheus_metrics.PrometheusExporter", lambda *a, **k: made.append(a))
    sched = _scheduler(collector=collector, mux=mux)
    assert export_after_batch("result", sched, None, None) == "result"
    assert _exporter(sched) is None and made == []


# ------------------------------------------------------------------ a server with --enable-metrics


@pytest.fixture(scope="module")
def metrics_server():
    from mux_test_support import SERVER_COMMON
    from sglang_mux.server_process import ServerProcess

    with ServerProcess(SERVER_COMMON + ["--mux-page-size", "16", "--enable-metrics"]) as srv:
        yield srv


@pytest.mark.server
def test_metrics_endpoint_carries_the_mux_stats(metrics_server, tokenizer):
    words = "the blue river and green mountain under a quiet morning sky".split()
    ids = tokenizer(" ".join(words[i % len(words)] for i in range(700)))["input_ids"][:600]
    metrics_server.greedy_ids(ids[:80], 6)  # exact: its context fits the server's budget
    out = metrics_server.greedy_ids(ids, 8, sampling_params={"custom_params": {"mux_budget": 128}})  # routed
    assert len(out) == 8

    r = requests.get(metrics_server.url + "/mux/stats", timeout=30)  # answered by the scheduler after the batch
    r.raise_for_status()
    stats = r.json()["mux"]
    m = requests.get(metrics_server.url + "/metrics", timeout=30)
    m.raise_for_status()
    got = scrape(m.text)

    assert lookup(got, "sglang:num_running_reqs")  # SGLang's own metrics, same endpoint
    routed = lookup(got, "sglang_mux_request_steps_total", mode="routed")
    assert routed == [stats["routed_request_steps"]] and routed[0] >= 7
    exact = lookup(got, "sglang_mux_request_steps_total", mode="exact")
    assert exact == [stats["exact_request_steps"]] and exact[0] >= 5
    assert lookup(got, "sglang_mux_decode_steps_total") == [stats["decode_steps"]]
    assert 0 < lookup(got, "sglang_mux_max_pages_read")[0] <= 128 // 16 + 1
    assert lookup(got, "sglang_mux_kv_bytes_per_token")[0] > 0
    assert lookup(got, "sglang_mux_kv_bytes", tier="device") == [stats["tiers"]["device"]["kv_bytes"]]
    assert lookup(got, "sglang_mux_running_requests_tracked") == [0]
    for name, extra, value in samples(stats):
        series = lookup(got, name, **extra)
        assert series == [value], (name, extra, series, value)
        labels = next(ls for (n, ls) in got if n == name and set(extra.items()) <= ls)
        assert {"model_name", "tp_rank"} <= {k for k, _ in labels}
        assert value >= 0
