"""Plot accuracy against context length for several ``hf_eval --out`` tables: one panel per task, one line per
label (e.g. one model config each). Example (docs/quality.md, RoPE settings of the bundled probe):

    .venv/bin/python -m benchmark.quality.plot_lengths --metric exact --out docs/img/quality_probe_yarn.png \\
        "plain RoPE=benchmark/out/hf_plain.json" "YaRN x4=benchmark/out/hf_yarn4.json,benchmark/out/hf_yarn4_12k.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmark.quality.run import plot


class TableError(ValueError):
    """A bad argument or an unreadable table; the message names it."""


def load_tables(spec: str) -> tuple[str, dict]:
    """``LABEL=A.json[,B.json...]`` -> (label, ``{task: {length: cell}}`` merged over the files)."""
    label, sep, files = spec.partition("=")
    if not sep or not label or not files:
        raise TableError(f"table: expected LABEL=FILE.json[,FILE.json] like 'YaRN x4=out/hf.json', got {spec!r}")
    merged: dict = {}
    for name in files.split(","):
        try:
            table = json.loads(Path(name).read_text())
            for task, cells in table.items():
                for length, cell in cells.items():
                    merged.setdefault(task, {})[str(int(length))] = {"exact": float(cell["exact"]), "recall": float(cell["recall"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TableError(f"{name}: not an hf_eval --out table ({type(e).__name__})") from None
    return label, merged


def as_results(tables: list[tuple[str, dict]]) -> list[dict]:
    """The rows ``run.plot`` draws, with the label in place of the policy."""
    return [{"policy": label, "task": task, "length": int(length), **cell}
            for label, table in tables for task, cells in table.items() for length, cell in cells.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="+", help="LABEL=FILE.json[,FILE.json]: hf_eval --out tables, merged per label")
    ap.add_argument("--metric", choices=("exact", "recall"), default="exact")
    ap.add_argument("--title", default="HF greedy, full KV")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args(argv)
    try:
        tables = [load_tables(s) for s in args.tables]
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(as_results(tables), Path(args.out), args.title, args.metric)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
