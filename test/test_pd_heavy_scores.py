"""Heavy-hitter scores across PD (disagg/heavy_scores.py), without servers: the slot encoding round trip, and
the four SGLang patches on real ``MetadataBuffers`` objects, the slot copied from the prefill side's buffer to the
decode side's as the transfer engine copies registered buffers (by address and item length)."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from sglang_mux.disagg import heavy_scores as hs
from sglang_mux.memory.requests import REGISTRY, RequestRegistry


def table(num_layers: int, pages: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand((num_layers, pages), generator=g, dtype=torch.float32) + 0.01
    return t


def restored(slot, num_layers):
    reg = RequestRegistry()
    assert hs.restore_into(reg, "r", slot, num_layers, "cpu")
    return reg.get("r").heavy_scores


def test_round_trip_is_exact_when_the_prompt_fits():
    t = table(3, 100)
    got = restored(hs.encode_scores(t, 3), 3)
    assert torch.equal(got[:, :100], t)
    assert got[:, 100:].abs().sum() == 0


def test_beyond_the_slot_the_best_pages_cross_per_layer():
    t = table(2, hs.SHIPPED_PAGES + 300, seed=1)
    got = restored(hs.encode_scores(t, 2), 2)
    for layer in range(2):
        best = torch.topk(t[layer], hs.SHIPPED_PAGES).indices
        assert torch.equal(got[layer, best], t[layer, best])
        rest = torch.ones(t.shape[1], dtype=torch.bool)
        rest[best] = False
        assert got[layer, : t.shape[1]][rest].abs().sum() == 0


def test_unscored_pages_and_missing_tables_carry_nothing():
    t = torch.zeros((2, 50))
    t[1, 7] = 0.5
    slot = hs.encode_scores(t, 2)
    layers, pages, vals, need = hs.decode_scores(slot)
    assert layers.tolist() == [1] and pages.tolist() == [7] and vals.tolist() == [0.5] and need == 8
    assert hs.decode_scores(hs.encode_scores(None, 2)) is None
    assert not hs.restore_into(RequestRegistry(), "r", hs.encode_scores(None, 2), 2, "cpu")


def _metadata_buffers():
    from sglang.srt.disaggregation.utils import MetadataBuffers

    mb = MetadataBuffers(4, hidden_size=16, hidden_states_dtype=torch.float32, max_sampling_mask_tokens=16)
    hs.add_heavy_score_buffer(None, mb)
    return mb


def test_patches_register_write_and_read_the_slot(monkeypatch):
    pytest.importorskip("sglang.srt.disaggregation.utils")
    monkeypatch.setattr(hs, "_layout", None)
    mb = _metadata_buffers()
    assert mb.mux_heavy_scores is None  # no mux backend in this process: SGLang's buffers unchanged
    plain = mb.get_buf_infos()
    assert hs.register_heavy_score_buffer(plain, mb) == plain

    hs.register_local_layout(3, "cpu")
    prefill, decode = _metadata_buffers(), _metadata_buffers()
    ptrs, lens, items = hs.register_heavy_score_buffer(prefill.get_buf_infos(), prefill)
    assert ptrs[-1] == prefill.mux_heavy_scores.data_ptr()  # appended last: a peer without it keeps the rest aligned
    assert items[-1] == 3 * 2 * hs.SHIPPED_PAGES * 4 and lens[-1] == 4 * items[-1]
    assert ptrs[:-1] == list(prefill.get_buf_infos()[0])  # SGLang's own buffers as they were

    t = table(3, 40, seed=2)
    REGISTRY.get("req-a").heavy_scores = t
    req = SimpleNamespace(rid="req-a", metadata_buffer_index=2)
    sent = hs.STATS.pd_heavy_scores_sent
    hs.write_heavy_scores(None, prefill, req)
    assert hs.STATS.pd_heavy_scores_sent == sent + 1
    REGISTRY.release("req-a")

    # the transfer engine: item_len bytes from src ptr + len * src index to dst ptr + len * dst index
    dptrs, _, ditems = hs.register_heavy_score_buffer(decode.get_buf_infos(), decode)
    assert ditems[-1] == items[-1]
    ctypes.memmove(dptrs[-1] + ditems[-1] * 1, ptrs[-1] + items[-1] * 2, items[-1])

    queue = SimpleNamespace(metadata_buffers=decode)
    got = hs.read_heavy_scores(queue, SimpleNamespace(metadata_buffer_index=1, req=SimpleNamespace(rid="req-a")))
    assert got is None  # a BEFORE hook that leaves the arguments alone
    st = REGISTRY.release("req-a")
    assert torch.equal(st.heavy_scores[:, :40], t)
