"""The soak (benchmark/soak.py), short: a minute of mixed load on a tiered server with --mux-debug-invariants.

* the server it starts (tiny model, host + disk tiers, budget 256) serves a mixed load (short / long / shared-prefix /
  repeated prompts, streamed or not, some streams cancelled, some with per-request mux fields) with no unexpected
  failure;
* pages really moved (demoted, some to disk) and the server verified its memory invariants every step;
* after the load everything is back at its idle value: no request tracked, tier bytes of requests 0, no request
  page file on disk, staging 0, the pool whole; the JSON and the memory plot are written;
* the end-of-run check itself reports a leak when a counter does not come back (no server).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))

import soak  # noqa: E402


@pytest.mark.server
def test_soak_one_minute_is_clean(tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmark" / "soak.py"), "--minutes", "1", "--concurrency", "3",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    verdict = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    if proc.returncode != 0 and (out / "soak.json").exists():
        r = json.loads((out / "soak.json").read_text())
        verdict += f"\nleaks: {r['leaks']}\nfailures: {r['failures'][:5]}"
    assert proc.returncode == 0, verdict
    assert verdict.startswith("soak PASS"), verdict
    r = json.loads((out / "soak.json").read_text())
    c = r["counts"]
    assert r["ok"] and r["leaks"] == [] and c["failed"] == 0 and c["hung_workers"] == 0
    assert c["ok"] >= 20, c
    assert c["cancelled"] >= 1 and c["streamed"] >= 5 and c["with_mux_fields"] >= 3, c
    assert all(r["by_kind"].get(f"{k}/ok", 0) >= 1 for k in ("short", "long", "shared", "repeat")), r["by_kind"]
    samples = [s for s in r["samples"] if s and "error" not in s]
    assert max(s["tier_request_bytes"].get("disk", 0) for s in samples) > 0  # pages reached the disk
    fin, idle = r["final"], r["idle"]
    assert fin["demoted_pages"] > 0 and fin["integrity_checks"] > 100
    assert fin["requests_tracked"] == 0 and fin["device_kv_tokens_held"] == 0 and fin["staging_bytes"] == 0
    assert all(v == 0 for v in fin["tier_request_bytes"].values()) and fin["disk_request_files"] == 0
    assert fin["pool_free_tokens"] == idle["pool_free_tokens"]
    assert fin["checksum_failures"] == 0 and fin["disk_write_failures"] == 0
    assert r["max_rss_bytes"] > 0 and (out / "soak_memory.png").stat().st_size > 10_000


def test_end_of_run_check_reports_what_did_not_come_back(monkeypatch):
    idle = {"requests_tracked": 0, "device_kv_tokens_held": 0, "staging_bytes": 0, "disk_request_files": 0,
            "tier_request_bytes": {"host": 0, "disk": 0}, "pool_free_tokens": 1000, "checksum_failures": 0}
    after = dict(idle, requests_tracked=1, device_kv_tokens_held=48, tier_request_bytes={"host": 0, "disk": 4096},
                 disk_request_files=1, pool_free_tokens=984)
    monkeypatch.setattr(soak, "sample", lambda *a: dict(after))
    monkeypatch.setattr(soak, "flush", lambda url: False)
    monkeypatch.setattr(soak.time, "sleep", lambda s: None)
    res = soak.Result(command="", url="http://x", launched=False, minutes=1, concurrency=1, seed=0, idle=idle)
    args = soak.build_parser().parse_args(["--drain-timeout", "0.01"])
    soak.drain_and_check(args, "http://x", None, None, res, 0.0)
    text = " | ".join(res.leaks)
    for needle in ("requests tracked: 1", "device KV tokens held by requests: 48", "disk tier bytes of requests: 4096",
                   "request page files on disk: 1", "/flush_cache refused", "pool free tokens: 984"):
        assert needle in text, text
