"""The research plan's ablations on the real model, in one command: one table, one plot, one JSON.

    .venv/bin/python -m benchmark.ablations --lengths 2048 --samples 5 --out benchmark/out/ablations

It starts one mux server with the default model (or uses ``--url``) and runs the quality suite's needle tasks
(benchmark/quality) with every arm as a per-request policy on the same prompts, at each ``--budget-frac``; then it
times decode under the router policies on one server (same prompt, prefix cached, arms alternated, medians).
With ``--tiers`` a second server with a host tier runs the single-tier vs multi-tier and quantized-cold arms.

Ablations (candidate vs reference, mean recall over the needle tasks, each budget):

    routing            adaptive vs static (mux); learned vs static; adaptive over the chunk split vs the chunk split
    layers             pyramid vs uniform; prefill-adaptive vs uniform (--mux-layer-budget)
    chunk vs page      the default split with chunks instead of pages (mux_chunk) vs mux; chunk leaf vs retrieval leaf
    router vs single   the best router policy vs the best single technique (StreamingLLM, SnapKV-, Quest-style),
                       per task family and on the mean
    tiers (--tiers)    keep every page on the device vs a host tier holding the cold pages (same device budget in
                       tokens: reads the same pages, so the same outputs; the cost differs)
    equal bytes (--drop)  a drop-mode server: exact-only cold pages vs int8 / int4 / int2 quantized ones in the same
                       device bytes, x uniform / pyramid / prefill-adaptive layer budgets
    cost               decode time per token of adaptive / learned over static, same server, same prompt

Aggregated vs PD (cost only) is ``benchmark/goodput_pd.py``; this script does not start a PD cluster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmark.common import decode_time_per_token, prompt_ids, stream_generate
from benchmark.quality.policies import POLICIES, custom_params
from benchmark.quality.run import build_parser as quality_parser
from benchmark.quality.run import frac_label, run_suite

SINGLE = ("streaming", "snapkv", "quest")
ROUTERS = ("mux", "adaptive", "learned", "mux_chunk", "adaptive_chunk", "mux_pyramid", "mux_adaptive")
ABLATIONS = [  # (name, candidate, reference)
    ("routing: adaptive vs static", "adaptive", "mux"),
    ("routing: learned vs static", "learned", "mux"),
    ("routing: adaptive vs static, chunk split", "adaptive_chunk", "mux_chunk"),
    ("layers: pyramid vs uniform", "mux_pyramid", "mux"),
    ("layers: prefill-adaptive vs uniform", "mux_adaptive", "mux"),
    ("chunk vs page: default split", "mux_chunk", "mux"),
    ("chunk vs page: one leaf", "chunk", "quest_mass"),
]
# arms that need a server of their own: kind -> (its extra flags, its policies, the ablations it answers)
EXTRA_SERVERS = {
    "tier": ("--mux-host-bytes 8589934592", ["mux"], [("tiers: host tier vs device only", "mux+tier", "mux")]),
    "drop": ("--mux-drop-cold", ["mux", "mux_int8", "mux_int4", "mux_int2", "mux_int4_pyramid", "mux_int4_adaptive"], [
        ("equal bytes, drop mode: int8 vs exact cold pages", "mux_int8+drop", "mux+drop"),
        ("equal bytes, drop mode: int4 vs exact cold pages", "mux_int4+drop", "mux+drop"),
        ("equal bytes, drop mode: int2 vs exact cold pages", "mux_int2+drop", "mux+drop"),
        ("equal bytes, drop mode: int4 + pyramid layers vs exact", "mux_int4_pyramid+drop", "mux+drop"),
        ("equal bytes, drop mode: int4 + prefill-adaptive layers vs exact", "mux_int4_adaptive+drop", "mux+drop"),
    ]),
}
SERVER_FLAGS = "--mem-fraction-static 0.3 --max-total-tokens 65536 --max-running-requests 8"


def family(task: str) -> str:
    return task.replace("niah_", "")


def cells(results: list[dict]) -> dict:
    """(policy, frac label, family) -> recall, from a quality run's table (one length or the mean over lengths)."""
    acc: dict = {}
    for r in results:
        policy = r["policy"].split("@")[0]
        frac = "full" if r["budget_frac"] is None else frac_label(r["budget_frac"])
        acc.setdefault((policy, frac, family(r["task"])), []).append(r["recall"])
    return {k: statistics.fmean(v) for k, v in acc.items()}


