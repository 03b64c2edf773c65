"""Prefill latency (TTFT) vs prompt length: stock SGLang against mux with sparse prefill, one run.

    .venv/bin/python benchmark/prefill_latency.py --out benchmark/out/prefill_latency
    .venv/bin/python benchmark/prefill_latency.py --lengths 1K,4K --repeats 1 --model-path python/sglang_mux/models/tiny

For each system (started here, one at a time, on a free port, with the same SGLang flags): an untimed warm-up,
then for each (repeat, length) one fresh random prompt of that length (the same prompts for both systems, never
a prefix of another, so nothing comes from the radix cache) asks for one output token; its TTFT is the time from
sending to the first streamed token. The mux server prefills prompts of at least ``--sparse-min-tokens`` tokens
with block-sparse attention (``--mux-sparse-prefill-*``); shorter ones exactly. A point's TTFT is the median over
repeats; the mux/stock ratio is taken per repeat (robust to slow drifts in machine load) and its median reported.

Prints TTFT per length for both systems and the mux/stock ratio, then one summary line. Writes
prefill_latency.json and prefill_latency.png under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def _keep(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < val <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return val


def _tokens(text: str) -> int:
    """One positive token count, K suffix allowed (``4K``)."""
    vals = C.positive_ints(text)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer (K suffix allowed), got {text!r}")
    return vals[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=C.positive_ints, default=C.positive_ints("1K,2K,4K,7K"),
                   help="prompt lengths in tokens, comma-separated, K suffix allowed (default 1K,2K,4K,7K)")
    p.add_argument("--repeats", type=C.positive_int, default=2, help="prompts per length (median reported)")
    p.add_argument("--sparse-min-tokens", type=_tokens, default=1024,
                   help="mux prefills prompts of at least this many tokens sparsely (--mux-sparse-prefill-min-tokens)")
    p.add_argument("--sparse-keep", type=_keep, default=None,
                   help="--mux-sparse-prefill-keep for the mux server (default: the server's)")
    p.add_argument("--sparse-block", type=C.positive_int, default=None,
                   help="--mux-sparse-prefill-block for the mux server (default: the server's)")
    p.add_argument("--chunked-prefill-size", type=C.positive_int, default=16384,
                   help="SGLang --chunked-prefill-size for both servers (default 16384)")
    C.add_run_args(p, "prefill_latency", default_mode="keep")
    a = p.parse_args(argv)
    if min(a.lengths) < 16:
        p.error(f"--lengths: every prompt must have at least 16 tokens, got {min(a.lengths)}")
    if a.sparse_block is not None and (a.sparse_block < 8 or a.sparse_block > 1024 or a.sparse_block & (a.sparse_block - 1)):
        p.error(f"--sparse-block: must be a power of two in [8, 1024], got {a.sparse_block}")
    a.lengths = sorted(set(a.lengths))
    return a


def sparse_flags(a: argparse.Namespace) -> list[str]:
    """The mux server's sparse-prefill flags (added to its --mux-arg list)."""
    flags = [f"--mux-sparse-prefill-min-tokens={a.sparse_min_tokens}"]
    if a.sparse_keep is not None:
        flags.append(f"--mux-sparse-prefill-keep={a.sparse_keep}")
    if a.sparse_block is not None:
        flags.append(f"--mux-sparse-prefill-block={a.sparse_block}")
    return flags


def prompt_for(length: int, rep: int, seed: int) -> list[int]:
    return C.prompt_ids(length, seed=C.stable_seed(seed, "prefill", length, rep))


