"""Cold-page policies: what happens, each decode step, to a routed request's pages outside its hot leaves.

One small interface instead of branches in the planner. The step planner asks :func:`cold_policy_for` once per
request and step (the request's effective config and this worker's tiers decide), then calls ``move`` and reads
two facts about the policy:

    policy  when                                   move (ColdPageMover)            scores every page  summary cache
    keep    default                                nothing: every exact page stays  no (two-level)     yes
    drop    --mux-drop-cold                        drop (or quantize, cold bits)    yes                no
    tier    a host/disk tier that takes running    demote (+ quantized device       no (two-level)     no
            requests' pages                        copies with cold bits < 16)

``scores_every_page``: retrieval scores every page instead of the best groups first; drop mode needs it because
its dropped pages' summaries are stale (their slots are reused), so a group bound over them would point at nothing.
``caches_summaries``: the request's exact KV stays on the device, so a contiguous copy of its page summaries (1/P
of its keys) is proportionate; the other policies keep device memory bounded and gather instead.

Adding a policy is one class and one entry in ``COLD_POLICIES`` (checked in order; the first that applies wins).
"""

from __future__ import annotations

from typing import ClassVar


class ColdPagePolicy:
    name: ClassVar[str] = ""
    scores_every_page: ClassVar[bool] = False
    caches_summaries: ClassVar[bool] = False

    @staticmethod
    def applies(cfg, tiers) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def move(self, mover, plan, cfg) -> None:
        """Act on the request's cold pages this step (``plan``: its ``RequestPlan`` under the static grant)."""


class KeepPolicy(ColdPagePolicy):
    name = "keep"
    caches_summaries = True

    @staticmethod
    def applies(cfg, tiers) -> bool:
        return True


class DropPolicy(ColdPagePolicy):
    name = "drop"
    scores_every_page = True

    @staticmethod
    def applies(cfg, tiers) -> bool:
        return cfg.drop_cold

    def move(self, mover, plan, cfg) -> None:
        mover.drop(plan, cfg)


class TierPolicy(ColdPagePolicy):
    name = "tier"

    @staticmethod
    def applies(cfg, tiers) -> bool:
        return tiers is not None and tiers.takes_running_pages

    def move(self, mover, plan, cfg) -> None:
        mover.demote(plan, cfg)


# Checked in order: drop wins over a tier, keep is the fallback.
COLD_POLICIES: tuple[ColdPagePolicy, ...] = (DropPolicy(), TierPolicy(), KeepPolicy())


def cold_policy_for(cfg, tiers) -> ColdPagePolicy:
    """The policy for a request with effective config ``cfg`` on a worker with ``tiers`` (None: no tier)."""
    for policy in COLD_POLICIES:
        if policy.applies(cfg, tiers):
            return policy
    raise AssertionError("KeepPolicy always applies")  # pragma: no cover
