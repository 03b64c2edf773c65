"""SLO-aware admission (``--mux-slo-policy queue|shrink``): no new request may push the running batch's decode step
(the TPOT every running request sees) past ``--mux-slo-tpot``.

SGLang admits waiting requests whenever memory allows; each one admitted makes every later decode step of the whole
batch slower. Here, before SGLang builds a prefill batch (AROUND ``Scheduler.get_new_batch_prefill``), the waiting
queue is walked in order and each request's effect on the step time is predicted:

* fits: admitted (SGLang decides the rest as usual: memory, chunking, its own limits);
* does not fit, policy ``queue``: it and every request behind it stay in the waiting queue this step (first come,
  first served: a long request is not overtaken forever by short ones); they are tried again every step, and go in
  as the batch drains. A request never waits when nothing is running (nobody to protect);
* does not fit, policy ``shrink``: admitted with the largest device-KV budget (a multiple of the page size, at
  least 1/8 of its own budget) that fits; when even that does not, held as with ``queue``.

Step-time model (ms), fitted online from measured decode steps (:class:`StepModel`)::

    step(n requests, K KV tokens read) = fixed + per_request * (n - 1) + per_1k_kv * K / 1024

``K`` sums what each request's attention reads: its context, or with mux ``min(context, budget)`` (routed
requests read about their budget; ``mux_exact`` ones their whole context). A decode step is measured as the time
from the previous batch's result to the decode batch's result (BEFORE ``Scheduler.process_batch_result``): the
cadence a client sees as TPOT, scheduler work included. The fit is ridge regression with exponential forgetting (about the
last 200 steps); its prior is the decode-step costs of ``--mux-placement-costs`` weighted as ``--mux-slo-prior-steps``
measured steps, or without a file a weak pull of the two slopes toward 0. Until a step is measured and without a
file, nothing is predicted and every request is admitted. Once the measured steps outweigh the prior, every
prediction also adds the level offset: a moving average of how far the last measured steps were above (or below)
what the model predicted for them, so a sudden change of the machine's speed (other load) counts at once instead of
waiting for the fit.

Counted in ``/mux/stats`` and Prometheus: ``slo_deferred_requests``, ``slo_deferred_steps``, ``slo_shrunk_requests``,
``slo_waiting_held``, ``slo_step_samples``, ``slo_tpot_model``, ``slo_last_predicted_tpot_ms`` (docs/metrics.md).

Scope: the decision runs where SGLang builds prefill batches next to a running decode batch, i.e. an aggregated
server. A PD prefill server has no decode batch (nothing is ever held) and a PD decode server admits through
SGLang's transfer queues, not here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from sglang_mux.config import MuxConfig
from sglang_mux.metrics import STATS

logger = logging.getLogger(__name__)

POLICIES = ("off", "queue", "shrink")
FORGET = 0.995  # per measured step: the fit weighs the last ~1/(1-FORGET) = 200 steps
WEAK_PRIOR = 1.0  # without a costs file: the slopes are pulled toward 0 with the weight of one step
MIN_BUDGET_FRACTION = 8  # shrink never goes below 1/8 of the request's own budget
KV_UNIT = 1024.0
ANCHOR_EMA = 0.5  # weight of the newest measured step in the anchor of the prediction


class StepModel:
    """``step_ms(n, kv) = fixed + per_request * (n - 1) + per_1k_kv * kv / 1024``, fitted online.

    Ridge regression toward a prior ``theta0`` with per-parameter weights ``lam`` (in measured steps), data
    sums decayed by :data:`FORGET` per sample. Parameters are clamped at >= 0 (a step never gets cheaper with more
    requests or more KV)."""

    NAMES = ("fixed_ms", "per_request_ms", "per_1k_kv_tokens_ms")

    def __init__(self, prior: Optional[Sequence[float]] = None, prior_steps: float = 64.0):
        if prior is not None:
            self.theta0 = np.asarray(prior, dtype=np.float64)
            self.lam = np.full(3, float(prior_steps))
        else:  # intercept free, slopes weakly toward 0
            self.theta0 = np.zeros(3)
            self.lam = np.array([0.0, WEAK_PRIOR, WEAK_PRIOR])
        self.has_prior = prior is not None
        self.prior_weight = float(prior_steps) if prior is not None else 0.0
        self.xtx = np.zeros((3, 3))
        self.xty = np.zeros(3)
        self.samples = 0
        self._theta: Optional[np.ndarray] = None if prior is None else self.theta0.copy()

    @staticmethod
    def features(n: int, kv_tokens: float) -> np.ndarray:
        return np.array([1.0, max(n - 1, 0), kv_tokens / KV_UNIT])

    def observe(self, n: int, kv_tokens: float, step_ms: float) -> None:
        if n < 1 or not np.isfinite(step_ms) or step_ms <= 0:
            return
        x = self.features(n, kv_tokens)
        self.xtx = FORGET * self.xtx + np.outer(x, x)
        self.xty = FORGET * self.xty + x * step_ms
        self.samples += 1
        self._theta = None

    @property
    def ready(self) -> bool:
        return self.has_prior or self.samples > 0

    @property
    def theta(self) -> np.ndarray:
        if self._theta is None:
            a = self.xtx + np.diag(self.lam)
            b = self.xty + self.lam * self.theta0
            try:
                t = np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                t = np.linalg.lstsq(a, b, rcond=None)[0]
            self._theta = np.maximum(t, 0.0)
        return self._theta

    def step_ms(self, n: int, kv_tokens: float) -> float:
        return float(self.features(n, kv_tokens) @ self.theta)

    def as_dict(self) -> dict:
        out = {name: round(float(v), 6) for name, v in zip(self.NAMES, self.theta)} if self.ready else {}
        out["samples"] = self.samples
        out["prior"] = "costs file" if self.has_prior else "none"
        return out


def prior_from_costs(costs) -> tuple[float, float, float]:
    """The step model's prior from recorded costs (``router/placement.py::RecordedCosts``)."""
    return (costs.decode_step_fixed_ms, costs.decode_step_per_request_ms,
            costs.decode_step_per_context_token_ms * KV_UNIT)


