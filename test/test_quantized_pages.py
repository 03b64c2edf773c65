"""Quantized cold pages (sglang_mux.memory.quantized_pages): the KIVI split, the per-element error bound, packed
sizes, the byte accounting, and routed attention over a mix of exact and quantized pages."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_mux.attention.routed_decode import attend, page_positions
from sglang_mux.config import MuxConfig
from sglang_mux.memory.quantized_pages import (
    QuantizedPage,
    dequantize_page,
    device_bytes_per_request,
    exact_page_nbytes,
    pages_at_equal_bytes,
    quantize_page,
    quantized_page_nbytes,
)
from sglang_mux.request_options import MuxRequestError, parse_request_options

# SmolLM2-135M, the default real model: 30 layers, 3 KV heads, head dim 64, bf16, page size 16
SMOL = dict(page_size=16, num_layers=30, num_kv_heads=3, head_dim=64, elem_size=2)


def make_record(seed: int, layers: int, p: int, h: int, d: int, dtype=torch.float32) -> torch.Tensor:
    """A page record [L, 2, P, H, D] with KIVI's outliers: a few key channels x100 and an offset, a few value
    tokens x30."""
    g = torch.Generator().manual_seed(seed)
    rec = torch.randn(layers, 2, p, h, d, generator=g)
    ch = torch.randperm(d, generator=g)[:3]
    rec[:, 0, :, :, ch] = rec[:, 0, :, :, ch] * 100 + 7
    tok = torch.randperm(p, generator=g)[:2]
    rec[:, 1, tok] *= 30
    return rec.to(dtype)


def group_bounds(qp: QuantizedPage) -> torch.Tensor:
    """scale / 2 of each element's group, broadcast to the record's shape."""
    k, v = qp.k, qp.v
    *lead, p, h, d = k.shape
    ks = k.scale.float().unsqueeze(len(lead) + 1).expand(*lead, p // k.group, k.group, h, d).reshape(k.shape)
    vs = v.scale.float().unsqueeze(-1).expand(*lead, p, h, d // v.group, v.group).reshape(v.shape)
    return torch.stack([ks, vs], dim=len(lead)) / 2


SHAPES = [(2, 16, 3, 64), (1, 16, 2, 128), (3, 8, 1, 32), (2, 32, 4, 16)]  # (L, P, H, D)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [4, 16, 32, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_element_within_its_group_bound(bits, group, shape):
    for seed in range(3):
        rec = make_record(seed, *shape)
        qp = quantize_page(rec, bits, group)
        deq = dequantize_page(qp)
        assert deq.shape == rec.shape and deq.dtype == rec.dtype
        bound = group_bounds(qp)
        err = (deq - rec).abs()
        eps = 1e-6 * (1 + rec.abs())
        worst = (err - bound - eps).max().item()
        assert worst <= 0, f"bits {bits} group {group} shape {shape}: an element is {worst} beyond scale/2"
        # the stored step is the group's (max - min) / (2^bits - 1), rounded up only by float16
        L, P, H, D = shape
        gk = min(group, P)
        kx = rec[:, 0].reshape(L, P // gk, gk, H, D)
        want = (kx.amax(2) - kx.amin(2)) / (2**bits - 1)
        got = qp.k.scale.float()
        assert (got >= want * (1 - 1e-6)).all()
        assert (got <= want * (1 + 2e-3) + (kx.amin(2).abs() * 2e-3 + 1e-7) / (2**bits - 1)).all()


def test_error_shrinks_with_bits_and_keys_use_per_channel_groups():
    rec = make_record(7, 4, 16, 3, 64)
    err = {b: (dequantize_page(quantize_page(rec, b, 32)) - rec).abs() for b in (8, 4, 2)}
    mean = {b: e.mean().item() for b, e in err.items()}
    assert mean[8] * 50 < mean[2] and mean[8] * 8 < mean[4] < mean[2] / 3
    # per-channel keys: the x100 outlier channels do not spoil the other channels' error (per-token grouping would)
    k_err = err[4][:, 0]
    chan_err = k_err.amax(dim=(0, 1, 2))  # [D]
    outliers = rec[:, 0].abs().amax(dim=(0, 1, 2)) > 50
    assert chan_err[~outliers].max() * 20 < chan_err[outliers].min()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bits_16_round_trip_is_bit_exact(dtype):
    rec = make_record(3, 2, 16, 3, 64, dtype)
    qp = quantize_page(rec, 16, 32)
    back = dequantize_page(qp)
    assert back.dtype == dtype and torch.equal(back, rec)
    assert qp.nbytes() == rec.numel() * rec.element_size() == quantized_page_nbytes(16, 2, 3, 64, rec.element_size(), 16)


def test_bf16_record_error_is_bound_plus_half_a_bf16_ulp():
    rec = make_record(5, 2, 16, 3, 64, torch.bfloat16)
    qp = quantize_page(rec, 4, 32)
    deq = dequantize_page(qp)
    assert deq.dtype == torch.bfloat16
    err = (deq.float() - rec.float()).abs()
    ulp = deq.float().abs() * 2.0**-8  # half an ulp of bf16 (8 bits of mantissa) is <= |x| * 2^-8
    assert (err <= group_bounds(qp) + ulp + 1e-6).all()


def test_constant_group_and_huge_values():
    rec = torch.full((1, 2, 16, 1, 32), 3.0)
    for bits in (8, 4, 2):
        assert torch.equal(dequantize_page(quantize_page(rec, bits, 32)), rec)  # 3.0 is exact in float16
    rec = torch.full((1, 2, 16, 1, 32), 0.1)  # not a float16 value: still within the bound (zero rounds down)
    qp = quantize_page(rec, 2, 32)
    assert ((dequantize_page(qp) - rec).abs() <= group_bounds(qp) + 1e-7).all()
    big = make_record(1, 1, 16, 2, 32) * 1e4  # beyond float16: the page keeps float32 scales
    qp = quantize_page(big, 4, 32)
    assert qp.k.scale.dtype == torch.float32 and torch.isfinite(qp.k.scale).all()
    assert ((dequantize_page(qp) - big).abs() <= group_bounds(qp) + 1e-6 * (1 + big.abs())).all()


@pytest.mark.parametrize("shape", [(30, 16, 3, 64), (2, 16, 3, 64), (4, 8, 2, 128)])
def test_packed_sizes_exact(shape):
    L, P, H, D = shape
    rec = make_record(0, L, P, H, D, torch.bfloat16)
    sizes = {b: quantize_page(rec, b, 32) for b in (8, 4, 2)}
    n = L * P * H * D  # elements of K (and of V)
    gk, gv = min(32, P), min(32, D)
    scale_bytes = 2 * 2 * (L * (P // gk) * H * D + L * P * H * (D // gv))  # scale + zero, float16
    for b, qp in sizes.items():
        assert qp.k.packed.dtype == torch.uint8 and qp.k.packed.numel() == n * b // 8
        assert qp.v.packed.numel() == n * b // 8
        assert qp.nbytes() == 2 * n * b // 8 + scale_bytes
        assert qp.nbytes() == quantized_page_nbytes(P, L, H, D, 2, b, 32)
    data8 = sizes[8].nbytes() - scale_bytes
    assert sizes[4].nbytes() == data8 // 2 + scale_bytes and sizes[2].nbytes() == data8 // 4 + scale_bytes
    f32 = quantize_page(rec, 4, 32, scale_dtype=torch.float32)
    assert f32.nbytes() == quantized_page_nbytes(P, L, H, D, 2, 4, 32, scale_bytes=4) == data8 // 2 + 2 * scale_bytes


def test_accounting_at_the_default_model_shape():
    exact = exact_page_nbytes(**SMOL)
    assert exact == 30 * 2 * 16 * 3 * 64 * 2 == 368_640
    got = {b: quantized_page_nbytes(**SMOL, bits=b, group=32) for b in (16, 8, 4, 2)}
    assert got == {16: 368_640, 8: 218_880, 4: 126_720, 2: 80_640}
    assert {b: pages_at_equal_bytes(1000, **SMOL, bits=b) for b in (16, 8, 4, 2)} == {
        16: 1000, 8: 1684, 4: 2909, 2: 4571}
    # 8K context, 2048 hot tokens exact, the other 384 pages int4
    per_token = exact // 16
    assert device_bytes_per_request(8192, 2048, **SMOL, cold_bits=4) == 2048 * per_token + 384 * 126_720
    assert device_bytes_per_request(8192, 2048, **SMOL, cold_bits=16) == 8192 * per_token
    # leftover cold tokens short of a page count as exact
    assert device_bytes_per_request(8200, 2050, **SMOL, cold_bits=2) == (8200 - 384 * 16) * per_token + 384 * 80_640
    assert device_bytes_per_request(100, 500, **SMOL, cold_bits=2) == 100 * per_token


def test_routed_attention_over_exact_and_quantized_pages_matches_float64_reference():
    """A request of n pages, some cold pages quantized (int8/int4/int2), the rest exact: the routed path's
    ``attend`` over the selected pages' (dequantized) K/V equals float64 softmax attention on the same values."""
    torch.manual_seed(0)
    L, P, H, D, Hq, n_pages = 2, 16, 3, 64, 9, 12
    ctx = n_pages * P - 5  # partial tail page
    pages = [make_record(100 + i, L, P, H, D) for i in range(n_pages)]
    bits_of = {1: 8, 2: 4, 3: 2, 5: 4, 6: 8, 8: 2, 9: 4}  # cold pages; 0, 4, 7, 10 and the tail 11 exact
    stored = [dequantize_page(quantize_page(r, bits_of[i], 32)) if i in bits_of else r for i, r in enumerate(pages)]
    assert not torch.equal(stored[1], pages[1]) and torch.equal(stored[4], pages[4])
    kv = torch.stack(stored)  # [n, L, 2, P, H, D]
    selection = torch.tensor([0, 1, 3, 4, 6, 8, 9, 11])
    pos = page_positions(selection, ctx, P)
    assert pos.numel() == 7 * P + (ctx - 11 * P)
    q = torch.randn(L, Hq, D) * 0.05  # logits of a few units: attention spread over many tokens, not one-hot
    scale = 1 / math.sqrt(D)
    for layer in range(L):
        k = kv[:, layer, 0].reshape(n_pages * P, H, D)[pos]
        v = kv[:, layer, 1].reshape(n_pages * P, H, D)[pos]
        out, probs = attend(q[layer], k, v, scale)
        # float64 reference, head by head (GQA: q head h reads kv head h // (Hq / H))
        for h in range(Hq):
            kh, vh = k[:, h // (Hq // H)].double(), v[:, h // (Hq // H)].double()
            logits = kh @ q[layer, h].double() * scale
            p = torch.softmax(logits, dim=0)
            ref = p @ vh
            assert torch.allclose(probs[h].double(), p, atol=1e-6, rtol=1e-5)
            assert torch.allclose(out[h].double(), ref, atol=1e-4, rtol=1e-5), (layer, h)
    # and int8 cold pages change the output far less than int2 ones (same selection, all cold pages at one precision)
    exact_kv = torch.stack(pages)
    k0, v0 = (exact_kv[:, 0, i].reshape(n_pages * P, H, D)[pos] for i in (0, 1))
    out0, _ = attend(q[0], k0, v0, scale)
    dev = {}
    for b in (8, 2):
        qkv = torch.stack([dequantize_page(quantize_page(r, b, 32)) if i in bits_of else r for i, r in enumerate(pages)])
        kb, vb = (qkv[:, 0, i].reshape(n_pages * P, H, D)[pos] for i in (0, 1))
        dev[b] = (attend(q[0], kb, vb, scale)[0] - out0).abs().max().item()
    assert dev[8] * 10 < dev[2], dev


def test_flags_accept_their_bounds():
    # bad --mux-cold-bits / --mux-quant-group values: test_config.py's table of one-line flag errors
    assert (MuxConfig(cold_bits=2, quant_group=4).cold_bits, MuxConfig(quant_group=1024).quant_group) == (2, 1024)


@pytest.mark.parametrize("bad", [5, "8", 8.0, False])
def test_bad_request_cold_bits_names_the_field(bad):
    with pytest.raises(MuxRequestError) as e:
        parse_request_options({"mux_cold_bits": bad})
    assert str(e.value).startswith("sampling_params.custom_params.mux_cold_bits: allowed: 16, 8, 4, 2")
    assert parse_request_options({"mux_cold_bits": 2}).cold_bits == 2


def test_bad_arguments_raise():
    rec = make_record(0, 1, 16, 1, 32)
    with pytest.raises(ValueError, match="bits"):
        quantize_page(rec, 3, 32)
    with pytest.raises(ValueError, match="power of two"):
        quantize_page(rec, 4, 12)
    with pytest.raises(ValueError, match=r"\[..., 2, P, H, D\]"):
        quantize_page(rec[:, 0], 4, 32)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mode", ["wait", "skip"])
def test_demoted_pages_keep_a_quantized_device_copy_that_routed_decode_reads(bits, mode):
    """Tier mode with --mux-cold-bits: ColdPageMover.demote keeps a quantized copy of each demoted page with the
    request; the routed step reads it (dequantized, through the staging area, never skipped) instead of fetching
    the exact copy, and equals the float64 routed reference over K/V whose demoted pages hold the dequantized values."""
    from types import SimpleNamespace

    from mux_kernels.reference import routed_decode as ref_routed_decode
    from test_routed_decode import make_backend

    from sglang_mux.attention.step_planner import RequestPlan
    from sglang_mux.memory.cold_pages import ColdPageMover
    from sglang_mux.memory.tiers import TierManager
    from sglang_mux.metrics import STATS
    from sglang_mux.request_options import MuxRequestOptions
    from sglang_mux.memory.requests import RequestMemory
    from sglang_mux.router.spine import StaticSpineRouter

    hq, hkv, d, P, L = 4, 2, 32, 8, 400
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=8,recent=8,retrieval=rest", missing_page=mode)
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=11, hq=hq, hkv=hkv, d=d)
    kv.get_key_buffer(0)[slots, :, 3] *= 20  # an outlier key channel
    be.summaries.rebuild_from_keys(0, r2t.req_to_token[1], 0, L)
    freed = []
    mover = ColdPageMover(kv_pool=kv, allocator=SimpleNamespace(free=freed.append), req_to_token=r2t.req_to_token,
                          summaries=be.summaries, tiers=TierManager(host_bytes=1 << 24), page_size=P, num_layers=1,
                          start_layer=0)
    be.cold = mover
    k_exact, v_exact = kv.get_key_buffer(0).clone(), kv.get_value_buffer(0).clone()

    st = RequestMemory(protected_len=0)
    grant = StaticSpineRouter(cfg).grant(L, MuxRequestOptions())
    plan = [RequestPlan("r", 1, L, grant, st)]
    mover.demote(plan[0], cfg.replace(host_bytes=1 << 24, cold_bits=bits, quant_group=16))
    n = (L + P - 1) // P
    demoted = sorted(st.demoted)
    assert demoted == list(range(1, n - 1))  # the sink page 0 and the window (the tail page) stay
    copies = st.quantized_pages
    assert sorted(copies) == demoted and all(c.bits == bits for c in copies.values())
    per_page = quantized_page_nbytes(P, 1, hkv, d, 4, bits, 16)
    assert mover.accounting(st, L, L - len(demoted) * P)["quantized_cold_bytes"] == len(demoted) * per_page
    assert sum(f.numel() for f in freed) == len(demoted) * P
    # the reference K/V: demoted pages hold their dequantized values; then their device slots are reused
    k_ref, v_ref = k_exact.clone(), v_exact.clone()
    for page, qp in copies.items():
        s = slots[page * P : (page + 1) * P]
        rec = dequantize_page(qp)  # [1, 2, P, H, D]
        k_ref[s], v_ref[s] = rec[0, 0], rec[0, 1]
        kv.get_key_buffer(0)[s] = 1e3
        kv.get_value_buffer(0)[s] = -1e3

    q = torch.randn(1, hq, d, generator=torch.Generator().manual_seed(2))
    skipped, waited = STATS.staging_skipped, STATS.staging_waited
    pages, *_ = be.planner.select(plan[0], 0, q[0], r2t.req_to_token[1])
    assert any(int(x) in st.demoted for x in pages.tolist())  # retrieval reads demoted pages
    got = be._routed_decode(q.reshape(1, -1), layer, plan)
    assert (STATS.staging_skipped, STATS.staging_waited) == (skipped, waited)  # never fetched from the tiers
    ref = ref_routed_decode(q, k_ref, v_ref, r2t.req_to_token, torch.tensor([1]), torch.tensor([L]),
                            pages.view(1, -1), torch.tensor([pages.numel()]), P, layer.scaling)
    assert torch.allclose(got.view(1, hq, d).double(), ref, rtol=1e-5, atol=1e-5)
    exact = ref_routed_decode(q, k_exact, v_exact, r2t.req_to_token, torch.tensor([1]), torch.tensor([L]),
                              pages.view(1, -1), torch.tensor([pages.numel()]), P, layer.scaling)
    err = (got.view(1, hq, d).double() - exact).abs().max().item()
    assert err < {8: 0.02, 4: 0.3, 2: 1.5}[bits] and (bits == 8 or err > 1e-4)
