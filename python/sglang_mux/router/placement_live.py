"""The placement recommendation a running server serves in ``/mux/stats`` (``--mux-placement-costs``).

The scheduler records each request it finishes (finish time, prompt tokens, output tokens) in a bounded window;
``/mux/stats`` asks :class:`~sglang_mux.router.placement.PlacementPolicy` for the prefill:decode worker ratio that
this recent traffic would need under the server's SLOs and the recorded costs. Finish times stand in for arrival
times: over a window in steady state both give the same rate, which is all the capacity plan uses.
"""

from __future__ import annotations

import os
import time
from collections import deque

from sglang_mux.config import MuxConfig
from sglang_mux.router.placement import SLO, PlacementError, PlacementPolicy, RecordedCosts, mux_device_kv

WINDOW = 512  # finished requests kept for the recommendation


_COSTS: dict[str, tuple[int, RecordedCosts]] = {}


def recorded_costs(path: str) -> RecordedCosts:
    """The costs file, parsed once and again only when it changes (``/mux/stats`` may be polled often)."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as e:
        raise PlacementError(f"costs file {path}: {e.strerror}") from None
    hit = _COSTS.get(path)
    if hit is None or hit[0] != stamp:
        hit = _COSTS[path] = (stamp, RecordedCosts.load(path))
    return hit[1]


class FinishedWindow:
    def __init__(self, maxlen: int = WINDOW):
        self._trace: deque[tuple[float, int, int]] = deque(maxlen=maxlen)

    def record(self, prompt_tokens: int, output_tokens: int, now: float | None = None) -> None:
        if prompt_tokens > 0 and output_tokens > 0:
            self._trace.append((time.monotonic() if now is None else now, int(prompt_tokens), int(output_tokens)))

    def __len__(self) -> int:
        return len(self._trace)

    def recommendation(self, cfg: MuxConfig) -> dict | None:
        """The policy's recommendation for the window (None without ``--mux-placement-costs``)."""
        if not cfg.placement_costs:
            return None
        out = {"costs": cfg.placement_costs, "slo_ttft_ms": cfg.slo_ttft, "slo_tpot_ms": cfg.slo_tpot, "window_requests": len(self)}
        if len(self) < 2:
            out["recommendation"] = None
            out["why"] = "fewer than 2 finished requests so far"
            return out
        try:
            policy = PlacementPolicy(recorded_costs(cfg.placement_costs), SLO.from_config(cfg))
            staging = cfg.staging * cfg.page_size if cfg.tiered else 0  # the staging area exists only with tiers
            kv = None if cfg.disable else mux_device_kv(cfg.budget, staging, cfg.page_size)
            trace = list(self._trace)
            out["recommendation"] = policy.recommend_ratio(trace, device_kv_tokens_per_request=kv)
            out["pd_break_even"] = policy.pd_break_even(trace, device_kv_tokens_per_request=kv)
        except PlacementError as e:  # e.g. the costs file changed since launch: say so, never fail the stats call
            out["recommendation"] = None
            out["why"] = str(e)
        return out


FINISHED = FinishedWindow()