@dataclass(frozen=True)
class Candidate:
    """A waiting request: its id, prompt tokens, the KV its decode reads per step at its budget, and that budget
    (None: not shrinkable: mux off, or ``mux_exact``)."""

    rid: str
    prompt_tokens: int
    kv_read: int
    budget: Optional[int]


@dataclass
class Plan:
    admit: int                                   # how many of the waiting queue's head may be admitted
    shrink: dict = field(default_factory=dict)   # rid -> new budget (policy shrink)
    predicted_ms: float = 0.0                    # predicted step with the admitted ones
    held: list = field(default_factory=list)     # rids held this step


def plan_admission(
    model: StepModel,
    slo_tpot_ms: float,
    policy: str,
    running_reads: Sequence[int],
    waiting: Sequence[Candidate],
    page_size: int = 16,
    level_offset_ms: float = 0.0,
) -> Plan:
    """Which of ``waiting`` (in queue order) may join a batch whose running requests read ``running_reads`` KV
    tokens per step (the module docstring). ``level_offset_ms`` is added to every prediction: how much the recently
    measured steps exceeded what the model predicts for them (the model's level may lag a change of the machine's
    speed; its differences between batches much less). Pure: no scheduler, no clock."""
    if policy not in POLICIES:
        raise ValueError(f"--mux-slo-policy: allowed: {', '.join(POLICIES)}; got {policy!r}")
    n, kv = len(running_reads), float(sum(running_reads))
    if policy == "off" or n == 0 or not model.ready:
        return Plan(admit=len(waiting), predicted_ms=model.step_ms(max(n, 1), kv) if model.ready else 0.0)
    offset = level_offset_ms

    def step(n_: int, kv_: float) -> float:
        return model.step_ms(n_, kv_) + offset

    plan = Plan(admit=0, predicted_ms=step(n, kv))
    for i, c in enumerate(waiting):
        pred = step(n + 1, kv + c.kv_read)
        if pred <= slo_tpot_ms:
            n, kv, plan.admit, plan.predicted_ms = n + 1, kv + c.kv_read, plan.admit + 1, pred
            continue
        if policy == "shrink" and c.budget is not None:
            per_token = model.theta[2] / KV_UNIT
            room = slo_tpot_ms - step(n + 1, kv)  # what the new request's KV reads may add
            floor = max(page_size, (c.budget // MIN_BUDGET_FRACTION) // page_size * page_size)
            if per_token > 0 and room > 0:
                fit = int(room / per_token) // page_size * page_size
                if floor <= fit < c.kv_read:
                    plan.shrink[c.rid] = fit
                    n, kv, plan.admit = n + 1, kv + fit, plan.admit + 1
                    plan.predicted_ms = step(n, kv)
                    continue
        plan.held = [w.rid for w in waiting[i:]]
        break
    return plan


# ------------------------------------------------------------------ the scheduler side
@dataclass
class Controller:
    """One per scheduler process: the config, the step model, the timing of the last decode result."""

    cfg: MuxConfig
    model: StepModel
    held_rids: set = field(default_factory=set)
    # moving average of (measured step - the model's prediction for it) over the last decode steps: the level offset
    level_offset_ms: float = 0.0
    last_result_t: Optional[float] = None


_CONTROLLER: list = []  # [Controller or None], made once per process


def controller() -> Optional[Controller]:
    if not _CONTROLLER:
        ctl = None
        try:
            cfg = MuxConfig.from_env()
            prior = None
            if cfg.placement_costs:
                from sglang_mux.router.placement_live import recorded_costs

                prior = prior_from_costs(recorded_costs(cfg.placement_costs))
            ctl = Controller(cfg, StepModel(prior, cfg.slo_prior_steps))
        except Exception:  # validated at launch; here a bad environment only means no admission control
            logger.exception("mux: setting up SLO admission failed; admitting as usual")
        _CONTROLLER.append(ctl)
    return _CONTROLLER[0]


def _budget_of(req, cfg: MuxConfig) -> Optional[int]:
    """The request's device-KV budget (None: reads its whole context: mux off or mux_exact)."""
    if cfg.disable:
        return None
    from sglang_mux.memory.requests import REGISTRY

    st = REGISTRY.peek(req.rid)
    opts = st.options if st is not None else None
    if opts is not None and opts.exact:
        return None
    return opts.budget if opts is not None and opts.budget is not None else cfg.budget


def kv_read(context: int, budget: Optional[int]) -> int:
    return context if budget is None else min(context, budget)


def _context(req) -> int:
    return len(getattr(req, "origin_input_ids", None) or ()) + len(getattr(req, "output_ids", None) or ())


def _shrink(req, budget: int) -> None:
    """Give ``req`` (not prefilled yet) the budget ``budget``: its mux state and its custom_params (a retracted
    request is readmitted from those)."""
    from sglang_mux.memory.requests import REGISTRY

    st = REGISTRY.get(req.rid)
    st.options = dataclasses.replace(st.options, budget=budget)
    sp = getattr(req, "sampling_params", None)
    if sp is not None:
        sp.custom_params = {**(getattr(sp, "custom_params", None) or {}), "mux_budget": budget}


def admit_by_slo(original, scheduler, running_batch, *args, **kwargs):
    """AROUND ``Scheduler.get_new_batch_prefill``: let SGLang see only the head of the waiting queue that the plan
    admits (shrinking budgets first); the held requests go back behind whatever it left, in their order."""
    ctl = controller()
    queue = getattr(scheduler, "waiting_queue", None)
    if ctl is None or ctl.cfg.slo_policy == "off" or not queue:
        return original(scheduler, running_batch, *args, **kwargs)
    try:
        cfg = ctl.cfg
        running = [r for r in (getattr(running_batch, "reqs", None) or ()) if not r.finished()]
        reads = [kv_read(_context(r), _budget_of(r, cfg)) for r in running]
        waiting = []
        for r in queue:
            b = _budget_of(r, cfg)
            n = len(getattr(r, "origin_input_ids", None) or ())
            waiting.append(Candidate(r.rid, n, kv_read(n, b), b))
        # measured steps correct the model's level once they outweigh the prior
        offset = ctl.level_offset_ms if ctl.model.samples >= ctl.model.prior_weight else 0.0
        plan = plan_admission(ctl.model, cfg.slo_tpot, cfg.slo_policy, reads, waiting, cfg.page_size, offset)
    except Exception:  # admission control must never take the scheduler down
        logger.exception("mux: SLO admission failed; admitting as usual")
        return original(scheduler, running_batch, *args, **kwargs)
    for r in queue[: plan.admit]:
        if r.rid in plan.shrink:
            _shrink(r, plan.shrink[r.rid])
            STATS.slo_shrunk_requests += 1
        ctl.held_rids.discard(r.rid)
    STATS.slo_last_predicted_tpot_ms = round(plan.predicted_ms, 3)
    held = list(queue[plan.admit:]) if plan.held else []
    STATS.slo_waiting_held = len(held)
    if not held:
        return original(scheduler, running_batch, *args, **kwargs)
    STATS.slo_deferred_steps += 1
    for r in held:
        if r.rid not in ctl.held_rids:
            ctl.held_rids.add(r.rid)
            STATS.slo_deferred_requests += 1
    scheduler.waiting_queue = list(queue[: plan.admit])
    try:
        return original(scheduler, running_batch, *args, **kwargs)
    finally:
        scheduler.waiting_queue = list(scheduler.waiting_queue) + held


def observe_step(scheduler, batch, *args, **kwargs):
    """BEFORE ``Scheduler.process_batch_result`` (so the stats it writes are exported after this very batch): time
    decode steps for the step model, with the batch's size and the KV its requests read. A decode step is the
    interval since the previous batch's result, whatever that batch was (a prefill's own time ended at its result; a
    decode batch follows a result without idling, since something was running): during a burst of arrivals most
    decode steps follow a prefill, and they are the ones to measure."""
    ctl = controller()
    if ctl is None:
        return None
    try:
        now = time.perf_counter()
        mode = getattr(batch, "forward_mode", None)
        if mode is not None and mode.is_decode() and ctl.last_result_t is not None:
            reqs = getattr(batch, "reqs", None) or ()
            kv = sum(kv_read(_context(r), _budget_of(r, ctl.cfg)) for r in reqs)
            ms = (now - ctl.last_result_t) * 1000.0
            if ctl.model.ready:  # how far the model (before this sample) was from the measurement
                miss = ms - ctl.model.step_ms(len(reqs), kv)
                ctl.level_offset_ms = ANCHOR_EMA * miss + (1 - ANCHOR_EMA) * ctl.level_offset_ms
            ctl.model.observe(len(reqs), kv, ms)
            STATS.slo_step_samples = ctl.model.samples
            STATS.slo_tpot_model = {**ctl.model.as_dict(), "level_offset_ms": round(ctl.level_offset_ms, 3)}
        ctl.last_result_t = now
        # held requests that left the queue another way (aborted) are forgotten
        if ctl.held_rids:
            waiting = {r.rid for r in getattr(scheduler, "waiting_queue", None) or ()}
            ctl.held_rids &= waiting
    except Exception:
        logger.exception("mux: timing the decode step failed")
    return None  # arguments unchanged
