"""The learned router's gate (router/gate.py, router/learned.py) and its trainer (scripts/train_router_gate.py).

Fast, no server: the shipped gate loads and splits; a corrupt gate file is a one-line error (GateError, the
config, the launcher); the learned policy keeps the page total and its bounds; a hand-made gate moves pages
through the hysteresis; the trainer's captured-mass simulation on a hand-made one-layer trace.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from sglang_mux.config import MuxConfig, MuxConfigError, split_mux_args
from sglang_mux.memory.requests import RequestMemory
from sglang_mux.router.adaptive import AdaptiveState, buckets
from sglang_mux.router.gate import DEFAULT_GATE, FEATURES, FORMAT, SHARES, VERSION, GateError, load_gate
from sglang_mux.router.learned import LearnedRouter, share_bounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import train_router_gate as trainer  # noqa: E402

BUCKETS = buckets()


def gate_dict(layers=None, **over) -> dict:
    """A valid one-layer gate (zero weights) with the given overrides."""
    if layers is None:
        layers = [{"w": [[0.0] * len(FEATURES) for _ in SHARES], "b": [0.0] * len(SHARES)}]
    d = {"format": FORMAT, "version": VERSION, "features": list(FEATURES), "shares": list(SHARES), "layers": layers,
         "trained_on": {"test": True}}
    d.update(over)
    return d


def write(tmp_path, name: str, obj) -> str:
    path = str(tmp_path / name)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# ------------------------------------------------------------------ the shipped gate
def test_shipped_gate_loads_and_its_fractions_sum_to_one():
    gate = load_gate(None)
    assert gate.path == DEFAULT_GATE and os.path.exists(DEFAULT_GATE)
    with open(DEFAULT_GATE) as f:
        meta = json.load(f)["trained_on"]
    assert {"tasks", "lengths", "samples", "objective", "held_out_captured_mass"} <= set(meta)
    rng = random.Random(0)
    for _ in range(200):
        feats = [rng.random() for _ in FEATURES[:-1]] + [rng.uniform(0, 6)]
        allowed = [s for s in SHARES if rng.random() < 0.7] or ["retrieval"]
        split = gate.split(feats, allowed)
        assert list(split) == allowed
        assert abs(sum(split.values()) - 1.0) < 1e-9 and all(v >= 0 for v in split.values())


def test_the_shipped_gate_is_package_data():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert "router/gates/*.json" in f.read()


# ------------------------------------------------------------------ corrupt gate files
def _corrupt_files(tmp_path) -> dict:
    good = json.dumps(gate_dict())
    nan_layers = [{"w": [[0.0] * len(FEATURES) for _ in SHARES], "b": [0.0] * len(SHARES)}]
    nan_layers[0]["w"][1][3] = float("nan")
    return {
        "truncated": write(tmp_path, "truncated.json", good[: len(good) // 2]),
        "format tag": write(tmp_path, "format.json", gate_dict(format="something-else")),
        "feature list": write(tmp_path, "features.json", gate_dict(features=list(FEATURES[:-1]))),
        "NaN weight": write(tmp_path, "nan.json", json.dumps(gate_dict(layers=nan_layers))),  # json writes NaN
        "output width": write(tmp_path, "width.json", gate_dict(
            layers=[{"w": [[0.0] * len(FEATURES)] * 3, "b": [0.0] * 3}])),
        "missing": str(tmp_path / "absent.json"),
    }


@pytest.mark.parametrize("what", ["truncated", "format tag", "feature list", "NaN weight", "output width", "missing"])
def test_corrupt_gate_is_a_one_line_error_naming_the_file(tmp_path, what):
    path = _corrupt_files(tmp_path)[what]
    with pytest.raises(GateError) as e:
        load_gate(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path + ":"), msg
    with pytest.raises(MuxConfigError) as e:
        MuxConfig(router="learned", router_gate=path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--mux-router-gate:") and path in msg, msg


def test_the_flags_refuse_a_corrupt_gate(tmp_path):
    path = _corrupt_files(tmp_path)["format tag"]
    with pytest.raises(MuxConfigError, match=r"^--mux-router-gate: ") as e:
        split_mux_args(["--mux-router", "learned", "--mux-router-gate", path])
    assert "\n" not in str(e.value)
    cfg, _ = split_mux_args(["--mux-router", "learned"])  # the shipped gate
    assert cfg.router == "learned"


def test_the_launcher_refuses_a_corrupt_gate_with_one_line(tmp_path):
    path = _corrupt_files(tmp_path)["truncated"]
    p = subprocess.run([sys.executable, "-m", "sglang_mux.launch_server", "--mux-router", "learned",
                        "--mux-router-gate", path], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("sglang-mux: error: --mux-router-gate:") and path in lines[0]


# ------------------------------------------------------------------ the learned policy
@pytest.mark.parametrize("seed", range(4))
def test_propose_keeps_the_total_and_the_bounds(seed):
    """Random signals and splits in force: the shipped gate's proposal keeps the page total and every bound."""
    rng = random.Random(seed)
    gate = load_gate(None)
    for _ in range(50):
        budget = rng.choice([160, 256, 512, 1024, 4096])
        spec = rng.choice(["", "sink=16,recent=64,heavy=32,retrieval=rest", "sink=16,recent=32,chunk=64,retrieval=rest",
                           "sink=0,recent=16,heavy=rest", "sink=16,recent=48,heavy=32,chunk=32,retrieval=rest"])
        cfg = MuxConfig(budget=budget, page_size=16, leaves=spec, router="learned")
        router = LearnedRouter(cfg)
        static = router.grant(4 * budget, RequestMemory().options).pages
        movable, lo, hi = share_bounds(static)
        rs = AdaptiveState()
        raw = [rng.random() ** 3 for _ in BUCKETS]
        rs.mass = {b: x / sum(raw) for b, x in zip(BUCKETS, raw)}
        rs.seq_len = rng.randint(budget + 1, 16 * budget)
        if rng.random() < 0.5 and len(movable) > 1:  # a split in force that is not the static one
            rs.pages = trainer.candidate_splits(static, 4)[-1]
        prop = router.propose(rs, static, cfg)
        if len(movable) < 2:
            assert prop is None
            continue
        cur = {s: (rs.pages or static)[s] for s in movable}
        assert set(prop) == set(movable) and sum(prop.values()) == sum(cur.values())
        cap = max(static[s] for s in SHARES if s != "recent")
        for s, v in prop.items():
            if static[s] > 0:  # within [1/4, 3] x its static pages
                assert math.floor(static[s] * 0.25) <= v <= static[s] * 3, (s, v, static)
            else:  # a ranked share with no static pages grows from 0 up to the largest ranked share's
                assert s != "recent" and 0 <= v <= cap, (s, v, static)
        assert prop.get("recent", 1) >= 1
        fr = gate.split(trainer.gate_features(rs, cur, rs.seq_len, budget), movable)
        assert abs(sum(fr.values()) - 1) < 1e-9


