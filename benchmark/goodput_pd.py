"""Goodput under SLOs on a synthetic arrival trace: stock aggregated, stock PD, mux aggregated, mux PD (+ policy).

    .venv/bin/python benchmark/goodput_pd.py                     # all systems, bundled model, CPU settings
    .venv/bin/python benchmark/goodput_pd.py --requests 40 --rate 1.5 --mux-slo-ttft 3000 --mux-slo-tpot 150

One run does, in order:

1. **Costs.** On the mux aggregated server and the mux PD cluster, sequential non-streaming requests measure
   prefill time per prompt token (latency with one output token), one decode step at batch 1 (extra latency per
   extra token) and 4, and the PD overhead (PD minus aggregated latency at the same prompt length); one more
   request per path is held out to check the model. The fitted :class:`RecordedCosts` go to
   ``benchmark/results/pd_costs.json`` (tests read it). ``--costs-only`` records them and stops.
2. **Trace.** Poisson arrivals (``--rate`` req/s, seeded), prompt lengths a mix of short and long, outputs
   short. The same trace is replayed, streaming, against every system; TTFT and TPOT per request as the client
   sees them (through sglang-router the PD stream arrives in bursts: TTFT then includes some decode steps and
   TPOT is small); a request meets the SLO when TTFT <= ``--mux-slo-ttft`` and TPOT <= ``--mux-slo-tpot``
   (errors miss it).
3. **Policy.** ``PlacementPolicy`` on the recorded costs recommends the prefill:decode ratio for the trace
   (stock: whole context on the decode device; mux with ``--mux-drop-cold``: budget + a page), and the
   ``mux_policy`` system sends each request to the mux PD cluster or the mux aggregated server as the policy
   decides from the client-side queue depths (both deployments up at once).

Writes ``benchmark/results/goodput_pd.json`` and prints the table docs/pd.md quotes.
"""

from __future__ import annotations

import argparse
import signal
import contextlib
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark"))
sys.path.insert(0, str(ROOT / "python"))

from common import at_arrivals, machine_info, progress, prompt_ids, write_result  # noqa: E402

