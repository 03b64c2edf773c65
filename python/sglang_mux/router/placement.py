"""SLO-aware placement: PD path or aggregated, per request; and the prefill:decode worker ratio for a trace.

Everything here is a pure function of numbers: recorded costs of one deployment (:class:`RecordedCosts`, measured
by ``benchmark/pd_costs.py``), the SLOs (``--mux-slo-ttft`` / ``--mux-slo-tpot``, ms) and a load snapshot
(queue depths). No server, no clock.

Latency model (ms). ``prefill(n) = prefill_fixed + n * prefill_per_token``; ``step(b)`` is one decode step of a
batch of ``b`` requests (plus a per-context-token term, mean context of the request);
``transfer(n) = transfer_fixed + n * transfer_per_token`` (PD only)::

    aggregated  TTFT = prefill(queued prompt tokens ahead + n) + step(running + 1)
                TPOT = step(running + 1) + prefill(queued + n) / expected output tokens   (prefill stalls decode)
    PD          TTFT = prefill(prefill-queue tokens ahead + n) + transfer(n) + step(decode running + 1)
                TPOT = step(decode running + 1)                                           (no prefill interference)

Decision: the path whose worst normalised slack ``min(1 - TTFT/slo_ttft, 1 - TPOT/slo_tpot)`` is larger; a tie
(within ``tie_margin``) stays aggregated (no transfer, no second hop).

Worker ratio for a trace (arrivals, prompt and output lengths), a standard capacity plan::

    prefill workers = ceil( sum prefill(n_i) / (duration * max_utilisation) )
    decode  workers = ceil( concurrent decoding requests / per-worker batch ),
        concurrent   = sum out_i * step(b) / duration                  (Little's law)
        batch b      = largest b with step(b) <= slo_tpot, and b * device KV per request <= device KV capacity
        device KV per request = min(context, mux budget + staging) with mux, the whole context without.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PATHS = ("aggregated", "pd")


class PlacementError(ValueError):
    """A bad cost, SLO or trace value; the message names the field and what is allowed (one line)."""


def _positive(name: str, v, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PlacementError(f"{name}: expected a finite number, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise PlacementError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class RecordedCosts:
    """Measured costs of one deployment, in ms (``benchmark/pd_costs.py`` records them as JSON)."""

    prefill_fixed_ms: float
    prefill_per_token_ms: float
    decode_step_fixed_ms: float          # one decode step of a batch of 1 ...
    decode_step_per_request_ms: float    # ... plus this per extra request in the batch
    transfer_fixed_ms: float             # PD: bootstrap + handshake + completion poll, per request
    transfer_per_token_ms: float         # PD: KV bytes of one token over the transfer engine
    device_kv_capacity_tokens: int = 0   # KV tokens a decode worker can hold (0: no memory limit)
    decode_step_per_context_token_ms: float = 0.0  # ... plus this per token of the request's context
    source: str = ""                     # where the numbers came from (script, machine)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "source":
                continue
            _positive(f"costs.{f.name}", getattr(self, f.name), allow_zero=True)
        if self.decode_step_fixed_ms <= 0:
            raise PlacementError(f"costs.decode_step_fixed_ms: must be > 0, got {self.decode_step_fixed_ms!r}")

    def prefill(self, tokens: float) -> float:
        return self.prefill_fixed_ms + tokens * self.prefill_per_token_ms if tokens > 0 else 0.0

    def step(self, batch: int, context_tokens: int = 0) -> float:
        return (self.decode_step_fixed_ms + max(batch - 1, 0) * self.decode_step_per_request_ms
                + context_tokens * self.decode_step_per_context_token_ms)

    def transfer(self, tokens: int) -> float:
        return self.transfer_fixed_ms + tokens * self.transfer_per_token_ms

    @classmethod
    def load(cls, path: str | Path) -> "RecordedCosts":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlacementError(f"costs file {path}: {e}") from None
        data = data.get("costs", data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlacementError(f"costs file {path}: unknown keys {unknown}; allowed: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise PlacementError(f"costs file {path}: {e}") from None


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float

    def __post_init__(self) -> None:
        _positive("--mux-slo-ttft", self.ttft_ms)
        _positive("--mux-slo-tpot", self.tpot_ms)

    @classmethod
    def from_config(cls, cfg) -> "SLO":
        return cls(cfg.slo_ttft, cfg.slo_tpot)

    def met(self, ttft_ms: float, tpot_ms: float) -> bool:
        return ttft_ms <= self.ttft_ms and tpot_ms <= self.tpot_ms


@dataclass(frozen=True)
class Load:
    """Queue depths seen now. Aggregated: one pool; PD: the prefill queue and the decode batch."""

    aggregated_queued_tokens: int = 0
    aggregated_running: int = 0
    prefill_queued_tokens: int = 0
    decode_running: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PlacementError(f"load.{f.name}: expected an integer >= 0, got {v!r}")


@dataclass(frozen=True)
class Prediction:
    ttft_ms: float
    tpot_ms: float

    def slack(self, slo: SLO) -> float:
        """Worst normalised slack: > 0 when both objectives are met, the tighter one decides."""
        return min(1.0 - self.ttft_ms / slo.ttft_ms, 1.0 - self.tpot_ms / slo.tpot_ms)


@dataclass(frozen=True)
class Decision:
    path: str                      # "pd" or "aggregated"
    predicted: dict                # path -> Prediction
    reason: str


def predict(path: str, prompt_tokens: int, output_tokens: int, load: Load, costs: RecordedCosts) -> Prediction:
    """TTFT and TPOT of one request on ``path`` under ``load`` (the model in the module docstring)."""
    context = prompt_tokens + output_tokens // 2  # the request's mean context while it decodes
    if path == "aggregated":
        prefill = costs.prefill(load.aggregated_queued_tokens + prompt_tokens)
        step = costs.step(load.aggregated_running + 1, context)
        return Prediction(prefill + step, step + prefill / max(output_tokens, 1))
    if path == "pd":
        step = costs.step(load.decode_running + 1, context)
        ttft = costs.prefill(load.prefill_queued_tokens + prompt_tokens) + costs.transfer(prompt_tokens) + step
        return Prediction(ttft, step)
    raise PlacementError(f"path: allowed: {', '.join(PATHS)}; got {path!r}")


@dataclass
class PlacementStats:
    """Counters the policy keeps; served with the benchmark's results (and, wired in, with /mux/stats)."""

    decisions: dict = field(default_factory=lambda: {p: 0 for p in PATHS})
    predicted_slo_met: int = 0
    recommendation: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class PlacementPolicy:
    """Per-request path choice and the worker-ratio recommendation, over recorded costs and SLOs."""

    def __init__(self, costs: RecordedCosts, slo: SLO, *, tie_margin: float = 0.02):
        self.costs, self.slo, self.tie_margin = costs, slo, tie_margin
        self.stats = PlacementStats()

    def decide(self, prompt_tokens: int, output_tokens: int, load: Load) -> Decision:
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 1:
            raise PlacementError(f"prompt_tokens: expected an integer >= 1, got {prompt_tokens!r}")
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 1:
            raise PlacementError(f"output_tokens: expected an integer >= 1, got {output_tokens!r}")
        pred = {p: predict(p, prompt_tokens, output_tokens, load, self.costs) for p in PATHS}
        s_agg, s_pd = pred["aggregated"].slack(self.slo), pred["pd"].slack(self.slo)
        if s_pd > s_agg + self.tie_margin:
            path, reason = "pd", f"slack pd {s_pd:.3f} > aggregated {s_agg:.3f}"
        else:
            path, reason = "aggregated", f"slack aggregated {s_agg:.3f} >= pd {s_pd:.3f} - margin"
        self.stats.decisions[path] += 1
        self.stats.predicted_slo_met += int(self.slo.met(pred[path].ttft_ms, pred[path].tpot_ms))
        return Decision(path, pred, reason)

    def recommend_ratio(
        self,
        trace: list[tuple[float, int, int]],
        *,
        max_utilisation: float = 0.7,
        device_kv_tokens_per_request=None,
    ) -> dict:
        """Prefill and decode worker counts for ``trace`` = [(arrival_s, prompt_tokens, output_tokens), ...].

        ``device_kv_tokens_per_request(prompt, output) -> tokens`` is the decode-side device KV of one request
        (default: the whole context, stock SGLang; :func:`mux_device_kv` for mux). Stored in ``stats``.
        """
        if not 0 < max_utilisation <= 1:
            raise PlacementError(f"max_utilisation: must be in (0, 1], got {max_utilisation!r}")
        rec = self._ratio(self._totals(trace, device_kv_tokens_per_request), max_utilisation)
        self.stats.recommendation = rec
        return rec

    def _totals(self, trace, device_kv_tokens_per_request=None) -> dict:
        """What the capacity plans read from a trace: its span, prefill work, output tokens, device KV per request."""
        if not trace:
            raise PlacementError("trace: expected at least one (arrival_s, prompt_tokens, output_tokens)")
        kv_of = device_kv_tokens_per_request or (lambda n, m: n + m)
        arrivals = [a for a, _, _ in trace]
        return {
            "requests": len(trace),
            "duration_ms": max(max(arrivals) - min(arrivals), 1e-3) * 1000.0,
            "prefill_ms": sum(self.costs.prefill(n) for _, n, _ in trace),
            "out_tokens": sum(m for _, _, m in trace),
            "kv_per_req": max(kv_of(n, m) for _, n, m in trace),
        }

    def _ratio(self, t: dict, max_utilisation: float) -> dict:
        duration_ms, prefill_ms, kv_per_req = t["duration_ms"], t["prefill_ms"], t["kv_per_req"]
        n_prefill = max(1, math.ceil(prefill_ms / (duration_ms * max_utilisation)))
        # Largest batch a decode worker may run: TPOT objective, then device KV capacity.
        c = self.costs
        if c.decode_step_per_request_ms > 0:
            b_tpot = int((self.slo.tpot_ms - c.decode_step_fixed_ms) // c.decode_step_per_request_ms) + 1
        else:
            b_tpot = 1 << 30
        b_tpot = max(b_tpot, 1) if self.slo.tpot_ms >= c.decode_step_fixed_ms else 0
        b_mem = c.device_kv_capacity_tokens // kv_per_req if c.device_kv_capacity_tokens else 1 << 30
        batch = min(b_tpot, b_mem)
        if batch < 1:
            why = "TPOT objective below one decode step" if b_tpot < 1 else "one request's KV exceeds a decode worker"
            rec = {"prefill_workers": n_prefill, "decode_workers": None, "feasible": False, "why": why}
        else:
            step_ms = c.step(batch)
            concurrent = t["out_tokens"] * step_ms / duration_ms
            n_decode = max(1, math.ceil(concurrent / batch))
            rec = {
                "prefill_workers": n_prefill,
                "decode_workers": n_decode,
                "ratio": f"{n_prefill}:{n_decode}",
                "feasible": True,
                "decode_batch": batch,
                "decode_batch_limit": "tpot" if b_tpot <= b_mem else "device_kv",
                "prefill_utilisation": prefill_ms / (duration_ms * n_prefill),
                "concurrent_decoding": concurrent,
            }
        rec["device_kv_tokens_per_request"] = kv_per_req
        return rec

    # ------------------------------------------------------------------ where PD stops paying
    def aggregated_workers(
        self,
        trace: list[tuple[float, int, int]],
        *,
        max_utilisation: float = 0.7,
        device_kv_tokens_per_request=None,
        max_workers: int = 1 << 16,
    ) -> dict:
        """Aggregated workers (prefill and decode on the same ones) that serve ``trace`` within the TPOT objective.

        With ``N`` workers each spends ``u = sum prefill(n_i) / (duration * N)`` of its time prefilling, which stalls
        its decode batch: ``TPOT = step(b) / (1 - u)``, ``b`` its share of the concurrent decoding requests
        (Little's law, ``sum out_i * TPOT / duration``, iterated to a fixed point). ``N`` is the smallest with
        ``u <= max_utilisation``, ``TPOT <= slo_tpot`` and ``b`` requests' device KV within the capacity."""
        return self._aggregated(self._totals(trace, device_kv_tokens_per_request), max_utilisation, max_workers)

    def _aggregated(self, t: dict, max_utilisation: float, max_workers: int = 1 << 16) -> dict:
        duration_ms, prefill_ms, out_tokens = t["duration_ms"], t["prefill_ms"], t["out_tokens"]
        cap = self.costs.device_kv_capacity_tokens
        fewest = max(1, math.ceil(prefill_ms / (duration_ms * max_utilisation)))  # below: u > max_utilisation
        for workers in range(fewest, max_workers + 1):
            u = prefill_ms / (duration_ms * workers)
            tpot = self.costs.step(1)
            for _ in range(50):
                batch = max(1, math.ceil(out_tokens * tpot / duration_ms / workers))
                new = self.costs.step(batch) / (1.0 - u)
                if abs(new - tpot) < 1e-9:
                    break
                tpot = new
            if tpot <= self.slo.tpot_ms and (not cap or batch * t["kv_per_req"] <= cap):
                return {"workers": workers, "prefill_utilisation": u, "tpot_ms": tpot, "decode_batch": batch,
                        "feasible": True}
        return {"workers": None, "feasible": False, "why": f"no aggregated deployment of <= {max_workers} workers meets "
                                                           f"the TPOT objective"}

    def pd_break_even(
        self,
        trace: list[tuple[float, int, int]],
        *,
        max_utilisation: float = 0.7,
        device_kv_tokens_per_request=None,
    ) -> dict:
        """Whether PD pays for ``trace``, and where it stops paying.

        * ``pd_workers`` = prefill + decode workers (:meth:`recommend_ratio`) against ``aggregated_workers``
          (:meth:`aggregated_workers`) for the same objectives; PD pays when it needs fewer (a tie stays
          aggregated: no transfer, no second hop).
        * ``pd_pays_from_rate_rps``: the same mix of requests replayed faster or slower (arrival times scaled), the
          lowest arrival rate (requests / s over the trace's span) from which PD needs fewer workers, found on a
          grid from 1/64x to 64x the trace's rate and refined by bisection to 1 %; None when it never does there.
          Below it, aggregated serving is cheaper: that is where PD stops paying.
        * ``pd_pays_from_prompt_tokens``: for one request at this trace's load (its median output length, the
          concurrent decoding requests spread over the workers above), the shortest prompt that
          :meth:`decide` sends to PD (None: none up to 1M tokens).
        """
        if not 0 < max_utilisation <= 1:
            raise PlacementError(f"max_utilisation: must be in (0, 1], got {max_utilisation!r}")
        totals = self._totals(trace, device_kv_tokens_per_request)

        def plans(scale: float) -> tuple[dict, dict]:
            t = {**totals, "duration_ms": totals["duration_ms"] / scale}
            return self._ratio(t, max_utilisation), self._aggregated(t, max_utilisation)

        def pd_total(rec: dict) -> int | None:
            return rec["prefill_workers"] + rec["decode_workers"] if rec.get("feasible") else None

        def pays(scale: float) -> bool:
            rec, agg = plans(scale)
            pd = pd_total(rec)
            return pd is not None and (agg["workers"] is None or pd < agg["workers"])

        rec, agg = plans(1.0)
        rate = totals["requests"] / (totals["duration_ms"] / 1000.0)
        grid = [2.0 ** (k / 4.0) for k in range(-24, 25)]  # 1/64x .. 64x, 4 steps per doubling
        first = next((i for i, sc in enumerate(grid) if pays(sc)), None)
        from_rate = None
        if first is not None:
            lo, hi = (grid[first - 1] if first > 0 else None), grid[first]
            while lo is not None and hi / lo > 1.01:
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if pays(mid) else (mid, hi)
            from_rate = rate * hi
        # one request at this load: the decode batch per worker on each path, minus itself
        outputs = sorted(m for _, _, m in trace)
        median_out = outputs[len(outputs) // 2]
        d_batch = math.ceil(rec["concurrent_decoding"] / rec["decode_workers"]) if rec.get("feasible") else 1
        load = Load(aggregated_running=max(0, (agg.get("decode_batch") or 1) - 1), decode_running=max(0, d_batch - 1))
        from_prompt, n = None, 1
        while n <= 1 << 20:
            if self._prefers_pd(n, median_out, load):
                lo, hi = n // 2, n  # lo does not prefer PD (or is 0)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if self._prefers_pd(mid, median_out, load) else (mid, hi)
                from_prompt = hi
                break
            n *= 2
        pd = pd_total(rec)
        return {
            "pd_workers": pd,
            "aggregated_workers": agg["workers"],
            "pd_pays": pd is not None and (agg["workers"] is None or pd < agg["workers"]),
            "trace_rate_rps": rate,
            "pd_pays_from_rate_rps": from_rate,
            "pd_pays_from_prompt_tokens": from_prompt,
        }

    def _prefers_pd(self, prompt_tokens: int, output_tokens: int, load: Load) -> bool:
        pred = {p: predict(p, max(prompt_tokens, 1), max(output_tokens, 1), load, self.costs) for p in PATHS}
        return pred["pd"].slack(self.slo) > pred["aggregated"].slack(self.slo) + self.tie_margin


def mux_device_kv(budget: int, staging_tokens: int = 0, page_size: int = 16):
    """Decode-side device KV of one request with mux: its context up to the budget (+ staging, + one page)."""

    def kv(prompt_tokens: int, output_tokens: int) -> int:
        return min(prompt_tokens + output_tokens, budget + staging_tokens + page_size)

    return kv
