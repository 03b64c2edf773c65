"""Selection cost per decode step: how long choosing pages takes under each leaf configuration, in one run.

    .venv/bin/python benchmark/selection_cost.py --context 7K --batch 1 --out benchmark/out/selection_cost

Drives the mux attention backend alone (``profile_decode.py --backend-only``'s synthetic set-up: the real model's
attention shapes, synthetic KV, heavy scores and page summaries as a prefill leaves them, a chunk delimiter about
every 10 tokens) at a budget of ``--budget-frac`` of the context, and times, per arm, (a) page selection alone
(every layer's ``StepPlanner.select`` for every request: the leaves, the retrieval scores) and (b) the whole decode
attention step (plan + selection + gather + attention). Arms:

    page            the default split (sink, recent, heavy, retrieval=rest): pages ranked one by one
    chunk           the default split with the retrieval share spent by the chunk leaf (heavy-ranked chunks)
    chunk_quest     the same with --mux-chunk-score quest (chunks ranked by this step's retrieval scores)
    chunk_shared    ``chunk`` with --mux-chunk-layers shared (one chunk choice per step for every layer)
    both            retrieval and chunk halving the retrieval share
    pyramid         the default split with --mux-layer-budget pyramid
    adaptive        the default split with --mux-layer-budget adaptive

Prints a table (medians of ``--repeats`` timings of ``--steps`` steps each) and writes ``selection_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import profile_decode  # noqa: E402

ARMS = ("page", "chunk", "chunk_quest", "chunk_shared", "both", "pyramid", "adaptive")


def arm_config(arm: str, budget: int, page_size: int):
    from sglang_mux.config import MuxConfig

    base = MuxConfig(budget=budget, page_size=page_size)
    split = base.leaf_split(budget)
    if arm in ("chunk", "chunk_quest", "chunk_shared", "both"):
        moved = split["retrieval"] if arm != "both" else split["retrieval"] // 2
        split["retrieval"] -= moved
        split["chunk"] += moved
        spec = ",".join(f"{k}={v}" for k, v in split.items() if v)
        return base.replace(leaves=spec, chunk_score="quest" if arm == "chunk_quest" else "heavy",
                            chunk_layers="shared" if arm == "chunk_shared" else "per-layer")
    if arm in ("pyramid", "adaptive"):
        return base.replace(layer_budget=arm)
    return base


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=C.positive_ints, default=[7168], help="context tokens per request")
    p.add_argument("--batch", type=C.positive_int, default=1)
    p.add_argument("--budget-frac", type=float, default=0.125, help="budget as a fraction of the context, in (0, 1)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of: " + ", ".join(ARMS))
    p.add_argument("--steps", type=C.positive_int, default=3, help="decode steps per timing")
    p.add_argument("--repeats", type=C.positive_int, default=3)
    p.add_argument("--layers", type=C.positive_int, default=30)
    p.add_argument("--q-heads", type=C.positive_int, default=9)
    p.add_argument("--kv-heads", type=C.positive_int, default=3)
    p.add_argument("--head-dim", type=C.positive_int, default=64)
    p.add_argument("--page-size", type=C.positive_int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmark/out/selection_cost"))
    a = p.parse_args(argv)
    a.context = a.context[0]
    if not (0 < a.budget_frac < 1):
        p.error(f"--budget-frac: must be in (0, 1), got {a.budget_frac}")
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    bad = [s for s in arms if s not in ARMS]
    if bad or not arms:
        p.error(f"--arms: unknown {bad[0]!r}; allowed: {', '.join(ARMS)}" if bad else f"--arms: empty; allowed: {', '.join(ARMS)}")
    a.arms = arms
    if a.q_heads % a.kv_heads:
        p.error(f"--q-heads: must be a multiple of --kv-heads, got {a.q_heads} and {a.kv_heads}")
    a.budget = max(a.page_size, int(a.context * a.budget_frac))
    # what profile_decode.synthetic_backend reads
    a.mux_page_size, a.mux_budget, a.mux_mode = a.page_size, a.budget, "keep"
    return a


def time_arm(a: argparse.Namespace, arm: str) -> dict:
    syn = profile_decode.synthetic_backend(a, arm_config(arm, a.budget, a.page_size))
    be, layers = syn.be, syn.layers
    B, hq, d = a.batch, a.q_heads, a.head_dim
    qv = syn.q.view(B, hq, d)

    def select_only(step):
        be._plan_step(syn.batch(step))
        for layer in layers:
            lidx = layer.layer_id
            for i, p in enumerate(be._plan):
                be.planner.select(p, lidx, qv[i], syn.r2t.req_to_token[p.row], layer.scaling)

    out = {}
    for name, fn in (("select_ms", select_only), ("step_ms", lambda step: syn.mux(syn.batch(step)))):
        fn(0)  # warm-up
        runs = []
        for r in range(a.repeats):
            t0 = time.perf_counter()
            for s in range(a.steps):
                fn(1 + r * a.steps + s)
            runs.append((time.perf_counter() - t0) / a.steps * 1e3)
        out[name] = statistics.median(runs)
    p = be._plan[0]
    pages, by_leaf, *_ = be.planner.select(p, 0, qv[0], syn.r2t.req_to_token[p.row], layers[0].scaling)
    out["pages_read_layer0"] = int(pages.numel())
    out["by_leaf_layer0"] = by_leaf
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    from tqdm import tqdm

    results = {}
    for arm in tqdm(a.arms, desc="arms"):
        results[arm] = time_arm(a, arm)
    base = results.get("page")
    print(f"context {a.context}, batch {a.batch}, budget {a.budget} tokens ({a.budget_frac:g} of the context), "
          f"{a.layers} layers, {a.dtype}")
    print("| arm | selection ms/step | vs page | whole attention step ms | vs page | pages read (layer 0) |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        rs = r["select_ms"] / base["select_ms"] if base else float("nan")
        rt = r["step_ms"] / base["step_ms"] if base else float("nan")
        print(f"| {arm} | {r['select_ms']:.1f} | {rs:.2f}x | {r['step_ms']:.1f} | {rt:.2f}x | {r['pages_read_layer0']} |")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "selection_cost.json"
    path.write_text(json.dumps({"benchmark": "selection_cost", "machine": C.machine_info(), "context": a.context,
                                "batch": a.batch, "budget": a.budget, "dtype": a.dtype, "results": results}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
