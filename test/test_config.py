"""MuxConfig: flag parsing, validation messages, env transport, leaf split arithmetic."""

import json

import pytest

from sglang_mux.config import ENV_VAR, LEAF_NAMES, MuxConfig, MuxConfigError, split_mux_args


def test_defaults_are_valid_and_roundtrip_through_env(monkeypatch):
    cfg = MuxConfig()
    monkeypatch.setenv(ENV_VAR, cfg.to_env())
    assert MuxConfig.from_env() == cfg
    monkeypatch.delenv(ENV_VAR)
    assert MuxConfig.from_env() == MuxConfig()


def test_split_mux_args_separates_our_flags():
    cfg, rest = split_mux_args(
        ["--port", "3000", "--mux-budget", "1024", "--mux-page-size=32", "--mux-drop-cold", "--tp", "1"]
    )
    assert rest == ["--port", "3000", "--tp", "1"]
    assert (cfg.budget, cfg.page_size, cfg.drop_cold) == (1024, 32, True)


@pytest.mark.parametrize(
    "argv, flag, allowed",
    [
        (["--mux-budget", "-5"], "--mux-budget", "positive"),
        (["--mux-budget", "abc"], "--mux-budget", "integer"),
        (["--mux-budget", "0"], "--mux-budget", "positive"),
        (["--mux-page-size", "24"], "--mux-page-size", "power of two"),
        (["--mux-page-size", "0"], "--mux-page-size", "power of two"),
        (["--mux-window-tokens", "4096", "--mux-budget", "1024"], "--mux-window-tokens", "<= --mux-budget"),
        (["--mux-sink-tokens", "-2"], "--mux-sink-tokens", ">= 0"),
        (["--mux-budget", "100", "--mux-sink-tokens", "50", "--mux-window-tokens", "60"], "--mux-sink-tokens + --mux-window-tokens", "<= --mux-budget"),
        (["--mux-bogus", "1"], "--mux-bogus", "allowed --mux-* flags"),
        (["--mux-leaves", "sink=64,magic=5"], "--mux-leaves", "allowed: sink, recent, heavy, retrieval"),
        (["--mux-leaves", "sink=64,recent=rest,heavy=rest"], "--mux-leaves", "only one leaf"),
        (["--mux-leaves", "sink=4000"], "--mux-leaves", "more than the budget"),
        (["--mux-drop-cold", "maybe"], "--mux-drop-cold", "true/false"),
        (["--mux-retrieval-score", "max"], "--mux-retrieval-score", "allowed: mass, bound"),
        (["--mux-retrieval-temperature", "0"], "--mux-retrieval-temperature", "positive"),
        (["--mux-sparse-prefill-min-tokens", "-1"], "--mux-sparse-prefill-min-tokens", ">= 0 (0: off)"),
        (["--mux-sparse-prefill-min-tokens", "4k"], "--mux-sparse-prefill-min-tokens", "integer"),
        (["--mux-sparse-prefill-block", "48"], "--mux-sparse-prefill-block", "power of two in [8, 1024]"),
        (["--mux-sparse-prefill-block", "4"], "--mux-sparse-prefill-block", "power of two in [8, 1024]"),
        (["--mux-sparse-prefill-keep", "0"], "--mux-sparse-prefill-keep", "in (0, 1]"),
        (["--mux-sparse-prefill-keep", "1.5"], "--mux-sparse-prefill-keep", "in (0, 1]"),
        (["--mux-sparse-prefill-sink-tokens", "-1"], "--mux-sparse-prefill-sink-tokens", ">= 0"),
        (["--mux-sparse-prefill-window-tokens", "-8"], "--mux-sparse-prefill-window-tokens", ">= 0"),
        (["--mux-sparse-prefill-pattern", "dense"], "--mux-sparse-prefill-pattern", "allowed: topk, vertical_slash"),
        (["--mux-cold-bits", "3"], "--mux-cold-bits", "allowed: 16, 8, 4, 2"),
        (["--mux-cold-bits", "5"], "--mux-cold-bits", "allowed: 16, 8, 4, 2"),
        (["--mux-cold-bits", "0"], "--mux-cold-bits", "allowed: 16, 8, 4, 2"),
        (["--mux-cold-bits", "32"], "--mux-cold-bits", "allowed: 16, 8, 4, 2"),
        (["--mux-cold-bits", "int4"], "--mux-cold-bits", "integer"),
        (["--mux-quant-group", "48"], "--mux-quant-group", "power of two in [4, 1024]"),
        (["--mux-quant-group", "2"], "--mux-quant-group", "power of two in [4, 1024]"),
        (["--mux-quant-group", "2048"], "--mux-quant-group", "power of two in [4, 1024]"),
        (["--mux-quant-group", "24"], "--mux-quant-group", "power of two in [4, 1024]"),
        (["--mux-quant-group", "1"], "--mux-quant-group", "power of two in [4, 1024]"),
        (["--mux-quant-group", "4096"], "--mux-quant-group", "power of two in [4, 1024]"),
    ],
)
def test_bad_values_give_one_line_error_naming_the_flag(argv, flag, allowed):
    with pytest.raises(MuxConfigError) as ei:
        split_mux_args(argv)
    msg = str(ei.value)
    assert "\n" not in msg
    assert flag in msg and allowed in msg


