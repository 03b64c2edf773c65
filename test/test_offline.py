"""sglang.Engine in-process with the plugin, and SGLang's offline throughput benchmark (its own module, run by
our entry point that loads the plugin before SGLang parses flags) with mux on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mux_test_support import hf_greedy_ignore_eos

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.server


def _env():
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1")
    env.pop("SGLANG_MUX_CONFIG", None)
    return env


def test_engine_in_process_matches_hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_mux.models import default_model_path

    p = subprocess.run(
        [sys.executable, str(ROOT / "examples/offline_engine.py"), "--json"],
        capture_output=True, text=True, timeout=400, env=_env(),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    outs = json.loads([line for line in p.stdout.splitlines() if line.startswith("[")][-1])
    tok = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), torch_dtype=torch.float32).eval()
    for o in outs:
        ids = tok(o["prompt"])["input_ids"]
        assert o["output_ids"] == hf_greedy_ignore_eos(model, ids, 8)


def test_offline_throughput_benchmark_runs_with_mux(tmp_path):
    from sglang_mux.models import default_model_path

    data = tmp_path / "data.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_dataset.py"), "--out", str(data), "--num", "6",
         "--prompt-words", "120", "--output-words", "8"],
        check=True, timeout=60,
    )
    result = tmp_path / "result.jsonl"
    p = subprocess.run(
        [sys.executable, "-m", "sglang_mux.offline_throughput", "--model-path", default_model_path(),
         "--dataset-name", "sharegpt", "--dataset-path", str(data), "--num-prompts", "6",
         "--result-filename", str(result), "--device", "cpu", "--mem-fraction-static", "0.05",
         "--disable-cuda-graph", "--radix-cache-backend", "mux", "--attention-backend", "mux", "--skip-warmup",
         "--mux-budget", "64"],
        capture_output=True, text=True, timeout=400, env=_env(),
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "impl=MuxRadixCache" in p.stdout + p.stderr
    rec = json.loads(result.read_text().splitlines()[-1])
    assert rec["successful_requests"] == 6
    assert rec["output_throughput"] > 0 and rec["total_output_tokens"] >= 6
