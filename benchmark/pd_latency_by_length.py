"""PD end-to-end latency against prompt length, with repeats: how noisy the PD path is, and whether it steps at the
mux budget.

    .venv/bin/python benchmark/pd_latency_by_length.py                  # stock PD and mux PD, default lengths
    .venv/bin/python benchmark/pd_latency_by_length.py --systems mux --lengths 448,512,576 --repeats 5

For each system (prefill + decode + sglang-router, KV over mooncake_tcp on CPU; mux with the settings of
``benchmark/goodput_pd.py``: ``--mux-budget 512 --mux-drop-cold``) and each prompt length, ``--repeats``
non-streaming requests with one output token, each on another random prompt, go through the router one after
another. Prints every repeat and the median per length; writes JSON. docs/pd.md ("Costs") quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark"))
sys.path.insert(0, str(ROOT / "python"))

from tqdm import tqdm  # noqa: E402

from common import machine_info, positive_int, positive_ints, progress, prompt_ids, write_result  # noqa: E402

COMMON = ["--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "65536", "--log-level", "warning"]
MUX = ["--mux-budget", "512", "--mux-drop-cold"]
SYSTEMS = ("stock", "mux")


def measure(system: str, lengths: list[int], repeats: int) -> dict[int, list[float]]:
    from sglang_mux.disagg.cluster import PDCluster

    out: dict[int, list[float]] = {}
    with PDCluster(COMMON + (MUX if system == "mux" else []), stock=system == "stock") as pd:
        for n in tqdm(lengths, desc=f"{system} PD", unit="length"):
            out[n] = []
            for r in range(repeats):
                ids = prompt_ids(n, seed=10_000 + 100 * n + r)  # a new prompt each time: no radix-cache hit
                t0 = time.perf_counter()
                pd.greedy_ids(ids, 1)
                out[n].append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    p.add_argument("--lengths", type=positive_ints, default=positive_ints("64,256,448,512,576,768,1024,2048"))
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmark" / "out" / "pd_latency_by_length")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        p.error(f"--systems: allowed: {', '.join(SYSTEMS)}; got {args.systems!r}")

    from sglang_mux.disagg.cluster import mooncake_unavailable_reason

    why = mooncake_unavailable_reason()
    if why:
        print(f"pd_latency_by_length: cannot run PD: {why}", file=sys.stderr)
        return 2
    result = {"machine": machine_info(), "repeats": args.repeats, "mux_args": MUX, "systems": {}}
    for system in systems:
        progress(f"{system} PD: {len(args.lengths)} lengths x {args.repeats} repeats")
        result["systems"][system] = {str(n): ms for n, ms in measure(system, args.lengths, args.repeats).items()}
    path = write_result(args.out, "pd_latency_by_length", result)

    print("\nPD latency, one output token, ms (median; every repeat in order)")
    for system, rows in result["systems"].items():
        for n, ms in rows.items():
            print(f"{system:6s} {int(n):6d}  {statistics.median(ms):8.1f}   {', '.join(f'{x:.0f}' for x in ms)}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