COMMON = ["--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "65536", "--log-level", "warning"]
SYSTEMS = ("stock_agg", "stock_pd", "mux_agg", "mux_pd", "mux_policy")


# ------------------------------------------------------------------------------------------- deployments
@contextlib.contextmanager
def deployment(system: str, mux_args: list[str]):
    """Yields {path: url} for the system: 'aggregated' and/or 'pd'."""
    from sglang_mux.disagg.cluster import PDCluster
    from sglang_mux.server_process import ServerProcess

    stock = system.startswith("stock")
    flags = COMMON + ([] if stock else mux_args)
    with contextlib.ExitStack() as stack:
        urls = {}
        if system in ("stock_agg", "mux_agg", "mux_policy"):
            urls["aggregated"] = stack.enter_context(ServerProcess(flags, stock=stock)).url
        if system in ("stock_pd", "mux_pd", "mux_policy"):
            cluster = stack.enter_context(PDCluster(flags, stock=stock))
            urls["pd"] = cluster.url
            urls["decode_server"] = cluster.decode.url
        yield urls


def decode_side_memory(urls: dict) -> dict | None:
    """What the mux decode server's stats say about device KV held by routed requests (None: stock)."""
    import requests

    if "decode_server" not in urls:
        return None
    r = requests.get(urls["decode_server"] + "/mux/stats", timeout=30)
    if r.status_code != 200:
        return None
    st = r.json()["mux"]
    keys = ("max_routed_kv_tokens_held", "dropped_tokens", "routed_request_steps", "exact_request_steps", "budget_tokens")
    return {k: st.get(k) for k in keys}


# --------------------------------------------------------------------------------------------- trace
def make_trace(n: int, rate: float, seed: int, short: tuple[int, int], long: tuple[int, int], long_frac: float,
               out: tuple[int, int]) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        lo, hi = long if rng.random() < long_frac else short
        trace.append((t, rng.randint(lo, hi), rng.randint(*out)))
    return trace


class LoadTracker:
    """Client-side queue depths per path: prompt tokens sent but not started, requests decoding."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queued = {"aggregated": 0, "pd": 0}
        self.running = {"aggregated": 0, "pd": 0}

    def snapshot(self):
        from sglang_mux.router.placement import Load

        with self.lock:
            return Load(aggregated_queued_tokens=self.queued["aggregated"], aggregated_running=self.running["aggregated"],
                        prefill_queued_tokens=self.queued["pd"], decode_running=self.running["pd"])


def stream_once(url: str, ids: list[int], max_new_tokens: int, on_first_token) -> dict:
    """One streaming /generate; ``on_first_token()`` is called when the first output token arrives."""
    import requests

    sp = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    sent, times, counts, error = time.perf_counter(), [], [], None
    try:
        with requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": sp, "stream": True},
                           stream=True, timeout=900) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                for line in r.iter_lines():
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    msg = json.loads(line[5:])
                    if "error" in msg:
                        error = str(msg["error"])[:200]
                        break
                    n = int(msg.get("meta_info", {}).get("completion_tokens", 0))
                    if n and (not counts or n > counts[-1]):
                        if not times:
                            on_first_token()
                        times.append(time.perf_counter())
                        counts.append(n)
    except requests.RequestException as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and (not counts or counts[-1] < max_new_tokens):
        error = f"stream ended after {counts[-1] if counts else 0} of {max_new_tokens} tokens"
    ttft = (times[0] - sent) * 1000 if times else None
    tpot_ms = (times[-1] - times[0]) * 1000 / (counts[-1] - counts[0]) if len(times) > 1 and counts[-1] > counts[0] else None
    return {"ttft_ms": ttft, "tpot_ms": tpot_ms, "error": error}


def replay(urls: dict, trace, policy=None) -> list[dict]:
    """Send every request at its arrival time (one thread each); returns per-request records."""
    tracker = LoadTracker()
    records: list[dict | None] = [None] * len(trace)

    def run(i: int, n: int, m: int) -> None:
        path = policy.decide(n, m, tracker.snapshot()).path if policy is not None else ("pd" if "pd" in urls else "aggregated")
        with tracker.lock:
            tracker.queued[path] += n
        started = []

        def first_token():
            with tracker.lock:
                tracker.queued[path] -= n
                tracker.running[path] += 1
            started.append(True)

        res = stream_once(urls[path], prompt_ids(n, seed=7000 + i), m, first_token)
        with tracker.lock:
            if started:
                tracker.running[path] -= 1
            else:
                tracker.queued[path] -= n
        records[i] = {"prompt_tokens": n, "output_tokens": m, "path": path, **res}

    at_arrivals([at for at, _, _ in trace], lambda i: run(i, *trace[i][1:]))
    return records  # type: ignore[return-value]


def pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    vals = sorted(vals)
    k = (len(vals) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def summarize(records: list[dict], slo) -> dict:
    ttft = [r["ttft_ms"] for r in records if r["ttft_ms"] is not None and not r["error"]]
    tp = [r["tpot_ms"] for r in records if r["tpot_ms"] is not None and not r["error"]]
    met = sum(1 for r in records if not r["error"] and r["ttft_ms"] is not None and r["tpot_ms"] is not None
              and slo.met(r["ttft_ms"], r["tpot_ms"]))
    return {
        "requests": len(records), "errors": sum(1 for r in records if r["error"]),
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p95_ms": pct(ttft, 0.95),
        "tpot_p50_ms": pct(tp, 0.5), "tpot_p95_ms": pct(tp, 0.95),
        "slo_attainment": met / len(records),
        "paths": {p: sum(1 for r in records if r["path"] == p) for p in ("aggregated", "pd")},
    }


# --------------------------------------------------------------------------------------------- costs
def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x, both clipped at 0 (costs)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    b = max(b, 0.0)
    return max(my - b * mx, 0.0), b


def latency_ms(url: str, n: int, m: int, seed: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one non-streaming request (n prompt tokens, m output tokens), ms.

    Non-streaming on purpose: sglang-router's PD stream arrives in bursts, so per-chunk times would not
    separate prefill from decode; end-to-end latencies at two output lengths do.
    """
    import requests

    best = None
    for k in range(repeats):
        body = {"input_ids": prompt_ids(n, seed=seed + k),
                "sampling_params": {"temperature": 0.0, "max_new_tokens": m, "ignore_eos": True}}
        t0 = time.perf_counter()
        r = requests.post(url + "/generate", json=body, timeout=900)
        if r.status_code != 200:
            raise RuntimeError(f"calibration request failed: HTTP {r.status_code}: {r.text[:200]}")
        ms = (time.perf_counter() - t0) * 1000
        best = ms if best is None else min(best, ms)
    return best


def ttft_tpot(url: str, n: int, m: int, seed: int) -> tuple[float, float]:
    """TTFT = latency with one output token; TPOT = extra latency per extra output token."""
    first = latency_ms(url, n, 1, seed)
    full = latency_ms(url, n, m, seed + 500)  # other prompts: a radix-cache hit would skip the prefill
    return first, max(full - first, 0.0) / max(m - 1, 1)


def record_costs(urls: dict, lengths: list[int], held_out: tuple[int, int]) -> dict:
    """Fit RecordedCosts from end-to-end latencies of the mux aggregated server and the mux PD cluster."""
    from common import concurrent_streams, decode_time_per_token

    agg = {n: latency_ms(urls["aggregated"], n, 1, seed=100 + n) for n in lengths}
    pd = {n: latency_ms(urls["pd"], n, 1, seed=100 + n) for n in lengths}
    _, step_short = ttft_tpot(urls["aggregated"], 64, 33, seed=200)
    _, step_long = ttft_tpot(urls["aggregated"], 2048, 33, seed=210)
    # step(context) = fixed + per_ctx * context, context = prompt + half the output (16 here)
    per_ctx = max(step_long - step_short, 0.0) / (2048 - 64)
    step1 = max(step_short - per_ctx * (64 + 16), 0.0)
    batch = concurrent_streams(urls["aggregated"], [prompt_ids(32, seed=300 + i) for i in range(4)], 33)
    step4 = decode_time_per_token([r for r in batch if not r.error])[0] * 1000 - per_ctx * (32 + 16)
    # latency(n, 1 token) = prefill(n) + one step (aggregated); PD adds the transfer and the second hop.
    pre_a, pre_b = _fit(lengths, [agg[n] - step1 for n in lengths])
    tr_a, tr_b = _fit(lengths, [pd[n] - agg[n] for n in lengths])
    out = {"costs": {
        "prefill_fixed_ms": pre_a, "prefill_per_token_ms": pre_b,
        "decode_step_fixed_ms": step1, "decode_step_per_request_ms": max(step4 - step1, 0.0) / 3,
        "transfer_fixed_ms": tr_a, "transfer_per_token_ms": tr_b,
        "device_kv_capacity_tokens": 65536,
        "decode_step_per_context_token_ms": per_ctx,
        "source": "benchmark/goodput_pd.py (mux servers, bundled model, float32, "
                  f"{machine_info()['nproc']} CPU cores, end-to-end latencies)",
    }}
    out["calibration"] = {"lengths": lengths, "aggregated_latency_1_token_ms": agg, "pd_latency_1_token_ms": pd,
                          "step_batch1_ctx80_ms": step_short, "step_batch1_ctx2064_ms": step_long,
                          "step_batch4_ms": step4}
    n, m = held_out
    out["held_out"] = {}
    for path in ("aggregated", "pd"):
        ttft, tp = ttft_tpot(urls[path], n, m, seed=900)
        out["held_out"][path] = [{"prompt_tokens": n, "output_tokens": m, "ttft_ms": ttft, "tpot_ms": tp}]
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from sglang_mux.router.placement import SLO, PlacementPolicy, RecordedCosts, mux_device_kv

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate, requests per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-frac", type=float, default=0.3, help="share of long prompts")
    p.add_argument("--mux-budget", type=int, default=512)
    p.add_argument("--mux-slo-ttft", type=float, default=None, help="ms (default: MuxConfig's)")
    p.add_argument("--mux-slo-tpot", type=float, default=None, help="ms (default: MuxConfig's)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmark" / "results")
    p.add_argument("--costs-only", action="store_true", help="record pd_costs.json and stop")
    p.add_argument("--rescore", action="store_true",
                   help="no servers: re-score the requests recorded in goodput_pd.json at the given SLOs")
    p.add_argument("--plan", action="store_true",
                   help="no servers: the prefill:decode ratio and where PD stops paying for the trace (--requests, "
                        "--rate, --seed, --long-frac) on the recorded costs (--costs), stock and mux")
    p.add_argument("--costs", type=Path, default=None, help="--plan: the costs JSON (default: OUT/pd_costs.json)")
    args = p.parse_args(argv)

    from sglang_mux.config import MuxConfig
    from sglang_mux.disagg.cluster import mooncake_unavailable_reason
    from sglang_mux.router.placement import PlacementError

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        p.error(f"--systems: allowed: {', '.join(SYSTEMS)}; got {bad}")
    defaults = MuxConfig()
    try:
        slo = SLO(args.mux_slo_ttft or defaults.slo_ttft, args.mux_slo_tpot or defaults.slo_tpot)
    except PlacementError as e:
        p.error(str(e))
    if args.rescore:
        return rescore(args.out / "goodput_pd.json", slo)
    if args.plan:
        return plan(args, slo)
    why = mooncake_unavailable_reason()
    if why and any(s != "stock_agg" and s != "mux_agg" for s in systems):
        print(f"goodput_pd: cannot run the PD systems: {why}", file=sys.stderr)
        return 2

    mux_args = ["--mux-budget", str(args.mux_budget), "--mux-drop-cold"]
    trace = make_trace(args.requests, args.rate, args.seed, short=(32, 256), long=(1024, 3072),
                       long_frac=args.long_frac, out=(16, 48))
    costs_path = args.out / "pd_costs.json"
    result = {"machine": machine_info(), "slo": asdict(slo), "trace": {"requests": len(trace), "rate": args.rate,
              "seed": args.seed, "long_frac": args.long_frac}, "mux_args": mux_args, "systems": {}}

    policy = None
    if args.costs_only:
        with deployment("mux_policy", mux_args) as urls:
            rec = record_costs(urls, [64, 1024, 2048], held_out=(512, 24))
        rec["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
        write_result(args.out, "pd_costs", rec)
        print(json.dumps(rec["costs"], indent=1))
        return 0
    if "mux_policy" in systems or not costs_path.exists():
        progress("recording costs (mux aggregated + mux PD)")
        with deployment("mux_policy", mux_args) as urls:
            rec = record_costs(urls, [64, 1024, 2048], held_out=(512, 24))
            rec["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
            write_result(args.out, "pd_costs", rec)
            costs = RecordedCosts.load(costs_path)
            policy = PlacementPolicy(costs, slo)
            if "mux_policy" in systems:
                progress("replaying the trace: mux_policy")
                recs = replay(urls, trace, policy=policy)
                result["systems"]["mux_policy"] = {"summary": summarize(recs, slo), "requests": recs,
                                                   "policy_stats": policy.stats.as_dict()}
    costs = RecordedCosts.load(costs_path)
    ratio_policy = PlacementPolicy(costs, slo)
    result["recommendation"] = {
        "stock": ratio_policy.recommend_ratio(trace),
        "mux": ratio_policy.recommend_ratio(trace, device_kv_tokens_per_request=mux_device_kv(args.mux_budget)),
    }
    for system in systems:
        if system == "mux_policy":
            continue
        progress(f"replaying the trace: {system}")
        try:
            with deployment(system, mux_args) as urls:
                recs = replay(urls, trace)
                memory = None if system.startswith("stock") else decode_side_memory(urls)
            result["systems"][system] = {"summary": summarize(recs, slo), "requests": recs, "decode_side": memory}
        except (RuntimeError, TimeoutError, OSError) as e:  # a deployment that failed: say so, go on
            result["systems"][system] = {"failed": str(e).splitlines()[0][:300]}
            progress(f"{system} failed: {result['systems'][system]['failed']}")
        write_result(args.out, "goodput_pd", result)  # partial results survive a later failure

    result["pd_break_even"] = {
        "stock": ratio_policy.pd_break_even(trace),
        "mux": ratio_policy.pd_break_even(trace, device_kv_tokens_per_request=mux_device_kv(args.mux_budget)),
    }
    print_table(result, slo)
    print_plan(result["recommendation"], result["pd_break_even"])
    write_result(args.out, "goodput_pd", result)
    return 0


def print_plan(recommendation: dict, break_even: dict) -> None:
    for k, rec in recommendation.items():
        be = break_even[k]
        rate, prompt = be["pd_pays_from_rate_rps"], be["pd_pays_from_prompt_tokens"]
        print(f"{k}: recommended prefill:decode {rec.get('ratio', rec.get('why'))}; PD {be['pd_workers']} workers vs "
              f"aggregated {be['aggregated_workers']} at {be['trace_rate_rps']:.2f} req/s -> PD "
              f"{'pays' if be['pd_pays'] else 'does not pay'}; PD pays from "
              f"{f'{rate:.2f} req/s' if rate is not None else 'no rate up to 64x this one'} and, per request, from "
              f"{f'{prompt} prompt tokens' if prompt is not None else 'no prompt length'}")


def plan(args, slo) -> int:
    """``--plan``: the ratio controller's outputs for the trace, on the recorded costs; no servers."""
    from sglang_mux.router.placement import PlacementError, PlacementPolicy, RecordedCosts, mux_device_kv

    costs_path = args.costs or args.out / "pd_costs.json"
    try:
        policy = PlacementPolicy(RecordedCosts.load(costs_path), slo)
    except PlacementError as e:
        print(f"goodput_pd: --plan: {e}", file=sys.stderr)
        return 2
    trace = make_trace(args.requests, args.rate, args.seed, short=(32, 256), long=(1024, 3072),
                       long_frac=args.long_frac, out=(16, 48))
    kv = {"stock": None, "mux": mux_device_kv(args.mux_budget)}
    recommendation = {k: policy.recommend_ratio(trace, device_kv_tokens_per_request=f) for k, f in kv.items()}
    break_even = {k: policy.pd_break_even(trace, device_kv_tokens_per_request=f) for k, f in kv.items()}
    print(f"trace: {len(trace)} requests, {args.rate} req/s (seed {args.seed}), SLO TTFT <= {slo.ttft_ms:g} ms, "
          f"TPOT <= {slo.tpot_ms:g} ms, costs {costs_path}")
    print_plan(recommendation, break_even)
    write_result(args.out, "pd_plan", {"slo": asdict(slo), "costs": str(costs_path),
                                       "trace": {"requests": len(trace), "rate": args.rate, "seed": args.seed,
                                                 "long_frac": args.long_frac},
                                       "recommendation": recommendation, "pd_break_even": break_even})
    return 0


def print_table(result: dict, slo) -> None:
    t = result["trace"]
    print(f"\nGoodput on {t['requests']} requests, {t['rate']} req/s, SLO TTFT <= {slo.ttft_ms:g} ms, "
          f"TPOT <= {slo.tpot_ms:g} ms")
    print(f"{'system':11s} {'TTFT p50':>9s} {'TTFT p95':>9s} {'TPOT p50':>9s} {'TPOT p95':>9s} {'SLO met':>8s} {'errors':>6s}")
    f = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9s}"  # noqa: E731
    for system in SYSTEMS:
        if system not in result["systems"]:
            continue
        if "failed" in result["systems"][system]:
            print(f"{system:11s} failed: {result['systems'][system]['failed']}")
            continue
        s = summarize(result["systems"][system]["requests"], slo)
        print(f"{system:11s} {f(s['ttft_p50_ms'])} {f(s['ttft_p95_ms'])} {f(s['tpot_p50_ms'])} {f(s['tpot_p95_ms'])} "
              f"{s['slo_attainment']:8.0%} {s['errors']:6d}")


def rescore(path: Path, slo) -> int:
    """The table of a recorded run at other SLOs (the per-request TTFT/TPOT are in the JSON)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"goodput_pd: --rescore: cannot read {path}: {e}", file=sys.stderr)
        return 2
    print_table(result, slo)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    raise SystemExit(main())
