"""Cold-page policies (memory/cold_policies.py): which one a request gets, what each tells the planner, and that a
new policy is one class plus one entry (run through a planned decode step)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from test_leaf_matrix import MODES
from test_routed_decode import make_backend

from sglang_mux.config import MuxConfig
from sglang_mux.memory import cold_policies
from sglang_mux.memory.cold_policies import COLD_POLICIES, ColdPagePolicy, cold_policy_for
from sglang_mux.memory.requests import RequestRegistry

TIERS = SimpleNamespace(takes_running_pages=True)
PREFIX_ONLY = SimpleNamespace(takes_running_pages=False)  # e.g. only a remote store: prefix copies, no running pages


def test_choice_and_facts():
    keep, drop = MuxConfig(), MuxConfig(drop_cold=True)
    assert cold_policy_for(keep, None).name == "keep" and cold_policy_for(keep, PREFIX_ONLY).name == "keep"
    assert cold_policy_for(keep, TIERS).name == "tier"
    assert cold_policy_for(drop, None).name == "drop" and cold_policy_for(drop, TIERS).name == "drop"  # drop wins
    facts = {p.name: (p.scores_every_page, p.caches_summaries) for p in COLD_POLICIES}
    assert facts == {"drop": (True, False), "tier": (False, False), "keep": (False, True)}
    assert set(MODES) == set(facts)  # the leaf matrix covers every policy


def test_a_new_policy_is_one_class_and_one_entry(monkeypatch):
    moved = []

    class Halve(ColdPagePolicy):  # a throwaway policy: records what it was asked to move
        name = "halve"

        @staticmethod
        def applies(cfg, tiers):
            return cfg.budget == 64

        def move(self, mover, plan, cfg):
            moved.append((plan.rid, plan.seq_len, plan.grant.exact))

    monkeypatch.setattr(cold_policies, "COLD_POLICIES", (Halve(), *COLD_POLICIES))
    cfg = MuxConfig(budget=64, page_size=8)
    be, layer, kv, r2t, slots = make_backend(cfg, 300)
    be.registry = RequestRegistry()
    st = be.registry.get("r")
    st.protected_len, st.summarized = 0, True
    fb = SimpleNamespace(rids=["r"], forward_mode=ForwardMode.DECODE, seq_lens_cpu=torch.tensor([300]),
                         seq_lens=torch.tensor([300]), req_pool_indices=torch.tensor([1]))
    be._plan_step(fb)
    assert moved == [("r", 300, False)] and not st.off_device_pages()
    assert cold_policy_for(MuxConfig(budget=128), None).name == "keep"
