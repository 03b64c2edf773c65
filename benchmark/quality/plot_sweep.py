"""Plot a sweep of one server setting from several runner outputs: recall per (task, length) against the setting.

Each ``DIR`` is a ``benchmark.quality.run --out`` folder (its ``summary.json``), labelled by the value the server
ran with; one line per (task, length) cell of ``--policy``, and the ``--reference`` folder's full-KV recall as
dashed lines where given. Example (docs/quality.md, the retrieval temperature):

    for T in 1 2 4 10 20 100; do .venv/bin/python -m benchmark.quality.run \\
        --launch "--dtype float32 --mux-retrieval-temperature $T" --policies mux ... --out benchmark/out/quality_temperature/T$T; done
    .venv/bin/python -m benchmark.quality.plot_sweep --policy mux --xlabel "--mux-retrieval-temperature" \\
        --reference benchmark/out/quality_mass --out docs/img/quality_retrieval_temperature.png \\
        1=benchmark/out/quality_temperature/T1 2=benchmark/out/quality_temperature/T2 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class SweepError(ValueError):
    """A bad argument or an unreadable run folder; the message names it."""


def load_cells(folder: Path, policy: str) -> dict[tuple[str, int], float]:
    """``(task, length) -> recall`` of ``policy`` in one runner output folder."""
    path = folder / "summary.json"
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SweepError(f"{path}: not a runner summary ({type(e).__name__})") from None
    cells = {(r["task"], int(r["length"])): float(r["recall"]) for r in results if r.get("policy") == policy}
    if not cells:
        raise SweepError(f"{path}: no results for policy {policy!r}")
    return cells


def parse_points(specs: list[str]) -> list[tuple[float, Path]]:
    points = []
    for spec in specs:
        value, sep, folder = spec.partition("=")
        try:
            x = float(value)
        except ValueError:
            x = None
        if not sep or x is None or not folder:
            raise SweepError(f"point: expected VALUE=DIR like 10=benchmark/out/sweep/T10, got {spec!r}")
        points.append((x, Path(folder)))
    return sorted(points)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("points", nargs="+", help="VALUE=DIR: a runner output folder and the setting it ran with")
    ap.add_argument("--policy", default="mux", help="the policy whose recall is plotted")
    ap.add_argument("--reference", default=None, help="a runner output folder with a 'full' policy (dashed lines)")
    ap.add_argument("--xlabel", default="setting")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    try:
        points = parse_points(args.points)
        runs = [(x, load_cells(folder, args.policy)) for x, folder in points]
        full = load_cells(Path(args.reference), "full") if args.reference else {}
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({c for _, r in runs for c in r})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, cell in enumerate(cells):
        xs = [x for x, r in runs if cell in r]
        line = ax.plot(xs, [r[cell] for _, r in runs if cell in r], marker="o", label=f"{cell[0]} {cell[1]}")[0]
        if cell in full:
            ax.axhline(full[cell], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel(f"recall ({args.policy}; dashed: full KV)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    print("| value | " + " | ".join(f"{t} {n}" for t, n in cells) + " |")
    print("|---:|" + "---:|" * len(cells))
    for x, r in runs:
        print(f"| {x:g} | " + " | ".join(f"{r[c]:.2f}" if c in r else "-" for c in cells) + " |")
    if full:
        print("| full KV | " + " | ".join(f"{full[c]:.2f}" if c in full else "-" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
