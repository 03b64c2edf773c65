"""The ``adaptive`` router policy: the split follows where attention went, with hysteresis, and the expensive
leaves run only when a trigger fires.

Signals (measured by the step planner after each routed step, per layer, averaged over heads): the attention mass
on the pages of each *bucket*: ``sink`` and ``recent`` (the hot pages, by position), then one bucket per ranked
share (``heavy``, ``retrieval``, ``chunk``: the pages that leaf chose), then ``other``. Each request keeps an
exponential moving average (``--mux-router-ema``) of them, over layers and per layer.

    out-of-hot mass   1 - sink - recent: how much the step needed pages outside the always-read ones
    mass per page     mass of a share / its pages: what one more page of that share is worth

Decisions, per request:

* **Trigger** (every step): the query-aware leaves (retrieval, chunk) score this step's query only when the
  out-of-hot mass is at least ``--mux-router-trigger-mass``, or ``--mux-router-max-stale`` steps passed since they
  last did. Otherwise they reuse the pages they chose last (the planner keeps them per layer), and before they ever
  ran they rank by the heavy-hitter scores: no page scoring. The first decision uses the prefill's observation
  window (the same mass, measured at prefill), which crosses PD with the heavy scores.
* **Split** (every ``--mux-router-interval`` steps): pages move between the window and the ranked shares, each
  share's new size ``pages * sqrt(mass per page / mean mass per page)``, clipped to ``[1/4, 3]`` x its static
  size (the window keeps at least its tail page), largest-remainder rounded to the same total: the grant's pages
  always sum to the static grant's. Sinks stay as granted.
* **Hysteresis**: a proposal is applied only when it moves at least ``--mux-router-hysteresis`` of the movable
  pages (and at least one) and the previous proposal pointed the same way (every share moving in the same
  direction); a signal that flips every step never changes the split.
* **Layers**: at the same points, each layer's share of the ranked pages follows its out-of-hot mass (a layer
  whose attention leaves the hot pages gets more), clipped to ``[1/4, 3]`` x, with the same hysteresis.
* **Fallback**: a request whose out-of-hot mass stays above ``--mux-router-fail-mass`` for
  ``--mux-router-fail-steps`` steps is flagged (counted once); while the KV pool has room (a quarter free) its
  ranked shares read ``--mux-router-boost`` x their pages.

Worked example (interval 1, EMA 1, hysteresis 0.1): static recent 4, heavy 2, retrieval 8 pages; masses recent
0.05, heavy 0.30, retrieval 0.45 -> mass per page 0.0125 / 0.15 / 0.056, mean 0.8 / 14 = 0.057 -> targets
4 x 0.47 = 1.9, 2 x 1.62 = 3.2, 8 x 0.99 = 7.9 (13.0) -> rescaled to 14 pages 2.0, 3.4, 8.5 -> recent 2, heavy 3,
retrieval 9 (moved 2 of 14 >= 1.4): applied when the next proposal agrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from sglang_mux.leaves import ranked_shares
from sglang_mux.metrics import STATS
from sglang_mux.router.grant import Grant
from sglang_mux.router.layer_budget import split_total
from sglang_mux.router.spine import EXACT_DECISION, RouteDecision, RouterPolicy, register_router_policy

CLIP = (0.25, 3.0)  # a share's pages (and a layer's factor) stay within these multiples of the static ones
ROOM_FRACTION = 0.25  # the pool has room for a boost when this share of it is free


def buckets() -> tuple[str, ...]:
    """Where each selected page's attention mass is counted: hot pages by position, the others by the ranked
    share of the leaf that chose them."""
    return ("sink", "recent", *ranked_shares(), "other")


@dataclass
class AdaptiveState:
    """One request's router state (``RequestMemory.router_state``)."""

    mass: dict = field(default_factory=dict)  # bucket -> EMA of its mass (mean over layers)
    layer_out: Optional[list] = None  # per layer, EMA of the out-of-hot mass
    pages: Optional[dict] = None  # share -> pages in force (None: the static grant's)
    factors: Optional[tuple] = None  # per-layer factors in force (None: --mux-layer-budget's)
    pending: Optional[tuple] = None  # direction of the last proposal not applied yet (split)
    pending_layers: Optional[tuple] = None  # same, layer factors
    steps: int = 0
    since_refresh: int = 0
    fail_streak: int = 0
    flagged: bool = False
    started: bool = False
    seq_len: int = 0  # the context at the last decision

    @property
    def out_of_hot(self) -> float:
        return max(0.0, 1.0 - self.mass.get("sink", 0.0) - self.mass.get("recent", 0.0))


