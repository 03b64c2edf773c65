"""MuxAttentionBackend answers every method of SGLang's AttentionBackend (no server).

``__getattr__`` is never reached for a name the base class defines, so each base method must be overridden by the
mux backend: either forwarded to the wrapped backend (the CUDA-graph ones included) or kept as mux's own on
purpose. A fake wrapped backend records each call; the mux backend must pass the arguments on and return its value.
"""

from __future__ import annotations

import inspect

import pytest
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_mux.attention.backend import MuxAttentionBackend

# mux's own behaviour: planning and routed attention, and two base defaults it keeps on purpose
OWN = {
    "init_forward_metadata",
    "init_forward_metadata_out_graph",
    "forward_decode",
    "forward_extend",
    "get_fused_kv_write_buffers",
    "glue_target_verify_metadata",
    "glue_draft_metadata",
}
# the base class's dispatcher, kept: it calls the mux backend's own forward_decode / forward_extend
DISPATCHER = {"forward"}


def base_methods() -> list[str]:
    names = []
    for name, attr in vars(AttentionBackend).items():
        if name.startswith("__"):
            continue
        if inspect.isfunction(attr) or isinstance(attr, (property, classmethod, staticmethod)):
            names.append(name)
    return sorted(names)


FORWARDED = [n for n in base_methods() if n not in OWN | DISPATCHER]


class RecordingBackend:
    """Stands in for the wrapped backend: every method records its call and returns a value naming it."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return f"inner.{name}"

        return method


def mux_wrapping(inner) -> MuxAttentionBackend:
    be = MuxAttentionBackend.__new__(MuxAttentionBackend)  # no model runner needed to forward
    be.inner = inner
    return be


def sentinel_arguments(name: str) -> tuple[list, dict]:
    """One distinct object per parameter of the base method (positional ones by position, keyword-only by name)."""
    args, kwargs = [], {}
    for p in inspect.signature(getattr(AttentionBackend, name)).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = object()
        else:
            args.append(object())
    return args, kwargs


def test_every_base_method_is_overridden():
    missing = [n for n in base_methods() if n not in DISPATCHER and n not in vars(MuxAttentionBackend)]
    assert missing == []


def test_the_cuda_graph_methods_are_forwarded():
    for name in ("init_cuda_graph_state", "get_cuda_graph_seq_len_fill_value", "init_forward_metadata_in_graph",
                 "init_forward_metadata_for_breakable_cuda_graph_capture",
                 "prepare_forward_metadata_for_breakable_cuda_graph_replay", "on_after_cuda_graph_warmup"):
        assert name in FORWARDED


@pytest.mark.parametrize("name", [n for n in FORWARDED if not isinstance(vars(AttentionBackend)[n], property)])
def test_forwarded_method_reaches_the_wrapped_backend(name):
    inner = RecordingBackend()
    args, kwargs = sentinel_arguments(name)
    assert getattr(mux_wrapping(inner), name)(*args, **kwargs) == f"inner.{name}"
    assert len(inner.calls) == 1
    called, got_args, got_kwargs = inner.calls[0]
    assert called == name
    passed = [*got_args, *got_kwargs.values()]
    assert all(any(s is p for p in passed) for s in [*args, *kwargs.values()])


def test_verify_mask_is_the_wrapped_backends():
    class Inner:
        verify_mask = object()

    assert mux_wrapping(Inner()).verify_mask is Inner.verify_mask


def test_cuda_graph_state_no_longer_raises():
    inner = RecordingBackend()
    be = mux_wrapping(inner)
    be.init_cuda_graph_state(8, 64)
    assert be.get_cuda_graph_seq_len_fill_value() == "inner.get_cuda_graph_seq_len_fill_value"
    assert [c[:2] for c in inner.calls] == [("init_cuda_graph_state", (8, 64)), ("get_cuda_graph_seq_len_fill_value", ())]


def test_kept_defaults_do_not_ask_the_wrapped_backend():
    inner = RecordingBackend()
    be = mux_wrapping(inner)
    assert be.get_fused_kv_write_buffers(object(), object()) is None
    assert "host" in be.glue_target_verify_metadata() and "host" in be.glue_draft_metadata()
    assert inner.calls == []


def test_base_dispatcher_reaches_mux_decode():
    """``forward`` is the base class's: it must call the mux backend's forward_decode, not the wrapped one's."""
    seen = []

    class Mode:
        is_idle = is_mixed = staticmethod(lambda: False)
        is_decode = staticmethod(lambda: True)

    class Batch:
        forward_mode = Mode()

    be = mux_wrapping(RecordingBackend())
    be.forward_decode = lambda *a, **kw: seen.append("mux") or "mux"
    assert be.forward(None, None, None, None, Batch()) == "mux"
    assert seen == ["mux"] and be.inner.calls == []
