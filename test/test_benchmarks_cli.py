"""The serving benchmarks (benchmark/decode_latency.py, memory_scaling.py, offline_throughput.py, goodput.py):
``--help``, one-line errors for bad flags, the measurement helpers against hand-computed values, and one tiny
end-to-end run of memory_scaling.py against real stock and mux servers, checked against the KV the requests
must hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmark"
SCRIPTS = ["decode_latency.py", "memory_scaling.py", "offline_throughput.py", "goodput.py", "profile_decode.py"]

sys.path.insert(0, str(BENCH))
import common as C  # noqa: E402


def _run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SGLANG_MUX_CONFIG", None)
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    p = _run(script, "--help")
    assert p.returncode == 0, p.stderr
    assert "--out" in p.stdout and "--systems" in p.stdout and "--mux-budget" in p.stdout


@pytest.mark.parametrize("script,args,flag", [
    ("decode_latency.py", ["--contexts", "1K,abc"], "--contexts"),
    ("decode_latency.py", ["--contexts", "16"], "--contexts"),
    ("decode_latency.py", ["--batches", "0"], "--batches"),
    ("decode_latency.py", ["--systems", "stock,vllm"], "--systems"),
    ("decode_latency.py", ["--output-tokens", "2"], "--output-tokens"),
    ("memory_scaling.py", ["--mux-mode", "evict"], "--mux-mode"),
    ("memory_scaling.py", ["--poll-interval", "0"], "--poll-interval"),
    ("offline_throughput.py", ["--min-prompt-tokens", "8K", "--max-prompt-tokens", "4K"], "--min-prompt-tokens"),
    ("offline_throughput.py", ["--min-prompt-tokens", "1K", "--max-prompt-tokens", "8K", "--max-total-tokens", "4096"], "--max-total-tokens"),
    ("offline_throughput.py", ["--num-prompts", "-3"], "--num-prompts"),
    ("goodput.py", ["--mix", "1K:0.5,2K:heavy"], "--mix"),
    ("goodput.py", ["--rate", "0"], "--rate"),
    ("goodput.py", ["--server-arg", "max-total-tokens=9"], "--server-arg"),
    ("decode_latency.py", ["--mux-arg=--max-total-tokens=9"], "--mux-arg"),
    ("pd_latency_by_length.py", ["--systems", "stock,vllm"], "--systems"),
    ("pd_latency_by_length.py", ["--repeats", "0"], "--repeats"),
    ("pd_latency_by_length.py", ["--lengths", "64,x"], "--lengths"),
])
def test_bad_flag_is_one_clear_line(script, args, flag):
    p = _run(script, *args)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert flag in last and "error" in last, p.stderr


def test_positive_ints_accepts_k_suffix():
    assert C.positive_ints("1K,2k,4096") == [1024, 2048, 4096]


def _stream(sent, pairs):
    r = C.StreamResult(sent=sent)
    for t, n in pairs:
        r.times.append(t)
        r.tokens.append(n)
    return r


def test_decode_time_single_request_is_plain_tpot():
    # 1 token at t=2.0, then one token every 0.1 s up to 11 tokens: TPOT = 0.1.
    r = _stream(0.0, [(2.0 + 0.1 * i, i + 1) for i in range(11)])
    tpot, steps = C.decode_time_per_token([r])
    assert tpot == pytest.approx(0.1)
    assert steps == 10
    assert r.ttft == pytest.approx(2.0)


def test_decode_time_batch_uses_only_the_window_where_all_decode():
    # Request a decodes fast (0.01 s/token) alone before b's first token at t=1.0; from then on both decode at
    # 0.05 s/step until a ends at t=1.5. Only the shared window counts: 0.05 s per step.
    a_pairs = [(0.01 * i, i + 1) for i in range(100)] + [(1.0 + 0.05 * k, 101 + k) for k in range(0, 11)]
    b_pairs = [(1.0 + 0.05 * k, 1 + k) for k in range(0, 16)]
    tpot, steps = C.decode_time_per_token([_stream(0.0, a_pairs), _stream(0.5, b_pairs)])
    assert tpot == pytest.approx(0.05)
    assert steps == 10


def test_decode_time_without_shared_window_says_so():
    a = _stream(0.0, [(0.1, 1), (0.2, 2)])
    b = _stream(0.0, [(0.5, 1), (0.6, 2)])
    with pytest.raises(RuntimeError, match="more output tokens"):
        C.decode_time_per_token([a, b])


def test_long_dataset_prompt_lengths_match_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from sglang_mux.models import default_model_path

    path = tmp_path / "d.json"
    lengths = C.write_long_dataset(path, num=3, min_tokens=300, max_tokens=900, output_tokens=5, seed=1,
                                   model_path=default_model_path())
    tok = AutoTokenizer.from_pretrained(default_model_path())
    data = json.loads(path.read_text())
    assert len(data) == 3
    for target, n, rec in zip([300, 600, 900], lengths, data):
        measured = len(tok.encode(rec["conversations"][0]["value"], add_special_tokens=False))
        assert measured == n
        assert target <= n <= target + 8  # within one word of the target
        assert rec["conversations"][1]["value"].split() == ["ok"] * 5


def test_prompts_are_the_same_in_every_process():
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import common as C; " \
           "print(C.prompt_ids(20, C.stable_seed(0, 'prefix', 1024, 1, 0)))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONHASHSEED=str(s))).stdout for s in (1, 2)}
    assert len(outs) == 1 and outs.pop().startswith("[")


@pytest.mark.server
def test_memory_scaling_tiny_run_against_real_servers(tmp_path):
    """Two short lengths, both systems. Stock holds the whole context while decoding; mux (drop mode, budget
    128) holds at most budget + a page or two at the longer length, by the allocator's own count."""
    budget, page, out_tokens = 128, 16, 256
    p = _run("memory_scaling.py", "--contexts", "256,1024", "--ratio-base", "256", "--output-tokens",
             str(out_tokens), "--mux-budget", str(budget), "--mux-page-size", str(page), "--out", str(tmp_path),
             "--poll-interval", "0.02", timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith("SUMMARY memory_scaling")
    res = json.loads((tmp_path / "memory_scaling.json").read_text())
    assert (tmp_path / "memory_scaling.png").stat().st_size > 5_000
    stock, mux = res["systems"]["stock"], res["systems"]["mux"]
    from sglang_mux.models import default_model_path

    cfg = json.loads((Path(default_model_path()) / "config.json").read_text())
    # K and V, every layer, every KV head, float32
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    assert stock["kv_bytes_per_token"] == mux["mux_reported_kv_bytes_per_token"] == per_token
    for ctx in (256, 1024):
        used = stock["points"][str(ctx)]["decode_used_tokens"]
        assert ctx <= used <= ctx + out_tokens + 1, (ctx, used)
    held = mux["points"]["1024"]["decode_used_tokens"]
    assert 0 < held <= budget + 2 * page, held
    assert res["table"][-1]["mux_over_stock"] < 0.25


def test_memory_scaling_reports_a_zero_base_as_n_a_not_a_crash():
    """A base point with no device bytes measured (e.g. the allocator's load snapshot lagged behind a short
    request) has no growth ratio: the table and summary say n/a and the other ratios stand."""
    import types

    import memory_scaling as M

    def pt(dev):
        return {"decode_bytes": {"device": dev, "host": 0, "disk": 0}, "peak_bytes": {"device": dev}}

    systems = {"stock": {"points": {256: pt(100.0), 1024: pt(400.0)}},
               "mux": {"points": {256: pt(0.0), 1024: pt(50.0)}}}
    a = types.SimpleNamespace(contexts=[256, 1024], ratio_base=256)
    rows = M.analyse(a, systems)
    assert rows[1]["stock_growth"] == 4.0 and rows[1]["mux_growth"] is None
    assert rows[1]["mux_over_stock"] == 50.0 / 400.0 and rows[0]["mux_over_stock"] == 0.0
    line = M.summary_line(a, rows, systems)
    assert "4.00x its 256 value" in line and "n/a its 256 value" in line and "mux/stock 0.125x" in line


def test_pd_metadata_costs_without_servers(tmp_path):
    """pd_transfer.py --systems none: the decode-side metadata costs only. The heavy-score slot is the fixed size
    both PD sides register; its rebuild (a forward pass of the window) is measured and grows with the context."""
    from sglang_mux.disagg.heavy_scores import SHIPPED_PAGES
    from sglang_mux.models import default_model_path

    p = _run("pd_transfer.py", "--systems", "none", "--lengths", "64,512", "--out", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "pd_metadata.json").read_text())
    layers = json.loads((Path(default_model_path()) / "config.json").read_text())["num_hidden_layers"]
    heavy = res["heavy_scores"]
    assert [h["context_tokens"] for h in heavy] == [64, 512]
    assert all(h["ship_bytes"] == layers * 2 * SHIPPED_PAGES * 4 for h in heavy)
    assert all(h["rebuild_ms"] > 0 for h in heavy) and res["transfer"] == []
    p = _run("pd_transfer.py", "--systems", "stock,gpu")
    assert p.returncode == 2 and "--systems" in p.stderr and "Traceback" not in p.stderr


def test_server_flags_give_both_systems_room_for_long_prompts_on_cpu():
    """On CPU both systems get the same --mem-fraction-static (the launcher's 0.05 leaves the default model about
    9K tokens of KV); a value passed with --server-arg wins, once."""
    import types

    a = types.SimpleNamespace(dtype="bfloat16", model_path="smollm2", server_arg=[])
    flags = C.server_flags(a, context_length=7256, max_running=4)
    assert flags[flags.index("--mem-fraction-static") + 1] == C.CPU_MEM_FRACTION
    a.server_arg = ["--mem-fraction-static=0.5"]
    flags = C.server_flags(a, context_length=7256, max_running=4)
    assert flags.count("--mem-fraction-static") == 1 and flags[flags.index("--mem-fraction-static") + 1] == "0.5"
