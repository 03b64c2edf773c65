"""Train the learned router's gate (``router/gate.py``) on traces of the real model, and write it as JSON.

    .venv/bin/python scripts/record_router_traces.py                     # traces -> benchmark/results/router_traces/
    .venv/bin/python scripts/train_router_gate.py                        # -> python/sglang_mux/router/gates/default.json
    .venv/bin/python scripts/train_router_gate.py TRACES --out my_gate.json --held-out-seeds 4,5

The router is simulated over each trace (``record_router_traces.py``) at budgets of 1/8 and 1/16 of the prompt
(page size 16, the default split of ``MuxConfig.leaf_split``: sink min(64, B/8), recent min(512, B/4), heavy B/8,
retrieval the rest, chunk 0). For a split of the movable pages, each layer's pages are chosen by the registered
leaves themselves, in registry order (recent, sink+heavy, retrieval, chunk; each among the pages not taken), from
what the trace says each leaf ranks by; the step's *captured mass* is the true (full-attention) mass on the union,
mean over heads and layers. The gate's features are computed as the router computes them online
(``router/learned.py::gate_features``): moving averages of the bucket masses of the routed attention (the mass on
the selected pages, renormalized per head as the routed softmax is), the out-of-hot mass, the fractions in force
and log2(context / budget); the first decision starts from the prefill's signal (``StepPlanner.prefill_signal``).

Training: from every (trace, budget, split in force, step) of the training traces, the gate is fitted (cross
entropy, softmax over the allowed shares) to the fractions of the best candidate split for the steps that follow,
where a candidate scores ``captured mass - stability x (share of the movable pages it moves)``; the page total is
fixed (the budget term is the grant's page count, held equal). Candidates: every split of a grid of fractions
(steps of 1/8), clipped and rounded as the learned router does (``learned.share_bounds``, ``adaptive.rescale``).

Evaluation (held-out seeds): the real policies (``StaticSpineRouter``, ``AdaptiveRouter``, ``LearnedRouter`` with
the new gate) decide every step over the held-out traces; the table gives the captured mass of each, and of the
best single candidate split per prompt in hindsight.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import torch  # noqa: E402

from sglang_mux.attention.routed_decode import combine_head_bounds, scatter_page_scores  # noqa: E402
from sglang_mux.config import MuxConfig  # noqa: E402
from sglang_mux.leaves import LEAVES, LeafContext, query_aware_shares  # noqa: E402
from sglang_mux.memory.chunks import page_spans_for  # noqa: E402
from sglang_mux.router.adaptive import AdaptiveState, buckets, rescale  # noqa: E402
from sglang_mux.router.gate import FEATURES, FORMAT, SHARES, VERSION, load_gate  # noqa: E402
from sglang_mux.router.grant import Grant, grant_for  # noqa: E402
from sglang_mux.router.learned import gate_features, share_bounds  # noqa: E402

DEFAULT_TRACES = os.path.join("benchmark", "results", "router_traces")
DEFAULT_OUT = os.path.join("python", "sglang_mux", "router", "gates", "default.json")
FRACTIONS = (1 / 8, 1 / 16)
BUCKETS = buckets()
SINK = 0


# ---------------------------------------------------------------------------------------------------- simulation
def budget_tokens(prompt_tokens: int, frac: float) -> int:
    return max(1, math.ceil(frac * prompt_tokens))


def static_pages(budget: int, page_size: int = 16) -> dict:
    """The static grant's pages per share (the default split at ``budget``)."""
    cfg = MuxConfig(budget=budget, page_size=page_size)
    return dict(grant_for(budget + 1, budget, page_size, cfg.leaf_split(budget)).pages)


def retrieval_scores(page_bounds: torch.Tensor, group_bounds: torch.Tensor, keep: int, group_pages: int,
                     scale: float) -> torch.Tensor:
    """One layer's retrieval page scores as ``StepPlanner.page_scores`` computes them (``mass`` rule), from the
    recorded per-head bounds of the pages ``[Hq, n]`` and of the complete groups ``[Hq, m]``: two-level when there
    are more complete groups than ``keep`` (the query-aware leaves' pages)."""
    n = page_bounds.shape[1]
    m = group_bounds.shape[1]
    if group_pages <= 1 or m == 0 or m <= keep:
        return combine_head_bounds(page_bounds, "mass", scale)
    best = torch.topk(combine_head_bounds(group_bounds, "mass", scale), keep, sorted=False).indices
    cand = (best.view(-1, 1) * group_pages + torch.arange(group_pages)).flatten()
    cand = torch.cat([cand, torch.arange(m * group_pages, n)])
    return scatter_page_scores(n, cand, page_bounds[:, cand], "mass", scale)


