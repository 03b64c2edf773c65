"""Run the synthetic long-context suite against a running SGLang server (stock or mux).

    .venv/bin/python -m benchmark.quality.run --url http://127.0.0.1:30000 \
        --tasks all --lengths 1024,2048 --samples 20 \
        --policies full,streaming,snapkv,quest,mux --budget-frac 0.125 --out benchmark/out/quality

Every (policy, task, length) cell sends the same seeded samples through ``/generate`` (greedy) with the
policy's ``custom_params`` and scores the outputs (RULER recall / exact). Writes, under ``--out``:
``<policy>/<task>_<length>.json`` (``snapkv@1_8/`` with several budget fractions; every sample: prompt size, budget, answers, output, score),
``summary.json`` (the table), ``summary.md`` (the same as markdown), ``accuracy.png`` (accuracy vs length,
one line per policy, one panel per task) and ``means.png`` (each policy's mean over tasks, a bar per budget). A stock server ignores the mux fields: every policy is then full KV.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmark.quality.client import ServerError, generate, model_path
from benchmark.quality.policies import POLICIES, PolicyError, budget_tokens, custom_params, parse_policies
from benchmark.quality.scoring import exact, mean, recall
from benchmark.quality.tasks import TaskError, generate_tasks, parse_task_list


def parse_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise TaskError(f"--lengths: expected comma-separated token counts like 1024,2048, got {spec!r}") from None
    if not lengths or any(n < 64 for n in lengths):
        raise TaskError(f"--lengths: every length must be an integer >= 64, got {spec!r}")
    return lengths


def parse_fracs(spec: str) -> list[float]:
    try:
        fracs = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.125,0.0625, got {spec!r}") from None
    if not fracs:
        raise argparse.ArgumentTypeError(f"expected fractions like 0.125,0.0625, got {spec!r}")
    return fracs


def score_cell(samples, outputs, budgets) -> tuple[dict, list[dict]]:
    """Cell summary and per-sample records for outputs of one (policy, task, length)."""
    records = []
    for s, out, b in zip(samples, outputs, budgets):
        records.append(
            {"index": s.index, "n_tokens": s.n_tokens, "depth": s.depth, "budget": b, "answers": list(s.answers),
             "output": out, "recall": recall(out, s.answers), "exact": exact(out, s.answers)}
        )
    summary = {
        "recall": round(mean(r["recall"] for r in records), 4),
        "exact": round(mean(r["exact"] for r in records), 4),
        "n": len(records),
        "mean_budget": round(mean(budgets), 1) if budgets[0] is not None else None,
    }
    if all(r["depth"] is not None for r in records):
        summary["recall_by_depth"] = by_depth(records)
    return summary, records


DEPTH_BINS = ((0.0, 0.25), (0.25, 0.75), (0.75, 1.0))


def by_depth(records: list[dict]) -> dict:
    """Recall per depth band of the queried item: ``{"0.25-0.75": (recall, n), ...}`` (mid-context in the middle)."""
    out = {}
    for lo, hi in DEPTH_BINS:
        rs = [r["recall"] for r in records if lo <= r["depth"] < hi or (hi == 1.0 and r["depth"] == 1.0)]
        out[f"{lo:.2f}-{hi:.2f}"] = [round(mean(rs), 4) if rs else None, len(rs)]
    return out


def budget_fracs(args) -> list[float | None]:
    """The budget fractions of a run (one, a list, or [None] with a fixed --budget)."""
    fracs = args.budget_frac if isinstance(args.budget_frac, list) else [args.budget_frac]
    return [None] if args.budget is not None else fracs


def frac_label(frac: float) -> str:
    inv = 1 / frac
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-9 else f"{frac:g}"


def arms(args) -> list[tuple[str, float | None, str]]:
    """(policy, budget fraction, label) of every arm: ``full`` once, every other policy at every fraction
    (labelled ``snapkv@1/8`` when the run has several fractions)."""
    fracs = budget_fracs(args)
    out = []
    for policy in args.policy_list:
        if policy == "full":
            out.append(("full", None, "full"))
            continue
        for f in fracs:
            out.append((policy, f, policy if len(fracs) == 1 else f"{policy}@{frac_label(f)}"))
    return out


def run_suite(args, tokenizer, send=generate, progress=True) -> dict:
    """Send every cell to the server and write the outputs; returns the summary table."""
    from tqdm import tqdm

    out = Path(args.out)
    cells = [(t, n) for t in args.task_list for n in args.length_list]
    total = len(cells) * len(arms(args)) * args.samples
    bar = tqdm(total=total, desc="quality", unit="req", disable=not progress)
    table: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for task, length in cells:
            samples = generate_tasks(task, tokenizer, length, args.samples, args.seed)
            for policy, frac, label in arms(args):
                budgets = [None if policy == "full" else budget_tokens(s.n_tokens, args.budget, frac) for s in samples]
                params = [custom_params(policy, b or 1) for b in budgets]

                def one(i):
                    res = send(args.url, samples[i].prompt, samples[i].max_new_tokens, params[i])
                    bar.update(1)
                    return res

                outputs = list(pool.map(one, range(len(samples))))
                summary, records = score_cell(samples, outputs, budgets)
                folder = out / label.replace("/", "_")  # snapkv@1/8 -> snapkv@1_8
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{task}_{length}.json").write_text(
                    json.dumps({"policy": label, "task": task, "length": length, **summary, "samples": records}, indent=1)
                )
                table.append({"policy": label, "task": task, "length": length, "budget_frac": frac, **summary})
                bar.set_postfix_str(f"{label} {task}@{length}: {summary['recall']:.2f}")
    bar.close()
    return {"config": {k: v for k, v in vars(args).items() if k not in ("task_list", "length_list", "policy_list")},
            "results": table}


def markdown_table(results: list[dict], metric: str = "recall") -> str:
    """Rows: task x length; columns: policies."""
    policies = list(dict.fromkeys(r["policy"] for r in results))
    rows = list(dict.fromkeys((r["task"], r["length"]) for r in results))
    cell = {(r["policy"], r["task"], r["length"]): r[metric] for r in results}
    lines = ["| task | length | " + " | ".join(policies) + " |", "|---|---:|" + "---:|" * len(policies)]
    for task, length in rows:
        vals = [f"{cell[(p, task, length)]:.2f}" if (p, task, length) in cell else "-" for p in policies]
        lines.append(f"| {task} | {length} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def mean_table(results: list[dict], metric: str = "recall") -> str:
    """Rows: policies; columns: the mean over tasks at each length, and over every cell."""
    policies = list(dict.fromkeys(r["policy"] for r in results))
    lengths = sorted({r["length"] for r in results})
    lines = ["| policy | " + " | ".join(f"mean @{n}" for n in lengths) + " | mean |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for p in policies:
        mine = [r for r in results if r["policy"] == p]
        per = [mean(r[metric] for r in mine if r["length"] == n) if any(r["length"] == n for r in mine) else None
               for n in lengths]
        vals = ["-" if v is None else f"{v:.3f}" for v in per]
        lines.append(f"| {p} | " + " | ".join(vals) + f" | {mean(r[metric] for r in mine):.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str, metric: str = "recall") -> None:
    """accuracy vs length, one line per policy, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    policies = list(dict.fromkeys(r["policy"] for r in results))
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for p in policies:
            pts = sorted((r["length"], r[metric]) for r in results if r["task"] == task and r["policy"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=10)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context tokens")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def means_by_arm(results: list[dict], metric: str = "recall") -> dict[tuple[str, float | None], float]:
    """``{(policy, budget fraction): mean of metric over every cell}``; ``snapkv@1/8`` counts as ``snapkv``."""
    cells: dict[tuple[str, float | None], list[float]] = {}
    for r in results:
        cells.setdefault((r["policy"].split("@")[0], r.get("budget_frac")), []).append(r[metric])
    return {arm: mean(v) for arm, v in cells.items()}


def plot_means(results: list[dict], path: Path, title: str, metric: str = "recall") -> None:
    """Mean over tasks (all lengths) per policy, one bar per budget fraction, full KV as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm = means_by_arm(results, metric)
    policies = list(dict.fromkeys(p for p, _ in by_arm if p != "full"))
    fracs = sorted({f for p, f in by_arm if p != "full" and f is not None}, reverse=True) or [None]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(policies), 3.2))
    width = 0.8 / len(fracs)
    for j, f in enumerate(fracs):
        xs = [i + (j - (len(fracs) - 1) / 2) * width for i in range(len(policies))]
        ys = [by_arm.get((p, f), 0.0) for p in policies]
        label = "budget" if f is None else f"budget {frac_label(f)} of the prompt"
        bars = ax.bar(xs, ys, width=width * 0.95, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    if ("full", None) in by_arm:
        ax.axhline(by_arm[("full", None)], ls="--", color="black", lw=1, label="full KV")
    ax.set_xticks(range(len(policies)), policies)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"mean {metric} over tasks")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:30000", help="base URL of a running SGLang server")
    ap.add_argument("--tasks", default="all", help="'all', 'needle', 'aggregation' or a comma list of task names")
    ap.add_argument("--lengths", default="1024,2048", help="comma list of target context lengths in tokens")
    ap.add_argument("--samples", type=int, default=20, help="samples per (task, length) cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default="full", help="comma list of: " + ", ".join(POLICIES))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--budget", type=int, help="device-KV budget in tokens (same for every request)")
    g.add_argument("--budget-frac", type=parse_fracs, metavar="F[,F...]",
                   help="device-KV budget as a fraction of each prompt (e.g. 0.125); a comma list runs every "
                        "budgeted policy at each (full KV once)")
    ap.add_argument("--tokenizer", help="HF tokenizer path/name (default: the model the server serves)")
    ap.add_argument("--launch", metavar="ARGS", help="start a mux server for the run with these extra flags "
                    "(quoted, e.g. \"--dtype float32\"; the bundled model unless --model-path is among them), "
                    "stop it afterwards; --url is then ignored")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--out", default="benchmark/out/quality", help="output directory")
    ap.add_argument("--title", default="synthetic long-context suite")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.task_list = parse_task_list(args.tasks)
        args.length_list = parse_lengths(args.lengths)
        args.policy_list = parse_policies(args.policies)
        if args.samples < 1:
            raise TaskError(f"--samples: must be >= 1, got {args.samples}")
        if args.concurrency < 1:
            raise TaskError(f"--concurrency: must be >= 1, got {args.concurrency}")
        if any(p != "full" for p in args.policy_list):
            if args.budget is None and args.budget_frac is None:
                args.budget_frac = [0.125]
            for frac in budget_fracs(args):
                budget_tokens(1, args.budget, frac)  # validate once, before any request
        from transformers import AutoTokenizer

        if args.launch is not None:
            import shlex

            from sglang_mux.server_process import ServerProcess

            try:
                server = ServerProcess(shlex.split(args.launch))
            except ValueError as e:
                raise TaskError(f"--launch: {e}") from None
            with server as srv:
                args.url = srv.url
                tok = AutoTokenizer.from_pretrained(args.tokenizer or model_path(args.url))
                result = run_suite(args, tok)
        else:
            tok = AutoTokenizer.from_pretrained(args.tokenizer or model_path(args.url))
            result = run_suite(args, tok)
    except (TaskError, PolicyError, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    md = markdown_table(result["results"]) + "\n" + mean_table(result["results"])
    (out / "summary.md").write_text(md)
    plot(result["results"], out / "accuracy.png", args.title)
    plot_means(result["results"], out / "means.png", args.title)
    print(md)
    print(f"wrote {out}/summary.json, summary.md, accuracy.png, means.png and per-cell JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
