"""``--mux-chunk-layers shared``: the chunk leaf chooses once per decode step for every layer (ChunkKV-style),
ranked by the heavy-hitter scores summed over the layers; ``per-layer`` (the default) chooses at every layer.

Oracles: the shared choice equals the per-layer choice computed on the summed scores; every layer reads the same
chunk pages (minus those an earlier leaf took); the chunk pass runs once per step (counted by patching it)."""

from __future__ import annotations

import pytest
import torch

from sglang_mux.attention.step_planner import RequestPlan
from sglang_mux.config import MuxConfig, MuxConfigError
from sglang_mux.leaves import chunk as chunk_module
from sglang_mux.memory.requests import RequestMemory
from sglang_mux.request_options import MuxRequestError, MuxRequestOptions, parse_request_options
from sglang_mux.router.spine import StaticSpineRouter


def make(layers: int, shared: bool, seed: int = 0):
    from types import SimpleNamespace

    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang_mux.attention.backend import MuxAttentionBackend

    P, L, hkv, d = 8, 400, 2, 16
    cfg = MuxConfig(budget=96, page_size=P, leaves="sink=8,recent=16,chunk=rest",
                    chunk_layers="shared" if shared else "per-layer", chunk_tokens=24)
    kv = MHATokenToKVPool(size=1024, page_size=P, dtype=torch.float32, head_num=hkv, head_dim=d, layer_num=layers,
                          device="cpu", enable_memory_saver=False)
    r2t = ReqToTokenPool(size=2, max_context_len=512, device="cpu", enable_memory_saver=False)
    r2t.req_to_token[1, :L] = torch.arange(P, P + L, dtype=torch.int32)
    be = MuxAttentionBackend(SimpleNamespace(req_to_token_pool=r2t, token_to_kv_pool=kv), inner=None, mux_config=cfg)
    g = torch.Generator().manual_seed(seed)
    st = RequestMemory()
    n = (L + P - 1) // P
    st.scores(layers, n, "cpu")[:, :n] = torch.rand(layers, n, generator=g)
    st.token_delims = torch.rand(L, generator=g) < 0.08
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    return be, RequestPlan("r", 1, L, grant, st), r2t, n


def test_shared_choice_is_the_summed_score_choice_at_every_layer(monkeypatch):
    layers = 4
    be, plan, r2t, n = make(layers, shared=True)
    calls = []
    real = chunk_module.pick_chunks
    monkeypatch.setattr(chunk_module, "pick_chunks", lambda *a: calls.append(1) or real(*a))
    chosen = [set(be.planner.select(plan, i, torch.zeros(4, 16), r2t.req_to_token[1]).pages.tolist())
              for i in range(layers)]
    assert len(calls) == 1  # one chunk pass for the step
    assert all(c == chosen[0] for c in chosen)
    # the oracle: one layer whose heavy scores are the sum over layers, chosen per layer
    be1, plan1, r2t1, _ = make(1, shared=False)
    plan1.state.heavy_scores = plan.state.heavy_scores[:, :n].sum(dim=0, keepdim=True).clone()
    plan1.state.token_delims = plan.state.token_delims
    want = set(be1.planner.select(plan1, 0, torch.zeros(4, 16), r2t1.req_to_token[1]).pages.tolist())
    assert chosen[0] == want


def test_per_layer_choices_follow_each_layer_and_run_every_layer(monkeypatch):
    layers = 4
    be, plan, r2t, n = make(layers, shared=False, seed=1)
    calls = []
    real = chunk_module.pick_chunks
    monkeypatch.setattr(chunk_module, "pick_chunks", lambda *a: calls.append(1) or real(*a))
    chosen = [set(be.planner.select(plan, i, torch.zeros(4, 16), r2t.req_to_token[1]).pages.tolist())
              for i in range(layers)]
    assert len(calls) == layers and len({frozenset(c) for c in chosen}) > 1


def test_flag_and_field():
    with pytest.raises(MuxConfigError, match=r"^--mux-chunk-layers: allowed: per-layer, shared; got 'all'$"):
        MuxConfig(chunk_layers="all")
    assert parse_request_options({"mux_chunk_layers": "shared"}).chunk_layers == "shared"
    with pytest.raises(MuxRequestError, match="mux_chunk_layers: allowed: per-layer, shared"):
        parse_request_options({"mux_chunk_layers": 1})
    opts = parse_request_options({"mux_chunk_layers": "shared"})
    assert opts.effective_config(MuxConfig()).chunk_layers == "shared"
