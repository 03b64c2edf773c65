"""benchmark/kernels/routed_decode.py runs on CPU at tiny shapes, says so, and writes its JSON and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmark" / "kernels" / "routed_decode.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cpu_run_writes_results(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the CPU mode of the benchmark is checked on CPU machines")
    proc = _run("--out", str(tmp_path), "--contexts", "64,256", "--batches", "1,2", "--budgets", "96",
                "--iters", "1", "--head-dim", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "CPU: torch path only, tiny shapes; not GPU numbers" in lines[0]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "routed_decode.png").stat().st_size > 10_000
    assert res["max_abs_diff_routed_vs_float64_reference"] < 1e-4
    rows = {(r["method"], r["batch"], r["context"]) for r in res["rows"]}
    assert rows == {(m, b, c) for m in ("dense_torch", "routed_torch") for b in (1, 2) for c in (64, 256)}
    for r in res["rows"]:
        tokens = r["context"] if r["method"] == "dense_torch" else min(r["context"], 96)
        assert r["kv_bytes"] == 2 * r["batch"] * tokens * 2 * 16 * 4


@pytest.mark.parametrize(
    "args, message",
    [(["--budgets", "40"], "--budgets: 40 must be a multiple of --page-size"),
     (["--contexts", "a,b"], "expected comma-separated integers"),
     (["--q-heads", "5"], "--q-heads (5) must be a multiple of --kv-heads (2)")],
)
def test_bad_flags_give_one_line_errors(args, message, tmp_path):
    proc = _run("--out", str(tmp_path), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
