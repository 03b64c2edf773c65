"""The control plane without a server: per-request mux fields carried in ``custom_labels`` (the field sglang-router
forwards), the online TPOT model and the SLO admission plan (serving/admission.py), their flags."""

from __future__ import annotations

import types

import numpy as np
import pytest

from sglang_mux.config import MuxConfig, MuxConfigError, split_mux_args
from sglang_mux.serving.admission import Candidate, StepModel, plan_admission
from sglang_mux.serving.label_options import carry_label_options, mux_fields_in_labels
from sglang_mux.serving.validation import RequestValidationError


def req(**kw):
    base = dict(custom_labels=None, sampling_params=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


# ------------------------------------------------------------------ custom_labels -> custom_params


def test_labels_move_into_custom_params_typed_and_leave_the_labels():
    r = req(custom_labels={"mux_budget": "128", "mux_exact": "false", "mux_leaves": "sink=16,recent=64,retrieval=rest",
                           "team": "a"},
            sampling_params={"max_new_tokens": 4})
    assert carry_label_options(r) == 3
    assert r.sampling_params == {"max_new_tokens": 4, "custom_params": {
        "mux_budget": 128, "mux_exact": False, "mux_leaves": "sink=16,recent=64,retrieval=rest"}}
    assert r.custom_labels == {"team": "a"}  # other labels stay for SGLang's metrics


def test_labels_only_mux_become_none_and_no_sampling_params_is_made():
    r = req(custom_labels={"mux_budget": "64"})
    carry_label_options(r)
    assert r.custom_labels is None and r.sampling_params == {"custom_params": {"mux_budget": 64}}


def test_labels_apply_to_every_item_of_a_batch_and_keep_existing_custom_params():
    r = req(custom_labels={"mux_budget": "64"},
            sampling_params=[{"max_new_tokens": 1, "custom_params": {"x": 1}}, None])
    carry_label_options(r)
    assert r.sampling_params == [{"max_new_tokens": 1, "custom_params": {"x": 1, "mux_budget": 64}},
                                 {"custom_params": {"mux_budget": 64}}]


def test_nothing_happens_without_mux_labels():
    r = req(custom_labels={"team": "a"}, sampling_params={"max_new_tokens": 1})
    assert carry_label_options(r) == 0
    assert r.custom_labels == {"team": "a"} and r.sampling_params == {"max_new_tokens": 1}


def test_unknown_and_conflicting_label_fields_name_the_field():
    with pytest.raises(RequestValidationError, match=r"^custom_labels\.mux_bugdet: unknown mux field; allowed: mux_budget"):
        mux_fields_in_labels({"mux_bugdet": "1"})
    r = req(custom_labels={"mux_budget": "64"}, sampling_params={"custom_params": {"mux_budget": 128}})
    with pytest.raises(RequestValidationError, match=r"^custom_labels\.mux_budget: 64 conflicts with "
                                                     r"sampling_params\.custom_params\.mux_budget = 128"):
        carry_label_options(r)
    same = req(custom_labels={"mux_budget": "128"}, sampling_params={"custom_params": {"mux_budget": 128}})
    assert carry_label_options(same) == 1 and same.sampling_params["custom_params"] == {"mux_budget": 128}


def test_a_bad_value_is_named_by_the_validator_as_a_custom_params_field():
    from sglang_mux.serving.validation import RequestLimits, validate_generate_request

    r = req(custom_labels={"mux_budget": "lots"}, sampling_params={"max_new_tokens": 1})
    carry_label_options(r)
    with pytest.raises(RequestValidationError, match=r"custom_params\.mux_budget: must be an integer"):
        validate_generate_request({"text": "hi", "sampling_params": r.sampling_params}, RequestLimits(vocab_size=100))


# ------------------------------------------------------------------ the step model


def test_step_model_recovers_a_linear_step_time():
    true = (5.0, 2.0, 3.0)  # fixed, per extra request, per 1K KV tokens
    m = StepModel()
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, kv = int(rng.integers(1, 9)), float(rng.integers(100, 8000))
        m.observe(n, kv, true[0] + true[1] * (n - 1) + true[2] * kv / 1024)
    assert np.allclose(m.theta, true, rtol=0.05, atol=0.05)
    assert m.step_ms(4, 2048) == pytest.approx(5 + 6 + 6, rel=0.02)


def test_step_model_prior_weight():
    prior = (10.0, 1.0, 0.0)
    strong, weak = StepModel(prior, prior_steps=1e9), StepModel(prior, prior_steps=0)
    assert strong.ready and strong.step_ms(1, 0) == pytest.approx(10.0)  # the file alone predicts
    for m in (strong, weak):
        for _ in range(50):
            m.observe(1, 1024, 4.0)
            m.observe(3, 1024, 6.0)
    assert strong.theta[0] == pytest.approx(10.0, rel=1e-3)   # recorded costs dominate
    assert weak.step_ms(1, 1024) == pytest.approx(4.0, rel=0.05) and weak.step_ms(3, 1024) == pytest.approx(6.0, rel=0.05)
    assert not StepModel().ready  # no file, nothing measured: no prediction


# ------------------------------------------------------------------ the admission plan (hand-computed)


def fixed_model(fixed, per_req, per_1k):
    return StepModel((fixed, per_req, per_1k), prior_steps=1e12)


def cands(*kv, budget=None, prompt=None):
    return [Candidate(f"r{i}", prompt or k, k, budget) for i, k in enumerate(kv)]


def test_queue_admits_the_head_that_fits_and_holds_the_rest_in_order():
    m = fixed_model(10, 5, 1)  # step = 10 + 5 (n-1) + kv/1024
    # running: 2 requests reading 1024 each -> 10 + 5 + 2 = 17 ms; +1 request of 1024 -> 23; +1 more -> 29
    p = plan_admission(m, 25.0, "queue", [1024, 1024], cands(1024, 1024, 10))
    assert p.admit == 1 and p.held == ["r1", "r2"] and p.predicted_ms == pytest.approx(23.0)
    # the third (small) one would fit, but is not let past the second (first come, first served)
    assert plan_admission(m, 30.0, "queue", [1024, 1024], cands(1024, 1024)).admit == 2


def test_nothing_running_or_policy_off_admits_everyone():
    m = fixed_model(100, 0, 0)
    assert plan_admission(m, 1.0, "queue", [], cands(1, 2)).admit == 2
    assert plan_admission(m, 1.0, "off", [10], cands(1, 2)).admit == 2
    assert plan_admission(StepModel(), 1.0, "queue", [10], cands(1, 2)).admit == 2  # nothing predicted yet


def test_shrink_gives_the_largest_page_multiple_budget_that_fits():
    m = fixed_model(10, 0, 4)  # per KV token: 4/1024 ms
    # running one request reading 1024: step(2, 1024 + b) = 10 + 4 (1024 + b) / 1024 <= 20  ->  b <= 1536
    p = plan_admission(m, 20.0, "shrink", [1024], cands(4096, budget=4096), page_size=16)
    assert p.admit == 1 and p.shrink == {"r0": 1536} and p.predicted_ms == pytest.approx(20.0)
    # room 1530 tokens -> 1520 (a multiple of 16)
    p = plan_admission(m, 20.0 - 6 * 4 / 1024, "shrink", [1024], cands(4096, budget=4096), page_size=16)
    assert p.shrink == {"r0": 1520}
    # the floor is 1/8 of its budget (512): room for 256 only -> held instead
    p = plan_admission(m, 10 + 4 * 1280 / 1024, "shrink", [1024], cands(4096, budget=4096), page_size=16)
    assert p.admit == 0 and p.held == ["r0"] and not p.shrink
    # not shrinkable (mux off / mux_exact): held
    assert plan_admission(m, 20.0, "shrink", [1024], cands(4096, budget=None)).held == ["r0"]


def test_bad_policy_is_named():
    with pytest.raises(ValueError, match=r"^--mux-slo-policy: allowed: off, queue, shrink; got 'later'"):
        plan_admission(StepModel(), 1.0, "later", [], [])


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize("argv, message", [
    (["--mux-slo-policy", "later"], "--mux-slo-policy: allowed: off, queue, shrink; got 'later'"),
    (["--mux-slo-policy", "shrink", "--mux-disable"], "--mux-slo-policy: 'shrink' needs mux on"),
    (["--mux-slo-prior-steps", "-1"], "--mux-slo-prior-steps: must be >= 0, got -1"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, message):
    with pytest.raises(MuxConfigError) as e:
        split_mux_args(argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_flags_parse():
    cfg, rest = split_mux_args(["--mux-slo-policy", "shrink", "--mux-slo-prior-steps", "8", "--port", "1"])
    assert (cfg.slo_policy, cfg.slo_prior_steps, rest) == ("shrink", 8, ["--port", "1"])
    assert MuxConfig().slo_policy == "off"


def test_the_level_offset_shifts_every_prediction():
    m = fixed_model(10, 5, 0)  # says a batch of 2 steps in 15 ms, 3 in 20 ms
    # alone, the model admits (20 <= 25); the last steps were measured 85 ms above it: 20 + 85 = 105 > 25
    assert plan_admission(m, 25.0, "queue", [10, 10], cands(10)).admit == 1
    p = plan_admission(m, 25.0, "queue", [10, 10], cands(10), level_offset_ms=85.0)
    assert p.admit == 0 and p.held == ["r0"] and p.predicted_ms == pytest.approx(100.0)
    p = plan_admission(m, 106.0, "queue", [10, 10], cands(10, 10), level_offset_ms=85.0)
    assert p.admit == 1 and p.predicted_ms == pytest.approx(105.0)