def mean_over(c: dict, policy: str, frac: str) -> float | None:
    vals = [v for (p, f, _), v in c.items() if p == policy and f == frac]
    return statistics.fmean(vals) if vals else None


def ablation_rows(c: dict, fracs: list[str], ablations) -> list[dict]:
    rows = []
    for name, cand, ref in ablations:
        row = {"ablation": name, "candidate": cand, "reference": ref}
        for f in fracs:
            a, b = mean_over(c, cand, f), mean_over(c, ref, f)
            row[f] = None if a is None or b is None else {"candidate": a, "reference": b, "delta": a - b}
        rows.append(row)
    return rows


def router_vs_single(c: dict, fracs: list[str]) -> list[dict]:
    """Per budget and task family: the best router policy and the best single technique."""
    out = []
    fams = sorted({fam for (_, _, fam) in c})
    for f in fracs:
        for fam in [*fams, "mean"]:
            def score(p):
                return mean_over(c, p, f) if fam == "mean" else c.get((p, f, fam))
            routers = {p: score(p) for p in ROUTERS if score(p) is not None}
            singles = {p: score(p) for p in SINGLE if score(p) is not None}
            if not routers or not singles:
                continue
            br, bs = max(routers, key=routers.get), max(singles, key=singles.get)
            out.append({"budget": f, "family": fam, "best_router": br, "router": routers[br], "best_single": bs,
                        "single": singles[bs], "delta": routers[br] - singles[bs]})
    return out


