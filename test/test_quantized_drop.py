"""Drop mode with quantized cold pages (``--mux-drop-cold --mux-cold-bits 8|4|2``, memory/cold_pages.py).

The bytes the query-aware leaves' exact pages would hold keep quantized copies of the best cold pages instead;
the others are dropped. Oracles: the per-layer dequantization equals the whole-page one; the byte budget
(``pages_at_equal_bytes``); the best pages by heavy score survive; the routed step equals the float64 reference
over K/V whose quantized pages hold their dequantized values (device slots poisoned after the drop); the memory
invariant checker passes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mux_kernels.reference import routed_decode as ref_routed_decode
from test_routed_decode import make_backend

from sglang_mux.attention.step_planner import RequestPlan
from sglang_mux.config import MuxConfig
from sglang_mux.memory.cold_pages import ColdPageMover
from sglang_mux.memory.quantized_pages import (
    dequantize_page,
    dequantize_page_layer,
    pages_at_equal_bytes,
    quantize_page,
    quantized_page_nbytes,
)
from sglang_mux.memory.requests import RequestMemory
from sglang_mux.metrics import STATS
from sglang_mux.request_options import MuxRequestOptions
from sglang_mux.router.spine import StaticSpineRouter


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(3, 16, 3, 64), (2, 8, 2, 32), (1, 16, 1, 4)])
def test_one_layer_dequantizes_like_the_whole_page(bits, shape):
    layers, p, h, d = shape
    rec = torch.randn(layers, 2, p, h, d, generator=torch.Generator().manual_seed(bits))
    rec[:, 0, :, :, 1] *= 30  # an outlier key channel
    qp = quantize_page(rec, bits, 16)
    whole = dequantize_page(qp)
    for i in range(layers):
        assert torch.equal(dequantize_page_layer(qp, i), whole[i])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_drop_keeps_quantized_best_pages_at_equal_bytes_and_reads_them(bits):
    hq, hkv, d, P, L = 4, 2, 32, 8, 400
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=8,recent=8,heavy=8,retrieval=rest", drop_cold=True,
                    cold_bits=bits, quant_group=16)
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=7, hq=hq, hkv=hkv, d=d)
    freed = []
    be.cold = mover = ColdPageMover(kv_pool=kv, allocator=SimpleNamespace(free=freed.append),
                                    req_to_token=r2t.req_to_token, summaries=be.summaries, tiers=None, page_size=P,
                                    num_layers=1, start_layer=0)
    k_exact, v_exact = kv.get_key_buffer(0).clone(), kv.get_value_buffer(0).clone()
    n = (L + P - 1) // P
    st = RequestMemory(protected_len=0)
    scores = st.scores(1, n, "cpu")
    scores[0, :n] = torch.rand(n, generator=torch.Generator().manual_seed(3))
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    plan = RequestPlan("r", 1, L, grant, st)
    before = STATS.quantized_cold_pages
    mover.drop(plan, cfg)

    # the byte budget: the retrieval share's exact pages, spent on quantized copies
    cap = pages_at_equal_bytes(grant["retrieval"], P, 1, hkv, d, 4, bits, 16)
    quantized = sorted(st.quantized_pages)
    assert len(quantized) == cap > grant["retrieval"]
    assert sum(q.nbytes() for q in st.quantized_pages.values()) <= grant["retrieval"] * 2 * P * hkv * d * 4
    assert sum(q.nbytes() for q in st.quantized_pages.values()) == cap * quantized_page_nbytes(P, 1, hkv, d, 4, bits, 16)
    assert STATS.quantized_cold_pages - before == cap
    # sinks, window and heavy stay exact; the best cold pages by heavy score are the quantized ones
    hot = {0, n - 1}
    heavy_kept = set(torch.topk(scores[0, 1 : n - 1], grant["heavy"]).indices.add(1).tolist())
    cold = [q for q in range(n - 1) if q not in hot | heavy_kept]
    best = sorted(cold, key=lambda q: -float(scores[0, q]))[:cap]
    assert quantized == sorted(best)
    assert st.dropped_pages == set(cold) - set(best) and not st.dropped_pages & set(quantized)
    assert all(st.demoted[q] is None for q in quantized)
    assert st.quantized_bytes == sum(q.nbytes() for q in st.quantized_pages.values())
    assert sum(f.numel() for f in freed) == len(cold) * P  # every cold page's slots went back

    # the reference K/V: quantized pages hold their dequantized values; their device slots are then reused
    k_ref, v_ref = k_exact.clone(), v_exact.clone()
    for page in cold:
        s = slots[page * P : (page + 1) * P]
        if page in st.quantized_pages:
            rec = dequantize_page(st.quantized_pages[page])
            k_ref[s], v_ref[s] = rec[0, 0], rec[0, 1]
        kv.get_key_buffer(0)[s] = 1e3
        kv.get_value_buffer(0)[s] = -1e3
    q = torch.randn(1, hq, d, generator=torch.Generator().manual_seed(4))
    pages, *_ = be.planner.select(plan, 0, q[0], r2t.req_to_token[1])
    chosen = set(pages.tolist())
    assert not chosen & st.dropped_pages and chosen & set(quantized)  # retrieval reads quantized pages
    got = be._routed_decode(q.reshape(1, -1), layer, [plan])
    ref = ref_routed_decode(q, k_ref, v_ref, r2t.req_to_token, torch.tensor([1]), torch.tensor([L]),
                            pages.view(1, -1), torch.tensor([pages.numel()]), P, layer.scaling)
    assert torch.allclose(got.view(1, hq, d).double(), ref, rtol=1e-5, atol=1e-5)
    assert st.staging is None  # read one layer at a time: no dequantized page is held, not even a staging area


def test_the_quantized_set_stays_bounded_and_keeps_the_best_as_pages_turn_cold():
    hq, hkv, d, P = 4, 2, 32, 8
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=8,recent=8,heavy=8,retrieval=rest", drop_cold=True,
                    cold_bits=4, quant_group=16)
    be, layer, kv, r2t, slots = make_backend(cfg, 600, seed=8, hq=hq, hkv=hkv, d=d)
    mover = ColdPageMover(kv_pool=kv, allocator=SimpleNamespace(free=lambda s: None), req_to_token=r2t.req_to_token,
                          summaries=be.summaries, tiers=None, page_size=P, num_layers=1, start_layer=0)
    st = RequestMemory(protected_len=0)
    gen = torch.Generator().manual_seed(5)
    st.scores(1, 80, "cpu")[0, :80] = torch.rand(80, generator=gen)
    router = StaticSpineRouter(cfg)
    cap = None
    for L in range(300, 600, 40):  # the window slides: new pages turn cold, some better than the kept ones
        grant = router.grant(L, MuxRequestOptions())
        mover.drop(RequestPlan("r", 1, L, grant, st), cfg)
        cap = pages_at_equal_bytes(grant["retrieval"], P, 1, hkv, d, 4, 4, 16)
        kept = set(st.quantized_pages)
        assert len(kept) <= cap
        assert st.quantized_bytes == sum(q.nbytes() for q in st.quantized_pages.values())
        assert not kept & st.dropped_pages and set(st.demoted) == kept
        n = (L + P - 1) // P
        s = st.heavy_scores[0]
        off = kept | st.dropped_pages
        # no dropped page scores above the worst kept one: the kept set is the best of what left the device
        assert max(float(s[q]) for q in st.dropped_pages) <= min(float(s[q]) for q in kept) + 1e-6
        assert all(q < n - 1 for q in off)
    assert len(st.quantized_pages) == cap


def test_stats_report_device_bytes_by_precision():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_mux.memory.requests import RequestRegistry

    P, L = 8, 400
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=8,recent=8,heavy=8,retrieval=rest", drop_cold=True,
                    cold_bits=4, quant_group=16)
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=9)
    be.cold.allocator = SimpleNamespace(free=lambda s: None)
    be.registry = RequestRegistry()
    st = be.registry.get("r")
    st.protected_len, st.summarized = 0, True
    st.scores(1, 50, "cpu")[0, :50] = torch.rand(50, generator=torch.Generator().manual_seed(1))
    fb = SimpleNamespace(rids=["r"], forward_mode=ForwardMode.DECODE, seq_lens_cpu=torch.tensor([L]),
                         seq_lens=torch.tensor([L]), req_pool_indices=torch.tensor([1]))
    be._plan_step(fb)
    assert st.quantized_pages and st.dropped_pages
    held = L - len(st.off_device_pages()) * P
    assert STATS.device_kv_bytes_by_precision == {"exact": held * STATS.kv_bytes_per_token,
                                                  "int4": st.quantized_bytes}