def test_leaf_split_worked_example():
    cfg = MuxConfig(budget=2048, leaves="sink=64,recent=512,heavy=256,retrieval=rest")
    assert cfg.leaf_split(2048) == {"sink": 64, "recent": 512, "heavy": 256, "retrieval": 1216, "chunk": 0}


def test_default_leaf_split_sums_to_budget():
    cfg = MuxConfig(budget=1000, sink_tokens=32, window_tokens=200)
    assert (MuxConfig(budget=256).sink, MuxConfig(budget=256).window) == (32, 64)
    assert (MuxConfig().sink, MuxConfig().window) == (64, 512)
    split = cfg.leaf_split(1000)
    assert list(split) == list(LEAF_NAMES)
    assert split == {"sink": 32, "recent": 200, "heavy": 125, "retrieval": 643, "chunk": 0}
    assert sum(split.values()) == 1000


def test_env_with_unknown_key_is_rejected():
    with pytest.raises(MuxConfigError, match="unknown keys"):
        MuxConfig.from_json(json.dumps({"budget": 10, "nope": 1}))


def test_cli_doc_lists_every_flag_and_is_current():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "scripts/gen_cli_doc.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = (root / "docs/cli.md").read_text()
    from sglang_mux.config import cli_flags

    assert all(f"`{flag}`" in doc for flag in cli_flags())


def test_sparse_prefill_flags_parse_and_default_off():
    assert MuxConfig().sparse_prefill_min_tokens == 0
    cfg, rest = split_mux_args(
        ["--mux-sparse-prefill-min-tokens", "4096", "--mux-sparse-prefill-block=128", "--mux-sparse-prefill-keep",
         "0.8", "--mux-sparse-prefill-pattern", "vertical_slash", "--port", "1"]
    )
    assert rest == ["--port", "1"]
    assert (cfg.sparse_prefill_min_tokens, cfg.sparse_prefill_block, cfg.sparse_prefill_keep,
            cfg.sparse_prefill_pattern) == (4096, 128, 0.8, "vertical_slash")
    from sglang_mux.attention.sparse_prefill import PATTERNS, SparsePrefillParams

    p = SparsePrefillParams.from_config(cfg)
    assert (p.block, p.keep, p.pattern, p.sink_tokens, p.window_tokens) == (128, 0.8, "vertical_slash", 64, 256)
    assert PATTERNS == ("topk", "vertical_slash")


def test_cold_bits_flags_parse_and_default_exact():
    assert (MuxConfig().cold_bits, MuxConfig().quant_group) == (16, 32)
    cfg, rest = split_mux_args(["--mux-cold-bits", "4", "--mux-quant-group=64", "--port", "1"])
    assert rest == ["--port", "1"]
    assert (cfg.cold_bits, cfg.quant_group) == (4, 64)
    from sglang_mux.config import COLD_BITS
    from sglang_mux.memory.quantized_pages import BITS

    assert COLD_BITS == BITS
    for bits in COLD_BITS:
        assert MuxConfig(cold_bits=bits).cold_bits == bits
    with pytest.raises(MuxConfigError, match="--mux-cold-bits: allowed: 16, 8, 4, 2; got 1"):
        MuxConfig(cold_bits=1)
