"""Goodput on a synthetic arrival trace with mixed prompt lengths: stock SGLang against mux, one run.

    .venv/bin/python benchmark/goodput.py --out benchmark/out/goodput
    .venv/bin/python benchmark/goodput.py --num-requests 6 --mix 512:0.5,2K:0.5 --rate 1 --output-tokens 16

A seeded trace: ``--num-requests`` requests arriving as a Poisson process of ``--rate`` requests/s, each with a
prompt length drawn from ``--mix`` (LENGTH:WEIGHT,...) and ``--output-tokens`` output tokens. Each system is
started here (one at a time, same SGLang flags) and replays the same trace: every request is sent at its
arrival time and streamed. Per request: TTFT (send to first token) and TPOT ((last - first token) / (tokens - 1)).
Reports P50/P95 of both, and goodput: the fraction of requests that meet both SLOs (--slo-ttft, --slo-tpot) and
that count per second of trace. Prints one summary line last; writes goodput.json and goodput.png under --out.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def parse_mix(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        length, sep, weight = part.strip().partition(":")
        try:
            n = C.positive_ints(length)[0]
            w = float(weight) if sep else 1.0
        except (argparse.ArgumentTypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected LENGTH:WEIGHT,... (e.g. 1K:0.5,16K:0.5), got {text!r}") from None
        if w <= 0:
            raise argparse.ArgumentTypeError(f"weights must be > 0, got {text!r}")
        out.append((n, w))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=C.positive_int, default=24)
    p.add_argument("--rate", type=C.positive_float, default=0.25, help="mean arrivals per second (Poisson)")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("1K:0.5,4K:0.3,16K:0.2"),
                   help="prompt lengths and weights, LENGTH:WEIGHT,... (default 1K:0.5,4K:0.3,16K:0.2)")
    p.add_argument("--output-tokens", type=C.positive_int, default=64)
    p.add_argument("--slo-ttft", type=C.positive_float, default=10.0, help="TTFT SLO in seconds")
    p.add_argument("--slo-tpot", type=C.positive_float, default=0.1, help="TPOT SLO in seconds")
    p.add_argument("--max-running-requests", type=C.positive_int, default=16)
    C.add_run_args(p, "goodput", default_mode="keep")
    a = p.parse_args(argv)
    if a.output_tokens < 2:
        p.error(f"--output-tokens: TPOT needs >= 2 tokens, got {a.output_tokens}")
    return a


def make_trace(a: argparse.Namespace) -> list[dict]:
    rng = random.Random(C.stable_seed(a.seed, "trace"))
    lengths, weights = zip(*a.mix)
    t, trace = 0.0, []
    for i in range(a.num_requests):
        ctx = rng.choices(lengths, weights)[0]
        trace.append({"arrival_s": t, "prompt_tokens": ctx, "seed": C.stable_seed(a.seed, "goodput", i)})
        t += rng.expovariate(a.rate)
    return trace


def percentile(vals: list[float], q: float) -> float:
    if not vals:
        return float("nan")
    s = sorted(vals)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def replay(srv, trace: list[dict], a: argparse.Namespace) -> list[dict]:
    results: list[dict] = [{} for _ in trace]
    prompts = [C.prompt_ids(r["prompt_tokens"], r["seed"]) for r in trace]

    def run(i: int) -> None:
        res = C.stream_generate(srv.url, prompts[i], a.output_tokens)
        row = {"prompt_tokens": trace[i]["prompt_tokens"], "error": res.error}
        if not res.error:
            row["ttft_s"] = res.ttft
            n = res.tokens[-1] - res.tokens[0]
            row["tpot_s"] = (res.end - res.times[0]) / n if n > 0 else float("nan")
        results[i] = row

    results_duration = C.at_arrivals([r["arrival_s"] for r in trace], run)
    for r in results:
        r["trace_duration_s"] = results_duration
    return results


def score(rows: list[dict], a: argparse.Namespace) -> dict:
    ok = [r for r in rows if not r["error"]]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok]
    good = [r for r in ok if r["ttft_s"] <= a.slo_ttft and r["tpot_s"] <= a.slo_tpot]
    dur = rows[0]["trace_duration_s"] if rows else float("nan")
    return {"requests": len(rows), "errors": len(rows) - len(ok),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "tpot_p50_s": percentile(tpot, 0.5), "tpot_p95_s": percentile(tpot, 0.95),
            "slo_fraction": len(good) / len(rows) if rows else float("nan"),
            "goodput_req_per_s": len(good) / dur if dur else float("nan"), "duration_s": dur}


def plot(a, systems: dict, path: Path) -> None:
    fig, axes = C.figure(1, 2, figsize=(10, 4))
    for name, res in systems.items():
        ok = [r for r in res["requests"] if not r["error"]]
        axes[0].scatter([r["prompt_tokens"] for r in ok], [r["ttft_s"] for r in ok], label=name, alpha=0.7)
        axes[1].scatter([r["prompt_tokens"] for r in ok], [r["tpot_s"] * 1e3 for r in ok], label=name, alpha=0.7)
    axes[0].axhline(a.slo_ttft, color="gray", linestyle="--", label="SLO")
    axes[1].axhline(a.slo_tpot * 1e3, color="gray", linestyle="--", label="SLO")
    for ax, ylabel in zip(axes, ("TTFT (s)", "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        C.finish_axes(ax, "prompt tokens", ylabel, y_from_zero=False)
    fig.suptitle(f"Goodput trace: {a.num_requests} requests at {a.rate}/s")
    C.save_figure(fig, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    C.stop_cleanly_on_sigterm()
    trace = make_trace(a)
    longest = max(r["prompt_tokens"] for r in trace)
    systems = {}
    for system in a.systems:
        flags = C.server_flags(a, context_length=longest + a.output_tokens + 64, max_running=a.max_running_requests)
        with C.start_server(system, flags, a) as srv:
            rows = replay(srv, trace, a)
        systems[system] = {"requests": rows, **score(rows, a),
                           "flags": flags + (C.mux_flags(a) if system == "mux" else [])}
        s = systems[system]
        C.progress(f"{system}: TTFT p50 {s['ttft_p50_s']:.2f}s p95 {s['ttft_p95_s']:.2f}s, TPOT p50 "
                   f"{s['tpot_p50_s'] * 1e3:.1f}ms p95 {s['tpot_p95_s'] * 1e3:.1f}ms, SLO met {s['slo_fraction']:.0%}")
    payload = {"benchmark": "goodput", "machine": C.machine_info(), "config": {
        "num_requests": a.num_requests, "rate": a.rate, "mix": a.mix, "output_tokens": a.output_tokens,
        "slo_ttft_s": a.slo_ttft, "slo_tpot_s": a.slo_tpot, "mux_budget": a.mux_budget, "mux_mode": a.mux_mode,
        "dtype": a.dtype}, "trace": trace, "systems": systems}
    payload["summary"] = "SUMMARY goodput | " + "; ".join(
        f"{n}: TTFT p50/p95 {s['ttft_p50_s']:.2f}/{s['ttft_p95_s']:.2f}s, TPOT p50/p95 {s['tpot_p50_s'] * 1e3:.1f}/"
        f"{s['tpot_p95_s'] * 1e3:.1f}ms, {s['slo_fraction']:.0%} meet both SLOs" for n, s in systems.items())
    C.write_result(a.out, "goodput", payload)
    if not a.no_plot:
        plot(a, systems, a.out / "goodput.png")
    def secs(key):
        return lambda r: f"{r[key]:.2f}s"

    def ms(key):
        return lambda r: f"{r[key] * 1e3:.1f}ms"

    C.print_table([("system", 6, lambda r: r["system"]), ("TTFT p50", 9, secs("ttft_p50_s")),
                   ("TTFT p95", 9, secs("ttft_p95_s")), ("TPOT p50", 9, ms("tpot_p50_s")), ("TPOT p95", 9, ms("tpot_p95_s")),
                   ("SLO met", 8, lambda r: f"{r['slo_fraction']:.0%}"), ("errors", 6, lambda r: r["errors"])],
                  [dict(s, system=n) for n, s in systems.items()])
    print(payload["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
