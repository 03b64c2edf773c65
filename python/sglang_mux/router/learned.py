"""The ``learned`` router policy: the adaptive router with the split of the movable pages chosen by a gate.

Everything but the split proposal is the adaptive policy's (signals, trigger, hysteresis, layer spread, fallback;
``router/adaptive.py``). Every ``--mux-router-interval`` steps the gate (``router/gate.py``: a small MLP trained
offline on traces of the real model, ``scripts/train_router_gate.py``) maps the request's signals to fractions of
its movable pages (window + ranked shares); the proposal keeps each share within ``[1/4, 3]`` x its static pages (a
ranked share with none, such as chunk, may grow from 0: ``share_bounds``) and the same total, and goes through the
same hysteresis as the adaptive one.
"""

from __future__ import annotations

import math
from typing import Optional

from sglang_mux.router.adaptive import AdaptiveRouter, AdaptiveState, buckets, rescale, share_limits
from sglang_mux.router.gate import SHARES, load_gate
from sglang_mux.router.spine import register_router_policy


def gate_features(rs: AdaptiveState, cur: dict, seq_len: int, budget: int) -> list[float]:
    """The gate's input (``gate.FEATURES``, in order) for a request's state and the pages in force."""
    masses = [rs.mass.get(b, 0.0) for b in ("sink", "recent", "heavy", "retrieval", "chunk", "other")]
    total = sum(cur.get(s, 0) for s in SHARES) or 1
    fracs = [cur.get(s, 0) / total for s in SHARES]
    return [*masses, rs.out_of_hot, *fracs, math.log2(max(seq_len, 1) / max(budget, 1))]


def share_bounds(static: dict) -> tuple[list[str], dict, dict]:
    """The shares the gate may move pages between, and each one's bounds (floats; the proposal is rounded).

    A share the static grant gives pages stays within ``[1/4, 3]`` x them (the window keeps at least its tail
    page). A ranked share it gives none (chunk by default; heavy when the budget is under 8 pages) may grow from 0
    up to the static pages of the largest ranked share: at small budgets that is where the traces say the missing
    mass is (``scripts/train_router_gate.py``). Sinks never move.

        static recent 1, heavy 0, retrieval 6, chunk 0  ->  recent [1, 3], retrieval [1.5, 18], heavy and chunk [0, 6]
    """
    movable = [s for s in SHARES if static.get(s, 0) > 0]
    lo, hi = share_limits(static, movable)
    cap = max((static.get(s, 0) for s in SHARES if s != "recent"), default=0)
    for s in SHARES:
        if s != "recent" and s in static and static[s] == 0 and cap > 0:
            movable.append(s)
            lo[s], hi[s] = 0, cap
    movable.sort(key=SHARES.index)
    return movable, lo, hi


class LearnedRouter(AdaptiveRouter):
    name = "learned"

    def gate(self, cfg):
        return load_gate(cfg.router_gate or None)  # cached per path; checked at launch when this policy is used

    def propose(self, rs: AdaptiveState, static: dict, cfg) -> Optional[dict]:
        movable, lo, hi = share_bounds(static)
        if len(movable) < 2:
            return None
        cur = {s: (rs.pages or static).get(s, static.get(s, 0)) for s in movable}
        total = sum(cur.values())
        fractions = self.gate(cfg).split(gate_features(rs, cur, rs.seq_len, cfg.budget), movable)
        targets = {s: fractions[s] * total for s in movable}
        return rescale(cur, targets, lo, hi)


assert set(buckets()) >= set(SHARES), "the gate's shares must be buckets the planner measures"
register_router_policy(LearnedRouter)
