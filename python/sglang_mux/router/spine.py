"""The spine router: per request and decode step, a :class:`RouteDecision` (the grant, whether the query-aware leaves
run, per-layer spread) from a router policy picked by name (``--mux-router``, per request ``mux_router``).

The router sees sizes, options and measured signals, never tree nodes or KV tensors. Policies live in a registry
like the leaves: a policy is one class with ``decide`` (and ``observe`` if it learns from the step's attention) and
one ``register_router_policy`` line.

    static    a fixed split (``--mux-leaves``) of the request's budget; requests that fit get exact attention.
              Every step runs every leaf. The reference: what the other policies must beat.
    adaptive  ``router/adaptive.py``: the split and the layer spread follow the attention each leaf's pages
              got, with hysteresis; the query-aware leaves run only when a trigger fires.
    learned   ``router/learned.py``: adaptive, with the split chosen by a small gate trained offline.

:class:`MuxRouter` is what the step planner holds: it answers for every request with the policy the request asked
for (or the server's), so requests of one batch may use different policies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence

from sglang_mux.config import MuxConfig
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.router.grant import EXACT, Grant, grant_for


@dataclass(frozen=True)
class RouteDecision:
    """One request's route for one decode step.

    ``refresh``: the query-aware leaves (``Leaf.query_aware``: retrieval, chunk) score this step's query; False
    reuses the pages they chose last (``StepPlanner.select``), so the step costs what a sink+window step costs.
    ``layer_factors``: how the ranked shares spread over the layers (``router/layer_budget.py``); None leaves it
    to ``--mux-layer-budget``.
    """

    grant: Grant
    refresh: bool = True
    layer_factors: Optional[tuple[float, ...]] = None


EXACT_DECISION = RouteDecision(EXACT)


class RouterPolicy:
    """One routing policy. Subclasses set ``name`` and override ``decide`` (and ``observe`` when they learn)."""

    name: ClassVar[str] = ""
    # True when the policy reads the attention mass per page bucket after each step (``observe``); the planner
    # measures it only then, so a policy that does not learn pays nothing
    wants_signals: ClassVar[bool] = False

    def __init__(self, config: MuxConfig):
        self.config = config

    @functools.lru_cache(maxsize=256)
    def split(self, cfg: MuxConfig) -> dict[str, int]:
        return cfg.leaf_split(cfg.budget)

    @functools.lru_cache(maxsize=1024)
    def effective_config(self, options: MuxRequestOptions) -> MuxConfig:
        # Called per request per decode step; building (and validating) a MuxConfig each time is wasted work.
        return options.effective_config(self.config)

    def grant(self, seq_len: int, options: MuxRequestOptions) -> Grant:
        """The static grant: the fixed split of the request's budget (what the cold-page policies keep)."""
        cfg = self.effective_config(options)
        return grant_for(seq_len, cfg.budget, cfg.page_size, self.split(cfg), force_exact=options.exact)

    def decide(self, state, seq_len: int, device_room: bool,
               prefill_signal: Callable[[], Optional[Sequence[float]]]) -> RouteDecision:
        """This step's route for one request. ``state``: its ``RequestMemory`` (the policy reads ``options`` and keeps
        its own per-request state in ``router_state``); ``device_room``: the KV pool has room to grant more;
        ``prefill_signal()``: per layer, the share of the prefill's observation-window attention outside the
        request's hot pages (None when not measured)."""
        raise NotImplementedError

    def observe(self, state, bucket_mass: Sequence[Sequence[float]], grant: Grant) -> None:
        """After a routed step: per layer, the attention mass on the pages of each bucket (``BUCKETS`` of
        ``router/adaptive.py``), averaged over heads; ``grant``: the grant the step read under."""


class StaticSpineRouter(RouterPolicy):
    name = "static"

    def decide(self, state, seq_len, device_room, prefill_signal) -> RouteDecision:
        g = self.grant(seq_len, state.options)
        return EXACT_DECISION if g.exact else RouteDecision(g)


ROUTER_POLICIES: dict[str, type[RouterPolicy]] = {}


class RouterPolicyError(ValueError):
    pass


def register_router_policy(cls: type[RouterPolicy]) -> type[RouterPolicy]:
    if not (isinstance(cls, type) and issubclass(cls, RouterPolicy)) or not cls.name:
        raise RouterPolicyError(f"register_router_policy: expected a RouterPolicy subclass with a name, got {cls!r}")
    if cls.name in ROUTER_POLICIES:
        raise RouterPolicyError(f"register_router_policy: policy {cls.name!r} is already registered")
    ROUTER_POLICIES[cls.name] = cls
    return cls


register_router_policy(StaticSpineRouter)


def router_policies() -> dict[str, type[RouterPolicy]]:
    """Every registered policy, the built-in ones included (they register themselves when imported: they
    subclass what is defined here, so they are imported on first use, not at the top)."""
    from sglang_mux.router import adaptive, learned  # noqa: F401

    return ROUTER_POLICIES


class MuxRouter:
    """The planner's router: one instance of each registered policy for this server, the request's own policy
    (``mux_router``, else ``--mux-router``) answering for it."""

    def __init__(self, config: MuxConfig):
        self.config = config
        self.policies = {name: cls(config) for name, cls in router_policies().items()}
        self.default = self.policies[config.router]
        self.static = self.policies["static"]

    def policy(self, options: MuxRequestOptions) -> RouterPolicy:
        return self.policies[options.router] if options.router is not None else self.default

    def effective_config(self, options: MuxRequestOptions) -> MuxConfig:
        return self.static.effective_config(options)

    def grant(self, seq_len: int, options: MuxRequestOptions) -> Grant:
        return self.static.grant(seq_len, options)

    @property
    def wants_signals(self) -> bool:
        return any(p.wants_signals for p in self.policies.values())