class TraceSim:
    """One recorded prompt: the pages each split reads at each step and layer, and what they capture.

    ``trace``: the dict ``record_router_traces.py`` saves (``meta``, ``delims``, ``snapkv``, ``steps``)."""

    def __init__(self, trace: dict, temperature: float = 10.0, chunk_tokens: int = 64):
        self.meta = trace["meta"]
        self.P = self.meta["page_size"]
        self.G = self.meta["group_pages"]
        self.scale = self.meta["scale"] / temperature
        self.steps = trace["steps"]
        self.delims = trace["delims"]
        self.chunk_tokens = chunk_tokens
        nl = self.meta["layers"]
        self.layers = nl
        snap = trace["snapkv"].float()
        # heavy scores at each step: the prompt's observation window, plus the mass of the steps before
        self.heavy, self.mass, self.mass_mean = [], [], []
        acc = snap
        for st in self.steps:
            n = math.ceil(st["seq_len"] / self.P)
            h = torch.zeros(nl, n)
            k = min(n, acc.shape[1])
            h[:, :k] = acc[:, :k]
            self.heavy.append(h)
            m = st["mass"].float()
            self.mass.append(m)
            mm = m.mean(dim=1)
            self.mass_mean.append(mm)
            acc = h.clone()
            acc[:, : mm.shape[1]] += mm
        self._cache: dict = {}
        self._rscores: dict = {}

    @property
    def prompt_tokens(self) -> int:
        return self.meta["prompt_tokens"]

    def seq_len(self, t: int) -> int:
        return self.steps[t]["seq_len"]

    def prefill_signal(self, grant: dict) -> list:
        """``StepPlanner.prefill_signal`` at the first decode step: per layer, the heavy mass outside sink+window."""
        s = self.heavy[0].clamp(min=0)
        n = s.shape[1]
        total = s.sum(dim=1)
        hot = s[:, : min(grant["sink"], n)].sum(dim=1) + s[:, max(n - max(grant["recent"], 1), 0):].sum(dim=1)
        return ((total - hot).clamp(min=0) / total.clamp(min=1e-12)).tolist()

    def select(self, t: int, li: int, pages: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted pages layer ``li`` reads at step ``t`` under ``pages`` (share -> pages) and each one's bucket,
        as ``StepPlanner.select`` chooses them (every leaf scores this step's query)."""
        st = self.steps[t]
        n = math.ceil(st["seq_len"] / self.P)
        grant = Grant(False, dict(pages))
        keep = sum(grant[s] for s in query_aware_shares())
        heavy = self.heavy[t][li]

        def page_scores():
            key = (t, li, keep)
            if key not in self._rscores:
                self._rscores[key] = retrieval_scores(st["page_bounds"][li], st["group_bounds"][li], keep, self.G,
                                                      self.scale)
            return self._rscores[key]

        def chunk_spans():
            return page_spans_for(self.delims, st["seq_len"], self.P, self.chunk_tokens)

        ctx = LeafContext(num_pages=n, taken=torch.zeros(n, dtype=torch.bool), heavy_scores=heavy,
                          page_scores=page_scores, chunk_spans=chunk_spans, chunk_scores=lambda: heavy)
        chosen, ids = [], []
        for name, leaf in LEAVES.items():
            p = leaf.select(ctx, grant)
            ctx.taken[p] = True
            chosen.append(p)
            b = BUCKETS.index(leaf.ranked_shares[0]) if leaf.ranked_shares else len(BUCKETS) - 1
            ids.append(torch.full_like(p, b))
        sel, order = torch.sort(torch.cat(chosen))
        b = torch.cat(ids)[order]
        b[sel < grant["sink"]] = 0
        b[sel >= n - max(grant["recent"], 1)] = 1
        return sel, b

    def step(self, t: int, pages: dict, signals: bool = True) -> tuple[float, Optional[list]]:
        """``(captured mass, bucket masses [layers][buckets])`` of step ``t`` under ``pages``: the true mass on the
        selected pages (mean over heads and layers), and per layer the routed attention's mass per bucket (None
        when ``signals`` is False: the captured mass only, cheaper)."""
        key = (t, tuple(sorted((k, v) for k, v in pages.items() if v)))
        hit = self._cache.get(key)
        if hit is not None and (hit[1] is not None or not signals):
            return hit
        cap, rows = 0.0, []
        nb = len(BUCKETS)
        for li in range(self.layers):
            sel, b = self.select(t, li, pages)
            cap += float(self.mass_mean[t][li, sel].sum())
            if signals:
                mh = self.mass[t][li][:, sel]  # [Hq, K]
                w = (mh / mh.sum(dim=1, keepdim=True).clamp(min=1e-12)).mean(dim=0)
                rows.append(torch.zeros(nb).index_add_(0, b, w).tolist())
        out = (cap / self.layers, rows if signals else None)
        self._cache[key] = out
        return out


# ---------------------------------------------------------------------------------------------------- candidates
def candidate_splits(static: dict, grid: int = 8) -> list[dict]:
    """Every split of the movable pages a grid of fractions (steps of 1/grid) gives once clipped and rounded as
    the learned router does (``learned.share_bounds``: heavy and chunk may grow from 0 pages); the static split
    first."""
    movable, lo, hi = share_bounds(static)
    if len(movable) < 2:
        return [dict(static)]
    cur = {s: static.get(s, 0) for s in movable}
    total = sum(cur.values())
    seen, out = set(), []

    def add(pages):
        key = tuple(pages[s] for s in movable)
        if key not in seen:
            seen.add(key)
            out.append({**static, **pages})

    add(cur)
    for parts in itertools.product(range(grid + 1), repeat=len(movable)):
        if sum(parts) != grid:
            continue
        add(rescale(cur, {s: total * p / grid for s, p in zip(movable, parts)}, lo, hi))
    return out


def moved_share(a: dict, b: dict) -> float:
    movable = [s for s in SHARES if a.get(s, 0) or b.get(s, 0)]
    total = sum(a.get(s, 0) for s in movable) or 1
    return sum(abs(a.get(s, 0) - b.get(s, 0)) for s in movable) / 2 / total


def fractions(pages: dict) -> list[float]:
    total = sum(pages.get(s, 0) for s in SHARES) or 1
    return [pages.get(s, 0) / total for s in SHARES]


# ---------------------------------------------------------------------------------------------------- data set
@dataclass
class Case:
    """One trace at one budget."""

    sim: TraceSim
    frac: float
    budget: int
    static: dict
    cands: list
    cap: Optional[torch.Tensor] = None  # [candidates, steps]
    name: str = ""
    extra: dict = field(default_factory=dict)


def build_case(sim: TraceSim, frac: float, grid: int) -> Case:
    budget = budget_tokens(sim.prompt_tokens, frac)
    static = static_pages(budget, sim.P)
    cands = candidate_splits(static, grid)
    cap = torch.tensor([[sim.step(t, c, signals=False)[0] for t in range(len(sim.steps))] for c in cands])
    m = sim.meta
    return Case(sim, frac, budget, static, cands, cap, f"{m['task']}-{m['length']}-s{m['seed']}-i{m['index']}")


def online_features(case: Case, pages: dict, ema: float) -> list[list[float]]:
    """The gate's features as the router would see them while ``pages`` is in force: before step 0 (from the
    prefill signal) and after observing each step."""
    sim = case.sim
    rs = AdaptiveState()
    signal = sim.prefill_signal(pages)
    out = sum(signal) / len(signal)
    rs.mass = {"sink": 0.0, "recent": 1.0 - out}
    movable = share_bounds(case.static)[0]
    cur = {s: pages.get(s, 0) for s in movable}
    feats = []
    for t in range(len(sim.steps)):
        rs.seq_len = sim.seq_len(t)
        feats.append(gate_features(rs, cur, rs.seq_len, case.budget))
        _, rows = sim.step(t, pages)
        L = len(rows)
        mean = [sum(r[i] for r in rows) / L for i in range(len(BUCKETS))]
        for name, m in zip(BUCKETS, mean):
            rs.mass[name] = (1 - ema) * rs.mass.get(name, m) + ema * m if rs.steps else m
        rs.steps += 1
    return feats


def make_examples(cases: list[Case], stability: float, ema: float, starts: int, rng: random.Random):
    """``(features, allowed mask, target fractions)`` tensors: for each case, split in force (static + ``starts``
    random candidates) and step t, the fractions of the candidate with the best mean captured mass over the steps
    from t on, less ``stability`` x the share of movable pages it moves."""
    X, M, Y = [], [], []
    for case in cases:
        movable = share_bounds(case.static)[0]
        if len(movable) < 2:
            continue
        mask = [s in movable for s in SHARES]
        in_force = [0] + rng.sample(range(1, len(case.cands)), min(starts, len(case.cands) - 1))
        for ci in in_force:
            cur = case.cands[ci]
            feats = online_features(case, cur, ema)
            moved = torch.tensor([moved_share(cur, c) for c in case.cands])
            for t in range(len(feats)):
                value = case.cap[:, t:].mean(dim=1) - stability * moved
                best = int(torch.argmax(value))
                X.append(feats[t])
                M.append(mask)
                Y.append(fractions(case.cands[best]))
    return torch.tensor(X), torch.tensor(M), torch.tensor(Y)


# ---------------------------------------------------------------------------------------------------- the gate
def train_gate(X, M, Y, hidden: int, iters: int, lr: float, seed: int, weight_decay: float = 1e-4):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, Y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for i in range(iters):
        logits = net(X).masked_fill(~M, float("-inf"))
        logp = torch.log_softmax(logits, dim=1).masked_fill(~M, 0.0)
        loss = -(Y * logp).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, float(loss.detach())


def gate_json(net, provenance: dict) -> dict:
    layers = [{"w": [[round(float(v), 6) for v in row] for row in mod.weight.detach()],
               "b": [round(float(v), 6) for v in mod.bias.detach()]} for mod in net if isinstance(mod, torch.nn.Linear)]
    return {"format": FORMAT, "version": VERSION, "features": list(FEATURES), "shares": list(SHARES),
            "layers": layers, "trained_on": provenance}


# ---------------------------------------------------------------------------------------------------- evaluation
def run_policy(case: Case, router: str, gate_path: Optional[str] = None, interval: int = 4) -> float:
    """Mean captured mass over the trace's steps with the real router policy deciding every step."""
    from sglang_mux.memory.requests import RequestMemory
    from sglang_mux.router.spine import ROUTER_POLICIES

    cfg = MuxConfig(budget=case.budget, page_size=case.sim.P, router=router, router_gate=gate_path or "",
                    router_interval=interval)
    policy = ROUTER_POLICIES[router](cfg)
    st = RequestMemory()
    sim = case.sim
    caps = []
    for t in range(len(sim.steps)):
        d = policy.decide(st, sim.seq_len(t), False, lambda: sim.prefill_signal(case.static))
        pages = dict(d.grant.pages)
        cap, rows = sim.step(t, pages)
        caps.append(cap)
        if policy.wants_signals:
            policy.observe(st, rows, d.grant)
    return sum(caps) / len(caps)


def oracle(case: Case) -> float:
    """The most mass the same number of pages can capture: per step and layer, the best pages by true mass."""
    sim = case.sim
    k = sum(case.static.values()) + (case.static.get("recent", 0) == 0)  # the window reads its tail page anyway
    return sum(float(mm.topk(min(k, mm.shape[1]), dim=1).values.sum(dim=1).mean()) for mm in sim.mass_mean) / len(
        sim.mass_mean)


def evaluate(cases: list[Case], gate_path: str, interval: int) -> dict:
    """{(task, frac): {column: mean captured mass}} and the overall means."""
    table: dict = {}
    for case in cases:
        row = {
            "static": run_policy(case, "static"),
            "adaptive": run_policy(case, "adaptive", interval=interval),
            "learned": run_policy(case, "learned", gate_path, interval=interval),
            "best": float(case.cap.mean(dim=1).max()),
        }
        row["oracle"] = oracle(case)
        key = (case.sim.meta["task"], case.frac)
        for k, v in row.items():
            table.setdefault(key, {}).setdefault(k, []).append(v)
    return {k: {c: sum(v) / len(v) for c, v in cols.items()} | {"n": len(cols["static"])} for k, cols in table.items()}


def markdown(table: dict) -> str:
    cols = ["static", "adaptive", "learned", "best"]
    head = "| task | budget | prompts | static | adaptive | learned (gate) | best split in hindsight |"
    cols.append("oracle")
    head += " oracle (best pages per layer) |"
    lines = [head, "|---|---|---:|" + "---:|" * len(cols)]
    for frac in FRACTIONS:
        keys = [k for k in table if k[1] == frac]
        for k in sorted(keys):
            r = table[k]
            lines.append(f"| {k[0]} | 1/{round(1 / frac)} | {r['n']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
        if keys:
            mean = {c: sum(table[k][c] for k in keys) / len(keys) for c in cols}
            lines.append(f"| **mean** | 1/{round(1 / frac)} | {sum(table[k]['n'] for k in keys)} | "
                         + " | ".join(f"**{mean[c]:.4f}**" for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def load_traces(folder: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(folder, "*.pt")))
    if not paths:
        raise SystemExit(f"no traces (*.pt) in {folder}: run scripts/record_router_traces.py first")
    return [torch.load(p, weights_only=False) for p in paths]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="?", default=DEFAULT_TRACES)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"gate file to write (default {DEFAULT_OUT})")
    ap.add_argument("--held-out-seeds", default="2", help="trace seeds kept out of training (evaluated)")
    ap.add_argument("--grid", type=int, default=5, help="candidate splits: fractions in steps of 1/GRID")
    ap.add_argument("--stability", type=float, default=0.02,
                    help="penalty per share of the movable pages a split change moves (in captured mass)")
    ap.add_argument("--starts", type=int, default=4, help="random splits in force per case, besides the static one")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=MuxConfig.router_ema, help="--mux-router-ema the features use")
    ap.add_argument("--interval", type=int, default=1,
                    help="--mux-router-interval of the evaluation (the traces are short: 1 lets the split move)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", help="also write the held-out table (markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    traces = load_traces(args.traces)
    held = {int(s) for s in args.held_out_seeds.split(",") if s.strip()}
    sims = [TraceSim(t) for t in traces]
    train_sims = [s for s in sims if s.meta["seed"] not in held]
    test_sims = [s for s in sims if s.meta["seed"] in held]
    if not train_sims or not test_sims:
        raise SystemExit(f"--held-out-seeds {args.held_out_seeds}: need traces on both sides "
                         f"(seeds: {sorted({s.meta['seed'] for s in sims})})")
    from tqdm import tqdm

    cases = [build_case(s, f, args.grid) for s in tqdm(sims, desc="candidate splits", unit="trace") for f in FRACTIONS]
    train = [c for c in cases if c.sim in train_sims]
    test = [c for c in cases if c.sim in test_sims]
    rng = random.Random(args.seed)
    X, M, Y = make_examples(train, args.stability, args.ema, args.starts, rng)
    print(f"{len(train)} training cases, {len(test)} held-out, {X.shape[0]} examples ({time.time() - t0:.0f}s)")
    net, loss = train_gate(X, M, Y, args.hidden, args.iters, args.lr, args.seed)
    print(f"trained: cross entropy {loss:.4f} ({time.time() - t0:.0f}s)")
    tasks = sorted({s.meta["task"] for s in sims})
    provenance = {
        "model": "SmolLM2-135M-Instruct",
        "traces": "scripts/record_router_traces.py",
        "tasks": tasks,
        "lengths": sorted({s.meta["length"] for s in sims}),
        "train_seeds": sorted({s.meta["seed"] for s in train_sims}),
        "held_out_seeds": sorted(held),
        "samples": {"train": len(train_sims), "held_out": len(test_sims)},
        "decode_steps": sorted({len(s.steps) for s in sims}),
        "budgets": [f"1/{round(1 / f)}" for f in FRACTIONS],
        "objective": f"cross entropy to the fractions of the candidate split with the best captured attention "
                     f"mass over the steps ahead, less {args.stability} x the share of the movable pages it moves; "
                     f"page total fixed (the budget)",
        "examples": int(X.shape[0]),
        "hidden": args.hidden,
        "iters": args.iters,
    }
    gate = gate_json(net, provenance)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gate.json")
        with open(path, "w") as f:
            json.dump(gate, f)
        load_gate(path)  # checked like the server checks it
        table = evaluate(test, path, args.interval)
        load_gate.cache_clear()
    held_out = {}
    for frac in FRACTIONS:
        keys = [k for k in table if k[1] == frac]
        held_out[f"1/{round(1 / frac)}"] = {c: round(sum(table[k][c] for k in keys) / len(keys), 4)
                                             for c in table[keys[0]] if c != "n"}
    gate["trained_on"]["held_out_captured_mass"] = held_out
    gate["trained_on"]["evaluation"] = (f"mean captured attention mass per decode step, real router policies, "
                                        f"--mux-router-interval {args.interval}, uniform layers")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(gate, f, indent=1)
        f.write("\n")
    md = markdown(table)
    print(md)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")
    if args.report:
        with open(args.report, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