def _direction(delta: dict) -> tuple:
    return tuple(sorted((k, (v > 0) - (v < 0)) for k, v in delta.items() if v))


def confirmed(rs: AdaptiveState, pending: str, delta: dict, large_enough: bool) -> bool:
    """The hysteresis of every decision: True when a proposal moved enough (``large_enough``) and points where the
    previous one pointed (its direction is kept in ``rs.<pending>`` until then); a proposal too small forgets it."""
    if not large_enough:
        setattr(rs, pending, None)
        return False
    direction = _direction(delta)
    if direction != getattr(rs, pending):  # wait for the next proposal to agree
        setattr(rs, pending, direction)
        return False
    setattr(rs, pending, None)
    return True


def share_limits(static: dict, shares) -> tuple[dict, dict]:
    """Each share's bounds in pages: within ``CLIP`` x its static pages; the window keeps at least its tail page."""
    lo = {s: max(1 if s == "recent" else 0, static[s] * CLIP[0]) for s in shares}
    hi = {s: static[s] * CLIP[1] for s in shares}
    return lo, hi


def rescale(pages: dict, targets: dict, lo: dict, hi: dict) -> dict:
    """``targets`` (floats) clipped to ``[lo, hi]`` per share and rounded to integers summing to ``sum(pages)``."""
    total = sum(pages.values())
    t = {k: min(max(targets[k], lo[k]), hi[k]) for k in pages}
    for _ in range(4):  # rescale to the total, then clip again (converges in a step or two)
        s = sum(t.values()) or 1.0
        t = {k: min(max(v * total / s, lo[k]), hi[k]) for k, v in t.items()}
    names = list(pages)
    out = split_total(total, [t[k] for k in names])
    return dict(zip(names, out))


