"""benchmark/prefill_latency.py: ``--help``, one-line errors for bad flags, and its pure helpers (the sparse flags
handed to the mux server, identical prompts for both systems, the per-repeat ratio)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmark"
sys.path.insert(0, str(BENCH))
import prefill_latency as PL  # noqa: E402


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SGLANG_MUX_CONFIG", None)
    return subprocess.run([sys.executable, str(BENCH / "prefill_latency.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_help():
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    for flag in ("--out", "--systems", "--lengths", "--sparse-min-tokens", "--sparse-keep", "--model-path"):
        assert flag in p.stdout, flag


@pytest.mark.parametrize("args,flag", [
    (["--lengths", "1K,abc"], "--lengths"),
    (["--lengths", "8"], "--lengths"),
    (["--repeats", "0"], "--repeats"),
    (["--sparse-keep", "1.5"], "--sparse-keep"),
    (["--sparse-block", "48"], "--sparse-block"),
    (["--sparse-min-tokens", "-1"], "--sparse-min-tokens"),
    (["--systems", "stock,vllm"], "--systems"),
    (["--bogus"], "--bogus"),
])
def test_bad_flag_is_one_clear_line(args, flag):
    p = _run(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert flag in last and "error" in last, p.stderr


def test_sparse_flags_and_prompts():
    a = PL.parse_args(["--lengths", "2K,1K,2K", "--sparse-min-tokens", "1500", "--sparse-keep", "0.8"])
    assert a.lengths == [1024, 2048]
    assert PL.sparse_flags(a) == ["--mux-sparse-prefill-min-tokens=1500", "--mux-sparse-prefill-keep=0.8"]
    from sglang_mux.config import split_mux_args

    cfg, rest = split_mux_args(PL.sparse_flags(a))
    assert (cfg.sparse_prefill_min_tokens, cfg.sparse_prefill_keep, rest) == (1500, 0.8, [])
    p1, p2 = PL.prompt_for(1024, 0, 0), PL.prompt_for(2048, 0, 0)
    assert len(p1) == 1024 and PL.prompt_for(1024, 0, 0) == p1
    assert p2[:1024] != p1 and PL.prompt_for(1024, 1, 0) != p1  # no prompt is a prefix of another


def test_ratio_is_per_repeat_median():
    a = PL.parse_args(["--lengths", "1K,2K", "--sparse-min-tokens", "2K"])
    pts = lambda d: {"points": {str(n): {"ttft_s": sorted(v)[len(v) // 2], "ttft_repeats_s": v} for n, v in d.items()}}  # noqa: E731
    systems = {"stock": pts({1024: [1.0, 2.0, 4.0], 2048: [4.0, 4.0, 8.0]}),
               "mux": pts({1024: [1.0, 2.0, 4.0], 2048: [1.0, 2.0, 4.0]})}
    rows = PL.analyse(a, systems)["table"]
    assert [r["sparse"] for r in rows] == [False, True]
    assert rows[0]["mux_over_stock"] == 1.0
    assert rows[1]["mux_over_stock_repeats"] == [0.25, 0.5, 0.5] and rows[1]["mux_over_stock"] == 0.5
    assert "mux/stock 0.50x" in PL.summary_line(a, PL.analyse(a, systems), systems)