def run_system(system: str, a: argparse.Namespace) -> dict:
    flags = C.server_flags(a, context_length=max(a.lengths) + 64, max_running=1,
                           chunked_prefill=a.chunked_prefill_size)
    ttft: dict[int, list[float]] = {n: [] for n in a.lengths}
    with C.start_server(system, flags, a) as srv:
        warm = C.stream_generate(srv.url, C.prompt_ids(256, seed=C.stable_seed(a.seed, "warm")), 2)
        if warm.error:
            raise RuntimeError(f"{system}: warm-up failed: {warm.error}")
        for rep in range(a.repeats):
            for n in a.lengths:
                res = C.stream_generate(srv.url, prompt_for(n, rep, a.seed), 1)
                if res.error:
                    raise RuntimeError(f"{system}: length {n} repeat {rep}: {res.error}")
                cached = int(res.meta.get("cached_tokens") or 0)
                ttft[n].append(res.ttft)
                C.progress(f"{system} rep={rep} length={n}: TTFT {res.ttft:.2f}s (cached {cached} tokens)")
    points = {str(n): {"length": n, "ttft_s": C.median(v), "ttft_repeats_s": v} for n, v in ttft.items()}
    return {"points": points, "flags": flags + (C.mux_flags(a) if system == "mux" else [])}


def analyse(a: argparse.Namespace, systems: dict) -> dict:
    table = []
    for n in a.lengths:
        row = {"length": n, "sparse": n >= a.sparse_min_tokens}
        for name, res in systems.items():
            row[f"{name}_ttft_s"] = res["points"][str(n)]["ttft_s"]
        if "stock" in systems and "mux" in systems:
            per_rep = [m / s for m, s in zip(systems["mux"]["points"][str(n)]["ttft_repeats_s"],
                                             systems["stock"]["points"][str(n)]["ttft_repeats_s"])]
            row["mux_over_stock"] = C.median(per_rep)
            row["mux_over_stock_repeats"] = per_rep
        table.append(row)
    return {"table": table}


def print_table(analysis: dict, systems: dict) -> None:
    cols = [("length", 7, lambda r: r["length"]), ("sparse", 6, lambda r: "yes" if r["sparse"] else "no")]
    cols += [(n + " TTFT s", 13, lambda r, n=n: f"{r[n + '_ttft_s']:.3f}") for n in systems]
    C.print_table(cols + C.mux_over_stock_column(systems), analysis["table"])


def summary_line(a, analysis: dict, systems: dict) -> str:
    row = analysis["table"][-1]
    parts = [f"{n} {row[n + '_ttft_s']:.2f}s" for n in systems]
    ratio = f", mux/stock {C.fmt_ratio(row.get('mux_over_stock'))}" if "mux_over_stock" in row else ""
    return f"SUMMARY prefill_latency | TTFT at {row['length']} tokens: " + " ".join(parts) + ratio


def plot(a, systems: dict, analysis: dict, path: Path) -> None:
    fig, ax = C.figure(figsize=(6, 4))
    for name, res in systems.items():
        ys = [res["points"][str(n)]["ttft_s"] for n in a.lengths]
        label = "stock SGLang" if name == "stock" else f"mux, sparse prefill from {a.sparse_min_tokens} tokens"
        ax.plot(a.lengths, ys, marker="o", label=label)
    C.finish_axes(ax, "prompt length (tokens)", "TTFT (s)", title="Prefill latency vs prompt length (median of repeats)")
    C.save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.mux_arg = list(a.mux_arg) + sparse_flags(a)
    C.stop_cleanly_on_sigterm()
    systems = {system: run_system(system, a) for system in a.systems}
    analysis = analyse(a, systems)
    payload = {"benchmark": "prefill_latency", "machine": C.machine_info(), "config": {
        "lengths": a.lengths, "repeats": a.repeats, "sparse_min_tokens": a.sparse_min_tokens,
        "chunked_prefill_size": a.chunked_prefill_size, "dtype": a.dtype, "model_path": a.model_path,
        "mux_flags": C.mux_flags(a)}, "systems": systems, **analysis}
    payload["summary"] = summary_line(a, analysis, systems)
    C.write_result(a.out, "prefill_latency", payload)
    if not a.no_plot:
        plot(a, systems, analysis, a.out / "prefill_latency.png")
    print_table(analysis, systems)
    print(payload["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