class AdaptiveRouter(RouterPolicy):
    name = "adaptive"
    wants_signals = True

    # ------------------------------------------------------------------ per step
    def decide(self, state, seq_len, device_room, prefill_signal) -> RouteDecision:
        base = self.grant(seq_len, state.options)
        if base.exact:
            return EXACT_DECISION
        cfg = self.effective_config(state.options)
        rs = state.router_state
        if not isinstance(rs, AdaptiveState):
            rs = state.router_state = AdaptiveState()
        rs.seq_len = seq_len
        if not rs.started:
            rs.started = True
            signal = prefill_signal()
            if signal:  # the prefill's out-of-hot mass starts the averages
                out = sum(signal) / len(signal)
                rs.mass = {"sink": 0.0, "recent": 1.0 - out}
                rs.layer_out = list(signal)
            else:  # nothing measured: start refreshing, learn from the first steps
                rs.mass = {"sink": 0.0, "recent": 0.0}
        pages = dict(base.pages)
        if rs.pages is not None:
            pages.update(rs.pages)
        if rs.flagged and device_room and cfg.router_boost > 1.0 and rs.fail_streak >= cfg.router_fail_steps:
            for s in ranked_shares():
                if pages.get(s, 0) > 0:
                    pages[s] = int(math.ceil(pages[s] * cfg.router_boost))
            STATS.router_boosted_request_steps += 1
        stale = cfg.router_max_stale > 0 and rs.since_refresh >= cfg.router_max_stale
        refresh = rs.out_of_hot >= cfg.router_trigger_mass or stale
        rs.since_refresh = 0 if refresh else rs.since_refresh + 1
        if refresh:
            STATS.router_refresh_request_steps += 1
        else:
            STATS.router_reuse_request_steps += 1
        return RouteDecision(Grant(False, pages), refresh, rs.factors)

    # ------------------------------------------------------------------ after a step
    def observe(self, state, bucket_mass, grant: Grant) -> None:
        rs = state.router_state
        if not isinstance(rs, AdaptiveState) or not bucket_mass:
            return
        cfg = self.effective_config(state.options)
        a = cfg.router_ema
        names = buckets()
        L = len(bucket_mass)
        mean = [sum(row[i] for row in bucket_mass) / L for i in range(len(names))]
        for name, m in zip(names, mean):
            rs.mass[name] = (1 - a) * rs.mass.get(name, m) + a * m if rs.steps else m
        out_l = [max(0.0, 1.0 - row[0] - row[1]) for row in bucket_mass]
        if rs.layer_out is None or len(rs.layer_out) != L:
            rs.layer_out = out_l
        else:
            rs.layer_out = [(1 - a) * o + a * x for o, x in zip(rs.layer_out, out_l)]
        rs.steps += 1
        STATS.router_observed_request_steps += 1
        if rs.out_of_hot > cfg.router_fail_mass:
            rs.fail_streak += 1
            if rs.fail_streak >= cfg.router_fail_steps and not rs.flagged:
                rs.flagged = True
                STATS.router_flagged_requests += 1
        else:
            rs.fail_streak = 0
        if rs.steps % cfg.router_interval == 0:
            self.update_split(rs, state, cfg)
            self.update_layers(rs, cfg)

    def static_pages(self, state) -> dict:
        cfg = self.effective_config(state.options)
        return self.grant(cfg.budget + 1, state.options).pages  # the routed grant (any routed length)

    def propose(self, rs: AdaptiveState, static: dict, cfg) -> Optional[dict]:
        """The split the signals ask for (movable shares only), or None when there is nothing to move."""
        movable = [s for s in ("recent", *ranked_shares()) if static.get(s, 0) > 0]
        if len(movable) < 2:
            return None
        cur = {s: (rs.pages or static).get(s, static[s]) for s in movable}
        per_page = {s: rs.mass.get(s, 0.0) / max(cur[s], 1) for s in movable}
        total_pages = sum(cur.values())
        mean = sum(rs.mass.get(s, 0.0) for s in movable) / max(total_pages, 1)
        if mean <= 0:
            return None
        targets = {s: cur[s] * math.sqrt(max(per_page[s], 1e-9) / mean) for s in movable}
        return rescale(cur, targets, *share_limits(static, movable))

    def update_split(self, rs: AdaptiveState, state, cfg) -> None:
        static = self.static_pages(state)
        proposal = self.propose(rs, static, cfg)
        if proposal is None:
            return
        cur = {s: (rs.pages or static).get(s, static[s]) for s in proposal}
        delta = {s: proposal[s] - cur[s] for s in proposal}
        moved = sum(abs(v) for v in delta.values()) / 2
        if not confirmed(rs, "pending", delta, moved >= max(1.0, cfg.router_hysteresis * sum(cur.values()))):
            return
        rs.pages = {**(rs.pages or {}), **proposal}
        STATS.router_split_changes += 1

    def update_layers(self, rs: AdaptiveState, cfg) -> None:
        if not rs.layer_out or len(rs.layer_out) < 2:
            return
        need = [o + 0.05 for o in rs.layer_out]
        m = sum(need) / len(need)
        f = [min(max(x / m, CLIP[0]), CLIP[1]) for x in need]
        m = sum(f) / len(f)
        proposal = tuple(x / m for x in f)
        cur = rs.factors or (1.0,) * len(proposal)
        delta = {i: p - c for i, (p, c) in enumerate(zip(proposal, cur)) if abs(p - c) > 1e-3}
        if not confirmed(rs, "pending_layers", delta,
                         sum(abs(v) for v in delta.values()) / len(proposal) >= cfg.router_hysteresis):
            return
        rs.factors = proposal
        STATS.router_layer_changes += 1


register_router_policy(AdaptiveRouter)