def time_arms(url: str, policies: list[str], length: int, frac: float, repeats: int, new_tokens: int) -> dict:
    """Median decode time per token of each policy on one prompt (prefix cached first), arms alternated."""
    ids = prompt_ids(length, seed=length)
    budget = max(1, round(frac * length))
    stream_generate(url, ids, 4, custom_params=custom_params("mux", budget))  # the prompt into the prefix cache
    per: dict[str, list[float]] = {p: [] for p in policies}
    for _ in range(repeats):
        for p in policies:
            res = stream_generate(url, ids, new_tokens, custom_params=custom_params(p, budget))
            if res.error:
                raise RuntimeError(f"{p}: {res.error}")
            tpot, _ = decode_time_per_token([res])
            per[p].append(tpot)
    return {p: statistics.median(v) for p, v in per.items()}


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    fracs = report["fracs"]
    lines = ["| ablation | candidate | reference | " + " | ".join(f"{f}: cand / ref (delta)" for f in fracs) + " |",
             "|---|---|---|" + "---|" * len(fracs)]
    for r in report["ablations"]:
        cols = [("-" if r[f] is None else f"{fmt(r[f]['candidate'])} / {fmt(r[f]['reference'])} "
                 f"({r[f]['delta']:+.2f})") for f in fracs]
        lines.append(f"| {r['ablation']} | {r['candidate']} | {r['reference']} | " + " | ".join(cols) + " |")
    lines += ["", "| budget | task family | best router policy | recall | best single technique | recall | delta |",
              "|---|---|---|---|---|---|---|"]
    for r in report["router_vs_single"]:
        lines.append(f"| {r['budget']} | {r['family']} | {r['best_router']} | {fmt(r['router'])} | {r['best_single']} | "
                     f"{fmt(r['single'])} | {r['delta']:+.2f} |")
    if report.get("cost"):
        lines += ["", "| context | " + " | ".join(f"{p} ms/token" for p in report["cost_policies"]) + " | "
                  + " | ".join(f"{p} / mux" for p in report["cost_policies"] if p != "mux") + " |",
                  "|---|" + "---|" * (2 * len(report["cost_policies"]) - 1)]
        for length, t in report["cost"].items():
            ratios = [f"{t[p] / t['mux']:.2f}x" for p in report["cost_policies"] if p != "mux"]
            lines.append(f"| {length} | " + " | ".join(f"{1000 * t[p]:.1f}" for p in report["cost_policies"]) + " | "
                         + " | ".join(ratios) + " |")
    full = report.get("full")
    if full is not None:
        lines += ["", f"Full KV on the same prompts: {full:.2f} (mean recall over the needle tasks)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report["cells"]
    policies = [p for p in ("streaming", "snapkv", "quest", "quest_mass", "chunk", *ROUTERS)
                if any(k.split("|")[0] == p for k in c)]
    fracs = report["fracs"]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(policies)), 4))
    w = 0.8 / max(len(fracs), 1)
    for i, f in enumerate(fracs):
        vals = [statistics.fmean([v for k, v in c.items() if k.split("|")[:2] == [p, f]] or [0]) for p in policies]
        ax.bar([x + i * w for x in range(len(policies))], vals, width=w, label=f"budget {f}")
    if report.get("full") is not None:
        ax.axhline(report["full"], color="k", ls="--", lw=1, label="full KV")
    ax.set_xticks([x + w * (len(fracs) - 1) / 2 for x in range(len(policies))])
    ax.set_xticklabels(policies, rotation=30, ha="right")
    ax.set_ylabel("mean recall, needle tasks")
    ax.set_ylim(0, 1.05)
    ax.set_title(report["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quality(url: str, args, policies: list[str], out: Path) -> list[dict]:
    qargs = quality_parser().parse_args([
        "--url", url, "--tasks", args.tasks, "--lengths", args.lengths, "--samples", str(args.samples),
        "--seed", str(args.seed), "--policies", ",".join(policies), "--budget-frac", args.budget_frac,
        "--concurrency", str(args.concurrency), "--out", str(out)])
    from benchmark.quality.run import parse_lengths
    from benchmark.quality.tasks import parse_task_list

    qargs.task_list, qargs.length_list, qargs.policy_list = (parse_task_list(qargs.tasks),
                                                             parse_lengths(qargs.lengths), policies)
    from transformers import AutoTokenizer

    from benchmark.quality.client import model_path

    tok = AutoTokenizer.from_pretrained(model_path(url))
    return run_suite(qargs, tok)["results"]


def results_from_cells(out: Path) -> list[dict]:
    """The quality results of a run (finished or not) from its per-cell files: ``quality/<label>/<task>_<n>.json``
    and ``quality_<kind>/...`` for the arms of a second server (labelled ``policy+kind``)."""
    results = []
    for folder in sorted(out.glob("quality*")):
        kind = folder.name.partition("_")[2]
        for f in sorted(folder.glob("*/*.json")):
            cell = json.loads(f.read_text())
            base, _, frac = cell["policy"].partition("@")
            label = f"{base}+{kind}" if kind else base
            frac_value = None
            if frac:
                num, _, den = frac.partition("/")
                frac_value = float(num) / float(den) if den else float(num)
            elif base != "full":
                frac_value = None
            results.append({**{k: v for k, v in cell.items() if k != "samples"},
                            "policy": label + (f"@{frac}" if frac else ""), "budget_frac": frac_value})
    return results


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running mux server (default: start one with the default model)")
    ap.add_argument("--server-args", default=SERVER_FLAGS, help="flags of the server this script starts")
    ap.add_argument("--tasks", default="needle", help="quality suite tasks ('needle', or a comma list)")
    ap.add_argument("--lengths", default="2048", help="context lengths in tokens (comma list)")
    ap.add_argument("--samples", type=int, default=5, help="samples per (task, length) cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-frac", default="0.125,0.0625", help="budgets as fractions of each prompt")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--arms", default="", help="comma list of policies to run (default: every arm)")
    ap.add_argument("--cost-lengths", default="2048,4096", help="contexts of the decode-cost arms ('' to skip)")
    ap.add_argument("--cost-repeats", type=int, default=3)
    ap.add_argument("--tiers", action="store_true", help="also run the host-tier arm on a server with a host tier")
    ap.add_argument("--drop", action="store_true", help="also run the equal-bytes quantized-cold arms on a drop-mode "
                    "server")
    ap.add_argument("--reuse", metavar="JSON", help="an earlier ablations.json: its quality results are kept and only "
                    "the arms it lacks are run (same tasks, lengths, samples and seed)")
    ap.add_argument("--summarize", action="store_true", help="run nothing: rebuild the table and plot from the per-cell "
                    "files already under --out (e.g. of a run that was stopped)")
    ap.add_argument("--out", default="benchmark/out/ablations")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arms = ["full", *SINGLE, "quest_mass", "chunk", *ROUTERS]
    if args.arms:
        arms = ["full", *[a.strip() for a in args.arms.split(",") if a.strip()]]
        bad = [a for a in arms if a not in POLICIES]
        if bad:
            print(f"error: --arms: unknown {bad[0]!r}; allowed: {', '.join(POLICIES)}", file=sys.stderr)
            return 2
    arms = list(dict.fromkeys(arms))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fracs = [frac_label(float(x)) for x in args.budget_frac.split(",")]
    report: dict = {"title": f"ablations, needle tasks, {args.lengths} tokens, {args.samples} samples/cell",
                    "config": vars(args), "fracs": fracs}

    def serve(extra: str):
        from sglang_mux.server_process import ServerProcess
        import shlex

        return ServerProcess(shlex.split(args.server_args + " " + extra))

    import contextlib

    if args.summarize:
        return write_report(report, results_from_cells(out), fracs, out)
    previous = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    kept = [r for r in previous.get("results", []) if "+" not in r["policy"]]
    done = {r["policy"].split("@")[0] for r in kept}
    todo = [a for a in arms if a not in done]
    with (contextlib.nullcontext(argparse.Namespace(url=args.url)) if args.url else serve("")) as srv:
        results = kept + (run_quality(srv.url, args, todo, out / "quality") if todo else [])
        cost_policies = [p for p in ("mux", "adaptive", "learned") if p in arms]
        report["cost_policies"] = cost_policies
        if args.cost_lengths and len(cost_policies) > 1:
            report["cost"] = {
                int(n): time_arms(srv.url, cost_policies, int(n), float(args.budget_frac.split(",")[0]),
                                  args.cost_repeats, 32)
                for n in args.cost_lengths.split(",")}
    if previous.get("cost") and not report.get("cost"):
        report["cost"], report["cost_policies"] = previous["cost"], previous["cost_policies"]
    kinds = [k for k, on in (("tier", args.tiers), ("drop", args.drop)) if on]
    for kind in EXTRA_SERVERS:
        if kind not in kinds:  # not rerun: keep what an earlier run measured
            results += [r for r in previous.get("results", []) if f"+{kind}" in r["policy"]]
    for kind in kinds:
        flags, policies, _ = EXTRA_SERVERS[kind]
        with serve(flags) as srv:
            extra = run_quality(srv.url, args, policies, out / f"quality_{kind}")
        for r in extra:  # mux@1/8 -> mux+tier@1/8
            base, _, frac = r["policy"].partition("@")
            r["policy"] = f"{base}+{kind}" + (f"@{frac}" if frac else "")
        results = results + extra
    return write_report(report, results, fracs, out)


def write_report(report: dict, results: list[dict], fracs: list[str], out: Path) -> int:
    c = cells(results)
    report["cells"] = {f"{p}|{f}|{fam}": v for (p, f, fam), v in c.items()}
    report["full"] = mean_over(c, "full", "full")
    measured = [k for k in EXTRA_SERVERS if any(f"+{k}" in r["policy"] for r in results)]
    report["ablations"] = ablation_rows(c, fracs, ABLATIONS + [a for k in measured for a in EXTRA_SERVERS[k][2]])
    report["router_vs_single"] = router_vs_single(c, fracs)
    report["results"] = results
    (out / "ablations.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "ablations.md").write_text(md)
    plot(report, out / "ablations.png")
    print(md)
    print(f"wrote {out}/ablations.json, ablations.md, ablations.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