def test_a_gate_that_favours_retrieval_moves_pages_after_two_agreeing_decisions(tmp_path):
    layers = [{"w": [[0.0] * len(FEATURES) for _ in SHARES], "b": [0.0, 0.0, 12.0, 0.0]}]
    path = write(tmp_path, "retrieval.json", gate_dict(layers=layers))
    cfg = MuxConfig(budget=256, page_size=16, leaves="sink=16,recent=64,heavy=32,retrieval=rest", router="learned",
                    router_gate=path, router_interval=1, router_ema=1.0)
    router, st = LearnedRouter(cfg), RequestMemory()
    obs = [[0.05, 0.5, 0.2, 0.2, 0.0, 0.05]] * 2

    def step():
        d = router.decide(st, 4096, False, lambda: None)
        router.observe(st, obs, d.grant)
        return d.grant

    static = step()  # first decision: pending
    assert st.router_state.pages is None
    assert step() == static  # the second agrees: applied from the next step
    g = step()
    assert g["retrieval"] > static["retrieval"] and g["recent"] == 1 and g["heavy"] <= 1
    assert g["sink"] == static["sink"] and sum(g.pages.values()) == sum(static.pages.values())
    assert g["retrieval"] <= 3 * static["retrieval"]


# ------------------------------------------------------------------ the trainer's simulation
def hand_trace() -> dict:
    """One layer, one head, 16-token pages. Prompt 144 tokens (9 pages); step 0 at 160 tokens (10 pages), step 1
    at 161 (11 pages). True mass at step 0: page 0 0.1, page 3 0.3, page 6 0.4, tail page 9 0.2. Heavy scores
    (observation window) favour page 3; the retrieval bounds favour page 6."""
    snap = torch.full((1, 9), 0.5)
    snap[0, 3], snap[0, 6] = 5.0, 1.0

    def step(seq_len, mass_pages):
        n = math.ceil(seq_len / 16)
        mass = torch.zeros(1, 1, n)
        for p, m in mass_pages.items():
            mass[0, 0, p] = m
        bounds = torch.full((1, 1, n), -5.0)
        bounds[0, 0, 6], bounds[0, 0, 3] = 10.0, 0.0
        m_groups = ((seq_len - 1) // 16) // 8
        return {"seq_len": seq_len, "token": 0, "mass": mass.half(), "page_bounds": bounds,
                "group_bounds": torch.full((1, 1, m_groups), 10.0)}

    meta = {"version": 1, "task": "hand", "length": 160, "seed": 0, "index": 0, "prompt_tokens": 144, "layers": 1,
            "q_heads": 1, "kv_heads": 1, "head_dim": 4, "page_size": 16, "scale": 1.0, "group_pages": 8,
            "observation_window": 32}
    return {"meta": meta, "delims": torch.zeros(144, dtype=torch.bool), "snapkv": snap,
            "steps": [step(160, {0: 0.1, 3: 0.3, 6: 0.4, 9: 0.2}), step(161, {1: 0.5, 10: 0.5})]}


def test_captured_mass_of_a_hand_made_trace():
    sim = trainer.TraceSim(hand_trace())
    base = {"sink": 1, "recent": 1, "heavy": 1, "retrieval": 1, "chunk": 0}
    cap, rows = sim.step(0, base)  # pages 0 (sink), 9 (window), 3 (heavy), 6 (retrieval)
    assert cap == pytest.approx(1.0, abs=1e-3)
    assert rows[0] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.0, 0.0], abs=1e-3)
    assert sim.step(0, {**base, "retrieval": 0})[0] == pytest.approx(0.6, abs=1e-3)
    # the window takes 8 and 9, retrieval its best page 6: 0.2 + 0.4; bucket masses renormalized over the read pages
    cap, rows = sim.step(0, {"sink": 0, "recent": 2, "heavy": 0, "retrieval": 1, "chunk": 0})
    assert cap == pytest.approx(0.6, abs=1e-3) and rows[0] == pytest.approx([0, 1 / 3, 0, 2 / 3, 0, 0], abs=1e-3)
    # whole chunks (64 tokens: pages 0-3, 4-7, 8-9) ranked by their best heavy page: pages 0-3, then the tail
    cap, rows = sim.step(0, {"sink": 0, "recent": 1, "heavy": 0, "retrieval": 0, "chunk": 4})
    assert cap == pytest.approx(0.6, abs=1e-3) and rows[0][BUCKETS.index("chunk")] == pytest.approx(4 / 6, abs=1e-3)
    # step 1: the heavy scores now include step 0's mass (page 6: 1.0 + 0.4 > every 0.5 page but page 3)
    assert sim.heavy[1][0, 6] == pytest.approx(1.4, abs=1e-3) and sim.heavy[1][0, 3] == pytest.approx(5.3, abs=1e-3)
    cap, _ = sim.step(1, {"sink": 0, "recent": 1, "heavy": 0, "retrieval": 0, "chunk": 0})
    assert cap == pytest.approx(0.5, abs=1e-3)  # only the tail page 10
    # the prefill signal: heavy mass outside sink page 0 and window page 9
    sig = sim.prefill_signal(base)
    total = 0.5 * 7 + 5.0 + 1.0
    assert sig == pytest.approx([(total - 0.5) / total])


def test_share_bounds_let_ranked_shares_grow_from_zero():
    static = {"sink": 0, "recent": 1, "heavy": 0, "retrieval": 6, "chunk": 0}  # the docstring's example
    movable, lo, hi = share_bounds(static)
    assert movable == ["recent", "heavy", "retrieval", "chunk"]
    assert (lo, hi) == ({"recent": 1, "heavy": 0, "retrieval": 1.5, "chunk": 0},
                        {"recent": 3, "heavy": 6, "retrieval": 18, "chunk": 6})
    assert share_bounds({"sink": 1, "recent": 4, "heavy": 0, "retrieval": 0, "chunk": 0})[0] == ["recent"]


def test_candidate_splits_keep_the_total_and_start_with_the_static_split():
    static = trainer.static_pages(256)
    cands = trainer.candidate_splits(static, 6)
    assert cands[0] == static and len(cands) > 3
    movable, lo, hi = share_bounds(static)
    for c in cands:
        assert sum(c.values()) == sum(static.values()) and c["sink"] == static["sink"]
        assert all(math.floor(lo[s]) <= c[s] <= hi[s] for s in movable)
