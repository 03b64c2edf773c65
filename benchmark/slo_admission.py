"""SLO-aware admission (``--mux-slo-policy``) on one arrival trace: off vs queue vs shrink, TPOT and TTFT per request.

    .venv/bin/python benchmark/slo_admission.py --mux-slo-tpot 60            # SmolLM2, 24 requests at 3 req/s
    .venv/bin/python benchmark/slo_admission.py --model tiny --requests 12 --mux-slo-tpot 20

For each policy a mux server is started (``--mux-budget``, same flags otherwise), the same Poisson trace (mixed
prompt lengths, streamed) is replayed (one policy after the other, or with ``--together`` to all at the same time), and per request the client's TTFT and TPOT are recorded; the summary gives
TPOT / TTFT percentiles, the share of requests whose TPOT met the objective, and the server's admission counters
(``slo_deferred_requests``, ``slo_shrunk_requests``, the fitted step model). Writes
``benchmark/results/slo_admission.json`` and prints a table (docs/pd.md quotes it).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark"))
sys.path.insert(0, str(ROOT / "python"))

from common import at_arrivals, machine_info, progress, prompt_ids, write_result  # noqa: E402
from goodput_pd import make_trace, pct, stream_once  # noqa: E402

POLICIES = ("off", "queue", "shrink")
COMMON = ["--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "65536", "--log-level", "warning"]


def replay(url: str, trace) -> list[dict]:
    records: list = [None] * len(trace)

    def run(i: int, n: int, m: int) -> None:
        records[i] = {"prompt_tokens": n, "output_tokens": m,
                      **stream_once(url, prompt_ids(n, seed=9000 + i), m, lambda: None)}

    at_arrivals([at for at, _, _ in trace], lambda i: run(i, *trace[i][1:]))
    return records


def summarize(records: list[dict], slo_tpot: float) -> dict:
    ok = [r for r in records if not r["error"]]
    tp = [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "tpot_p50_ms": pct(tp, 0.5), "tpot_p95_ms": pct(tp, 0.95), "tpot_max_ms": max(tp) if tp else None,
        "tpot_met": sum(1 for v in tp if v <= slo_tpot) / len(records),
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p95_ms": pct(ttft, 0.95),
    }


def main(argv: list[str] | None = None) -> int:
    import requests

    from sglang_mux.server_process import ServerProcess

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=3.0, help="Poisson arrival rate, requests per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mux-budget", type=int, default=512)
    p.add_argument("--mux-slo-tpot", type=float, required=True, help="the TPOT objective, ms")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmark" / "results")
    p.add_argument("--together", action="store_true",
                   help="start every policy's server at once and replay the trace to all at the same time (a "
                        "shared, busy machine then loads them alike)")
    args = p.parse_args(argv)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    bad = [s for s in policies if s not in POLICIES]
    if bad:
        p.error(f"--policies: allowed: {', '.join(POLICIES)}; got {bad}")
    if not args.mux_slo_tpot > 0:
        p.error(f"--mux-slo-tpot: must be a positive number of milliseconds, got {args.mux_slo_tpot}")

    trace = make_trace(args.requests, args.rate, args.seed, short=(32, 256), long=(1024, 2048), long_frac=0.3,
                       out=(32, 64))
    result = {"machine": machine_info(), "model": args.model, "slo_tpot_ms": args.mux_slo_tpot,
              "trace": {"requests": len(trace), "rate": args.rate, "seed": args.seed}, "policies": {}}
    def flags(policy: str) -> list[str]:
        return COMMON + ["--model-path", args.model, "--mux-budget", str(args.mux_budget),
                         "--mux-slo-tpot", str(args.mux_slo_tpot), "--mux-slo-policy", policy]

    def record(policy: str, recs: list, url: str) -> None:
        stats = requests.get(url + "/mux/stats", timeout=60).json()["mux"]
        result["policies"][policy] = {"summary": summarize(recs, args.mux_slo_tpot), "requests": recs,
                                      "server": {k: v for k, v in stats.items() if k.startswith("slo_")}}

    result["together"] = args.together
    if args.together:  # every policy's server up at once, the trace replayed to all at the same time
        with contextlib.ExitStack() as stack:
            servers = {}
            for policy in policies:
                progress(f"policy {policy}: starting the server")
                servers[policy] = stack.enter_context(ServerProcess(flags(policy)))
                stream_once(servers[policy].url, prompt_ids(64, seed=1), 8, lambda: None)  # warm-up
            progress(f"replaying {len(trace)} requests to {', '.join(policies)} at once")
            out: dict = {}
            threads = [threading.Thread(target=lambda p=p: out.__setitem__(p, replay(servers[p].url, trace)))
                       for p in policies]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            for policy in policies:
                record(policy, out[policy], servers[policy].url)
        write_result(args.out, "slo_admission", result)
    for policy in [] if args.together else policies:
        progress(f"policy {policy}: starting the server")
        with ServerProcess(flags(policy)) as srv:
            stream_once(srv.url, prompt_ids(64, seed=1), 8, lambda: None)  # warm-up (and the first timed steps)
            progress(f"policy {policy}: replaying {len(trace)} requests")
            record(policy, replay(srv.url, trace), srv.url)
        write_result(args.out, "slo_admission", result)

    print(f"\n{len(trace)} requests at {args.rate} req/s on {args.model}, TPOT objective {args.mux_slo_tpot:g} ms")
    print(f"{'policy':7s} {'TPOT p50':>9s} {'TPOT p95':>9s} {'TPOT max':>9s} {'TPOT met':>9s} {'TTFT p50':>9s} "
          f"{'TTFT p95':>9s} {'held':>5s} {'shrunk':>6s}")
    f = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9s}"  # noqa: E731
    for policy, r in result["policies"].items():
        s, srv = r["summary"], r["server"]
        print(f"{policy:7s} {f(s['tpot_p50_ms'])} {f(s['tpot_p95_ms'])} {f(s['tpot_max_ms'])} {s['tpot_met']:9.0%} "
              f"{f(s['ttft_p50_ms'])} {f(s['ttft_p95_ms'])} {srv['slo_deferred_requests']:5d} "
              f"{srv['slo_shrunk_requests']:6d}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    raise SystemExit(main())
