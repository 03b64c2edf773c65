"""Offline throughput at long context with equal device KV capacity: stock SGLang against mux, one run.

    .venv/bin/python benchmark/offline_throughput.py --out benchmark/out/offline_throughput
    .venv/bin/python benchmark/offline_throughput.py --num-prompts 2 --min-prompt-tokens 1K --max-prompt-tokens 2K \\
        --output-tokens 16 --max-total-tokens 8192

Generates a local ShareGPT-format dataset (no download) of ``--num-prompts`` prompts spread over
[--min-prompt-tokens, --max-prompt-tokens], then runs SGLang's own benchmark on it twice, one after the other:

* stock: ``python -m sglang.benchmark.offline_throughput`` (torch_native, no plugin loaded);
* mux:   ``python -m sglang_mux.offline_throughput`` (the same module with the plugin loaded) + --mux-* flags;

both with the same SGLang flags, in particular the same ``--max-total-tokens`` (device KV capacity) and
``--max-running-requests``. Mux runs in drop mode by default, so a request holds about budget + one page of KV
after its prefill and more requests fit in the same capacity. Reports SGLang's result record for each, the
largest ``#running-req`` SGLang logged while decoding, and the mux/stock output-throughput ratio; prints one
summary line last. Writes offline_throughput.json and offline_throughput.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

RUNNING_RE = re.compile(r"Decode batch.*?#running-req: (\d+)")
RETRACT_RE = re.compile(r"[Rr]etract")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=C.positive_int, default=12, help="requests in the dataset")
    p.add_argument("--min-prompt-tokens", type=C.positive_ints, default=[16384], help="shortest prompt (tokens)")
    p.add_argument("--max-prompt-tokens", type=C.positive_ints, default=[32768], help="longest prompt (tokens)")
    p.add_argument("--output-tokens", type=C.positive_int, default=512, help="output tokens per request")
    p.add_argument("--max-total-tokens", type=C.positive_int, default=None,
                   help="device KV capacity in tokens for BOTH systems (default: two longest requests)")
    p.add_argument("--max-running-requests", type=C.positive_int, default=16, help="for both systems")
    p.add_argument("--chunked-prefill-size", type=C.positive_int, default=None,
                   help="for both systems (default: the longest prompt + 256, one chunk per prompt: torch_native's "
                        "extend attends from every position, so each extra chunk costs another full prefill on CPU)")
    p.add_argument("--timeout", type=C.positive_int, default=3600, help="seconds allowed per system")
    C.add_run_args(p, "offline_throughput", default_mode="drop")
    a = p.parse_args(argv)
    a.min_prompt_tokens, a.max_prompt_tokens = a.min_prompt_tokens[0], a.max_prompt_tokens[0]
    if a.min_prompt_tokens > a.max_prompt_tokens:
        p.error(f"--min-prompt-tokens ({a.min_prompt_tokens}) must be <= --max-prompt-tokens ({a.max_prompt_tokens})")
    if a.output_tokens < 4:
        p.error(f"--output-tokens: SGLang's benchmark needs >= 4, got {a.output_tokens}")
    longest = a.max_prompt_tokens + a.output_tokens
    if a.chunked_prefill_size is None:
        a.chunked_prefill_size = a.max_prompt_tokens + 256
    if a.max_total_tokens is None:
        a.max_total_tokens = 2 * longest + 1024
    if a.max_total_tokens < longest:
        p.error(f"--max-total-tokens: must hold the longest request ({longest} tokens), got {a.max_total_tokens}")
    return a


def bench_argv(system: str, a: argparse.Namespace, dataset: Path, result: Path) -> list[str]:
    context = a.max_prompt_tokens + a.output_tokens + 64
    flags = [
        "--model-path", str(C.model_dir(a)), "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
        "--num-prompts", str(a.num_prompts), "--sharegpt-output-len", str(a.output_tokens),
        "--sharegpt-context-len", str(context), "--result-filename", str(result), "--skip-warmup",
        "--dtype", a.dtype, "--context-length", str(context), "--max-total-tokens", str(a.max_total_tokens),
        "--max-running-requests", str(a.max_running_requests), "--chunked-prefill-size", str(a.chunked_prefill_size),
        "--max-prefill-tokens", str(a.chunked_prefill_size),
        "--seed", str(a.seed), *C.extra_flags(a.server_arg),
    ]
    if not C.has_gpu():
        flags += ["--device", "cpu", "--mem-fraction-static", "0.05", "--disable-cuda-graph"]
    if system == "stock":
        if not C.has_gpu():
            flags += ["--attention-backend", "torch_native"]
        return [sys.executable, "-m", "sglang.benchmark.offline_throughput", *flags]
    return [sys.executable, "-m", "sglang_mux.offline_throughput", *flags, "--radix-cache-backend", "mux",
            "--attention-backend", "mux", "--page-size", str(a.mux_page_size), *C.mux_flags(a)]


def run_system(system: str, a: argparse.Namespace, dataset: Path) -> dict:
    result = a.out / f"{system}_result.jsonl"
    result.unlink(missing_ok=True)
    log = a.out / f"{system}.log"
    argv = bench_argv(system, a, dataset, result)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("SGLANG_MUX_CONFIG", None)
    if not C.has_gpu():
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    if system == "stock":
        env["SGLANG_PLUGINS"] = "__stock_sglang__"  # load no plugin at all
    C.progress(f"running {system}: {' '.join(argv[1:])}")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{system}: no result within --timeout {a.timeout}s; log: {log}") from None
        finally:
            if proc.poll() is None:  # timeout or SIGTERM: stop the benchmark and its scheduler processes
                os.killpg(proc.pid, 9)
                proc.wait()
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if rc != 0 or not result.exists():
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{system}: benchmark exited with {rc}; log {log}:\n{tail}")
    rec = json.loads(result.read_text().splitlines()[-1])
    running = [int(m) for m in RUNNING_RE.findall(text)]
    out = {"result": rec, "wall_s": wall, "argv": argv[1:], "log": str(log),
           "max_running_requests_logged": max(running) if running else None,
           "retraction_log_lines": len(RETRACT_RE.findall(text))}
    C.progress(f"{system}: output throughput {rec['output_throughput']:.2f} tok/s, "
               f"max #running-req {out['max_running_requests_logged']}, wall {wall:.0f}s")
    return out


def summary_line(a, systems: dict) -> str:
    parts = [f"{n} {r['result']['output_throughput']:.2f} out tok/s (max {r['max_running_requests_logged']} running)"
             for n, r in systems.items()]
    ratio = ""
    if len(systems) == 2:
        ratio = f" | mux/stock output throughput {_ratio(systems):.2f}x"
    return (f"SUMMARY offline_throughput | {a.num_prompts} prompts {a.min_prompt_tokens}-{a.max_prompt_tokens} tokens, "
            f"{a.output_tokens} out, max-total-tokens {a.max_total_tokens}: " + "; ".join(parts) + ratio)


def _ratio(systems: dict) -> float:
    return systems["mux"]["result"]["output_throughput"] / systems["stock"]["result"]["output_throughput"]


def plot(a, systems: dict, path: Path) -> None:
    names = list(systems)
    fig, axes = C.figure(1, 2, figsize=(9, 3.8))
    vals = [systems[n]["result"]["output_throughput"] for n in names]
    axes[0].bar(names, vals, color=["tab:blue", "tab:orange"][: len(names)])
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("Offline output throughput")
    run = [systems[n]["max_running_requests_logged"] or 0 for n in names]
    axes[1].bar(names, run, color=["tab:blue", "tab:orange"][: len(names)])
    axes[1].set_ylabel("max concurrent decoding requests")
    axes[1].set_title(f"same device capacity: {a.max_total_tokens} tokens")
    fig.suptitle(f"{a.num_prompts} prompts of {a.min_prompt_tokens}-{a.max_prompt_tokens} tokens, "
                 f"{a.output_tokens} output tokens each")
    C.save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    C.stop_cleanly_on_sigterm()
    a.out.mkdir(parents=True, exist_ok=True)
    dataset = a.out / "long_dataset.json"
    C.progress(f"writing {a.num_prompts} prompts of {a.min_prompt_tokens}-{a.max_prompt_tokens} tokens to {dataset}")
    lengths = C.write_long_dataset(dataset, num=a.num_prompts, min_tokens=a.min_prompt_tokens,
                                   max_tokens=a.max_prompt_tokens, output_tokens=a.output_tokens, seed=a.seed,
                                   model_path=C.model_dir(a))
    systems = {s: run_system(s, a, dataset) for s in a.systems}
    payload = {"benchmark": "offline_throughput", "machine": C.machine_info(), "config": {
        "num_prompts": a.num_prompts, "prompt_tokens": lengths, "output_tokens": a.output_tokens,
        "max_total_tokens": a.max_total_tokens, "max_running_requests": a.max_running_requests,
        "mux_budget": a.mux_budget, "mux_page_size": a.mux_page_size, "mux_mode": a.mux_mode, "dtype": a.dtype},
        "systems": systems}
    if len(systems) == 2:
        payload["mux_over_stock_output_throughput"] = _ratio(systems)
    payload["summary"] = summary_line(a, systems)
    C.write_result(a.out, "offline_throughput", payload)
    if not a.no_plot:
        plot(a, systems, a.out / "offline_throughput.png")
    C.print_table([("system", 6, lambda r: r["system"]),
                   ("out tok/s", 10, lambda r: f"{r['result']['output_throughput']:.2f}"),
                   ("total tok/s", 12, lambda r: f"{r['result']['total_throughput']:.1f}"),
                   ("latency s", 10, lambda r: f"{r['result']['total_latency']:.1f}"),
                   ("max running", 12, lambda r: str(r["max_running_requests_logged"]))],
                  [dict(r, system=n) for n, r in systems.items()])
    print(payload["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
