"""Decode latency vs context length: stock SGLang (torch_native) against mux at a fixed budget, one run.

    .venv/bin/python benchmark/decode_latency.py --out benchmark/out/decode_latency
    .venv/bin/python benchmark/decode_latency.py --contexts 1K,4K --batches 1 --repeats 1 --output-tokens 16

For each system (started here, one at a time, on a free port, with the same SGLang flags): a random prefix of
``context - 32`` tokens per context length is prefilled once (one-token requests, not timed; the radix cache keeps
it), then for each (repeat, batch, context) ``batch`` requests of that prefix plus 32 request-specific tokens
stream ``--output-tokens`` tokens at the same time. The time per decode step is measured from client-side stream timestamps while every
request of the batch is decoding (see common.decode_time_per_token). Repeats are the outer loop (every length
once per repeat); a point's TPOT is the median over repeats, and its growth is the median over repeats of
TPOT(ctx) / TPOT(smallest ctx) within the same repeat (robust to slow drifts in machine load). Stock and mux get the very same prompts. Every request still attends over its whole context: stock
reads all of it, mux reads the pages its router picks (at most budget / page size + 1 per layer).

Prints TPOT(ctx)/TPOT(smallest ctx) for both systems and the mux/stock ratio per length, then one summary line.
Writes decode_latency.json and decode_latency.png under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SUFFIX_TOKENS = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=C.positive_ints, default=C.positive_ints("1K,2K,4K,7K"),
                   help="context lengths in tokens, comma-separated, K suffix allowed (default 1K,2K,4K,7K: the default model's context is 8K; 16K-32K need --model-path tiny)")
    p.add_argument("--batches", type=C.positive_ints, default=[1, 4], help="batch sizes (default 1,4)")
    p.add_argument("--output-tokens", type=C.positive_int, default=64, help="decode steps timed per request")
    p.add_argument("--repeats", type=C.positive_int, default=3, help="repeats per point (median reported)")
    C.add_run_args(p, "decode_latency", default_mode="keep")
    a = p.parse_args(argv)
    if min(a.contexts) <= SUFFIX_TOKENS:
        p.error(f"--contexts: every context must be > {SUFFIX_TOKENS} tokens, got {min(a.contexts)}")
    if a.output_tokens < 4:
        p.error(f"--output-tokens: must be >= 4 (time per token needs several tokens), got {a.output_tokens}")
    a.contexts = sorted(set(a.contexts))
    a.batches = sorted(set(a.batches))
    return a


def case_prompts(ctx: int, batch: int, rep: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """(prefix of the context, one prompt per batch member); identical for every system.

    The prefix depends on the context only (it is prefilled once and stays cached); the 32-token suffixes
    depend on (context, batch, repeat, member), so no two timed requests are the same."""
    prefix = C.prompt_ids(ctx - SUFFIX_TOKENS, seed=C.stable_seed(seed, "prefix", ctx))
    prompts = [prefix + C.prompt_ids(SUFFIX_TOKENS, seed=C.stable_seed(seed, "suffix", ctx, batch, rep, i))
               for i in range(batch)]
    return prefix, prompts


def run_system(system: str, a: argparse.Namespace) -> dict:
    flags = C.server_flags(a, context_length=max(a.contexts) + a.output_tokens + 64,
                           max_running=max(a.batches), chunked_prefill=16384)
    raw: dict = {(b, c): [] for b in a.batches for c in a.contexts}
    mux_stats = None
    with C.start_server(system, flags, a) as srv:
        # Untimed warm-up at the largest batch: the first requests after start-up pay one-off costs.
        C.concurrent_streams(srv.url, [C.prompt_ids(256, seed=C.stable_seed(a.seed, "warm", i))
                                       for i in range(max(a.batches))], 8)
        # Prefill every prefix once (untimed); the radix cache keeps them, so each timed batch only prefills its
        # 32-token suffixes. Prefill is not what this benchmark measures, and on CPU it dominates wall time.
        for ctx in a.contexts:
            prefix, _ = case_prompts(ctx, 1, 0, a.seed)
            warm = C.stream_generate(srv.url, prefix, 1)
            if warm.error:
                raise RuntimeError(f"{system}: prefill of the {ctx}-token prefix failed: {warm.error}")
            C.progress(f"{system}: prefilled the {ctx}-token prefix in {warm.end - warm.sent:.1f}s")
        # Repeats are the outer loop, so a burst of load from other processes hits every length of one repeat
        # rather than every repeat of one length; growth ratios are taken within a repeat.
        for rep in range(a.repeats):
            for batch in a.batches:
                for ctx in a.contexts:
                    _, prompts = case_prompts(ctx, batch, rep, a.seed)
                    res = C.concurrent_streams(srv.url, prompts, a.output_tokens + 8)
                    errs = [r.error for r in res if r.error]
                    if errs:
                        raise RuntimeError(f"{system}: ctx={ctx} batch={batch}: {errs[0]}")
                    tpot, n = C.decode_time_per_token(res)
                    cached = min(int(r.meta.get("cached_tokens") or 0) for r in res)
                    raw[(batch, ctx)].append({"tpot_s": tpot, "steps": n, "ttft_s": C.median([r.ttft for r in res]),
                                              "min_cached_tokens": cached})
                    C.progress(f"{system} rep={rep} batch={batch} ctx={ctx}: {tpot * 1e3:.2f} ms/step over {n} "
                               f"steps (cached prefix {cached} tokens)")
        points = {}
        for (batch, ctx), reps in raw.items():
            base = raw[(batch, a.contexts[0])]
            points[f"{batch}:{ctx}"] = {
                "batch": batch, "context": ctx, "tpot_s": C.median([r["tpot_s"] for r in reps]),
                "tpot_repeats_s": [r["tpot_s"] for r in reps], "steps_timed": [r["steps"] for r in reps],
                "ttft_after_prefix_s": C.median([r["ttft_s"] for r in reps]),
                "min_cached_tokens": min(r["min_cached_tokens"] for r in reps),
                "growth_repeats": [r["tpot_s"] / b["tpot_s"] for r, b in zip(reps, base)],
                "growth": C.median([r["tpot_s"] / b["tpot_s"] for r, b in zip(reps, base)]),
            }
        if system == "mux":
            mux_stats = C.get_json(srv.url, "/mux/stats")["mux"]
    return {"points": points, "mux_stats": mux_stats, "flags": flags + (C.mux_flags(a) if system == "mux" else [])}


def analyse(a: argparse.Namespace, systems: dict) -> dict:
    """Growth TPOT(ctx)/TPOT(smallest) per system and batch, and mux/stock per point."""
    table = []
    base_ctx = a.contexts[0]
    for batch in a.batches:
        for ctx in a.contexts:
            row = {"batch": batch, "context": ctx}
            for name, res in systems.items():
                pt = res["points"][f"{batch}:{ctx}"]
                row[f"{name}_tpot_ms"] = pt["tpot_s"] * 1e3
                row[f"{name}_growth"] = pt["growth"]  # median over repeats of TPOT(ctx)/TPOT(base) in that repeat
            if "stock" in systems and "mux" in systems:
                row["mux_over_stock"] = row["mux_tpot_ms"] / row["stock_tpot_ms"]
            table.append(row)
    return {"table": table, "base_context": base_ctx}


def print_table(a, analysis: dict, systems: dict) -> None:
    cols = [("batch", 5, lambda r: r["batch"]), ("ctx", 7, lambda r: r["context"])]
    for n in systems:
        cols += [(n + " ms/step", 15, lambda r, n=n: f"{r[n + '_tpot_ms']:.2f}"),
                 (n + " growth", 13, lambda r, n=n: f"{r[n + '_growth']:.2f}x")]
    C.print_table(cols + C.mux_over_stock_column(systems), analysis["table"])


def summary_line(a, analysis: dict, systems: dict) -> str:
    top, base = a.contexts[-1], a.contexts[0]
    parts = []
    for batch in a.batches:
        row = next(r for r in analysis["table"] if r["batch"] == batch and r["context"] == top)
        g = " ".join(f"{n} {row[n + '_growth']:.2f}x" for n in systems)
        ratio = f", mux/stock {row['mux_over_stock']:.2f}x" if "mux_over_stock" in row else ""
        parts.append(f"batch {batch}: TPOT {C.k_label(top)}/{C.k_label(base)} {g}{ratio}")
    return "SUMMARY decode_latency | " + " | ".join(parts)


def plot(a, systems: dict, path: Path) -> None:
    fig, axes = C.figure(1, len(a.batches), figsize=(5.5 * len(a.batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], a.batches):
        for name, res in systems.items():
            ys = [res["points"][f"{batch}:{c}"]["tpot_s"] * 1e3 for c in a.contexts]
            label = "stock SGLang (torch_native)" if name == "stock" else f"mux (budget {a.mux_budget}, {a.mux_mode})"
            ax.plot(a.contexts, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(a.contexts, [C.k_label(c) for c in a.contexts])
        C.finish_axes(ax, "context length (tokens)", "time per decode step (ms)", title=f"batch {batch}")
    fig.suptitle("Decode latency vs context (median of repeats)")
    C.save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    C.stop_cleanly_on_sigterm()
    systems = {}
    for system in a.systems:
        systems[system] = run_system(system, a)
    analysis = analyse(a, systems)
    payload = {"benchmark": "decode_latency", "machine": C.machine_info(), "config": {
        "contexts": a.contexts, "batches": a.batches, "output_tokens": a.output_tokens, "repeats": a.repeats,
        "mux_budget": a.mux_budget, "mux_page_size": a.mux_page_size, "mux_mode": a.mux_mode, "dtype": a.dtype,
        "suffix_tokens": SUFFIX_TOKENS, "mux_flags": C.mux_flags(a)}, "systems": systems, **analysis}
    payload["summary"] = summary_line(a, analysis, systems)
    C.write_result(a.out, "decode_latency", payload)
    if not a.no_plot:
        plot(a, systems, a.out / "decode_latency.png")
    print_table(a, analysis, systems)
    print(payload["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
