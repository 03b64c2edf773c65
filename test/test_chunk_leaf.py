"""The chunk leaf and its chunks (memory/chunks.py, leaves/chunk.py): boundaries on known texts with the real
model's tokenizer (or a character tokenizer when it is not installed), the prefix property that makes chunks the
same on both sides of a radix-tree node split, and the leaf's choice against a brute-force oracle."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from sglang_mux.config import MuxConfig, MuxConfigError
from sglang_mux.leaves import LEAVES, LeafContext, leaf_names
from sglang_mux.leaves.chunk import ChunkLeaf, pick_chunks
from sglang_mux.memory.chunks import (
    chunk_page_spans,
    chunk_starts,
    delimiter_mask,
    delimiter_table,
    is_delimiter_text,
    page_spans_for,
)
from sglang_mux.request_options import parse_request_options
from sglang_mux.router.grant import Grant
from sglang_mux.memory.requests import RequestRegistry


class CharTokenizer:
    """One token per character (ids = code points below 128): boundaries are easy to read off the text."""

    def __len__(self):
        return 128

    def batch_decode(self, ids):
        return [chr(i[0]) for i in ids]

    def encode(self, text):
        return [ord(c) for c in text]


def _starts_text(text: str, max_tokens: int) -> list[str]:
    tok = CharTokenizer()
    d = delimiter_mask(tok.encode(text), delimiter_table(tok))
    s = chunk_starts(d, max_tokens).tolist() + [len(text)]
    return [text[a:b] for a, b in zip(s, s[1:])]


def test_delimiter_texts():
    assert is_delimiter_text(".") and is_delimiter_text(" end.") and is_delimiter_text("?\"") and is_delimiter_text("\n")
    assert is_delimiter_text("!)") and is_delimiter_text("a\nb")
    assert not is_delimiter_text(":") and not is_delimiter_text(";") and not is_delimiter_text(" the")
    assert not is_delimiter_text("3") and not is_delimiter_text("")


def test_boundaries_on_known_texts():
    assert _starts_text("The cat sat. It is 7319.\nBye", 64) == ["The cat sat.", " It is 7319.", "\n", "Bye"]
    # ':' does not end a chunk: the key and its value stay together
    assert _starts_text("The number is: 7319. Next", 64) == ["The number is: 7319.", " Next"]
    # the longest chunk: cut every max_tokens after a start, natural starts reset the count
    assert _starts_text("abcdefghij. xyz", 4) == ["abcd", "efgh", "ij.", " xyz"]
    # worked example of chunk_starts' docstring
    d = torch.zeros(12, dtype=torch.bool)
    d[[3, 9]] = True
    assert chunk_starts(d, 4).tolist() == [0, 4, 8, 10]


def test_boundaries_with_the_real_tokenizer():
    transformers = pytest.importorskip("transformers")
    from sglang_mux.models.smollm2 import check, model_dir

    if check(model_dir()) is not None:
        pytest.skip("the real model is not installed here")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    text = "Filler words go here. One of the special magic numbers for tidy-hat is: 482913.\nMore filler words"
    ids = tok.encode(text)
    d = delimiter_mask(ids, delimiter_table(tok))
    starts = chunk_starts(d, 64).tolist() + [len(ids)]
    chunks = [tok.decode(ids[a:b]) for a, b in zip(starts, starts[1:])]
    assert "".join(chunks) == tok.decode(ids)
    needle = [c for c in chunks if "482913" in c]
    assert needle == [" One of the special magic numbers for tidy-hat is: 482913."] or needle == [
        " One of the special magic numbers for tidy-hat is: 482913.\n"
    ]


def test_prefix_property_node_split_and_straddling_chunks():
    """Chunks of a prefix are the chunks of the whole sequence cut at the prefix: a radix-tree node split at any
    position leaves every request's chunks unchanged, and a chunk straddling two nodes is the same chunk from
    either side."""
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 300)
        d = torch.tensor([rng.random() < 0.08 for _ in range(n)], dtype=torch.bool)
        m = rng.randint(1, 40)
        full = chunk_starts(d, m)
        assert full[0] == 0 and bool((full[1:] > full[:-1]).all())
        gaps = torch.diff(torch.cat([full, torch.tensor([n])]))
        assert int(gaps.max()) <= m  # no chunk longer than max
        for cut in (rng.randint(1, n), n):
            prefix = chunk_starts(d[:cut], m)
            assert prefix.tolist() == full[full < cut].tolist()
        # tokens past the known ones (decoded): cut every max_tokens after the last start
        longer = chunk_starts(d, m, n + 3 * m)
        assert longer[: full.numel()].tolist() == full.tolist()
        assert int(torch.diff(torch.cat([longer, torch.tensor([n + 3 * m])])).max()) <= m


def test_page_spans():
    starts = torch.tensor([0, 5, 20, 33])
    first, last = chunk_page_spans(starts, 40, 16)
    assert first.tolist() == [0, 0, 1, 2] and last.tolist() == [0, 1, 2, 2]
    f2, l2 = page_spans_for(None, 40, 16, 16)  # nothing known: fixed-length chunks
    assert f2.tolist() == [0, 1, 2] and l2.tolist() == [0, 1, 2]


def _oracle_pick(scores, taken, first, last, k):
    """Chunks best first (ties: earlier chunk), each costs its free pages, stop at the first that does not fit."""
    chunks = []
    for c, (a, b) in enumerate(zip(first.tolist(), last.tolist())):
        pages = list(range(a, min(b, len(taken) - 1) + 1))
        if a >= len(taken):
            continue
        free = [p for p in pages if not taken[p]]
        if free:
            chunks.append((-max(float(scores[p]) for p in pages), c, free))
    chunks.sort(key=lambda t: (t[0], t[1]))
    out, used = set(), 0
    for _, _, free in chunks:
        if used + len(free) > k:
            break
        used += len(free)
        out.update(free)
    return sorted(out)


def test_pick_chunks_matches_the_oracle():
    rng = random.Random(1)
    for trial in range(300):
        n = rng.randint(1, 40)
        L = rng.randint((n - 1) * 4 + 1, n * 4)
        d = torch.tensor([rng.random() < 0.2 for _ in range(L)], dtype=torch.bool)
        first, last = page_spans_for(d, L, 4, rng.randint(1, 12))
        scores = torch.tensor([rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(n)])
        taken = torch.tensor([rng.random() < 0.3 for _ in range(n)], dtype=torch.bool)
        k = rng.randint(0, n)
        got = pick_chunks(scores, taken, first, last, k).tolist()
        assert got == _oracle_pick(scores, taken, first, last, k), (trial, got)
        assert len(got) <= k and not any(taken[p] for p in got)


def test_leaf_docstring_example_and_fill():
    # pages 0..7; chunks A=[0,1] B=[2,3] C=[3,5] D=[6,7]; scores . 1 0 9 2 . . . ; window took 5-7
    scores = torch.tensor([0.0, 1.0, 0.0, 9.0, 2.0, 0.0, 0.0, 0.0])
    taken = torch.zeros(8, dtype=torch.bool)
    taken[5:] = True
    first, last = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 3, 5, 7])
    ctx = LeafContext(num_pages=8, taken=taken, page_scores=lambda: scores, chunk_spans=lambda: (first, last))
    assert ChunkLeaf().select(ctx, Grant(False, {"chunk": 3})).tolist() == [2, 3, 4]
    # 2 pages: B fits (2, 3), C's free page 4 does not: nothing left to fill
    assert ChunkLeaf().select(ctx, Grant(False, {"chunk": 2})).tolist() == [2, 3]
    # 1 page: no chunk fits; the best single page
    assert ChunkLeaf().select(ctx, Grant(False, {"chunk": 1})).tolist() == [3]
    # no chunks known: the best pages, like retrieval
    ctx.chunk_spans = None
    assert sorted(ChunkLeaf().select(ctx, Grant(False, {"chunk": 2})).tolist()) == [3, 4]
    assert ChunkLeaf().select(ctx, Grant(False, {"chunk": 0})).numel() == 0


def test_registered_configurable_and_per_request():
    assert "chunk" in LEAVES and leaf_names()[-1] == "chunk"
    cfg = MuxConfig(budget=512, leaves="sink=16,recent=64,chunk=rest")
    assert cfg.leaf_split(512)["chunk"] == 432
    assert MuxConfig().leaf_split(2048)["chunk"] == 0  # not in the default split
    opts = parse_request_options({"mux_budget": 256, "mux_leaves": "sink=16,retrieval=120,chunk=rest"})
    assert opts.effective_config(cfg).leaf_split(256) == {"sink": 16, "recent": 0, "heavy": 0, "retrieval": 120, "chunk": 120}
    with pytest.raises(MuxConfigError, match="--mux-chunk-tokens"):
        MuxConfig(chunk_tokens=0)


def test_admission_records_chunks_and_state_caches_spans():
    reg = RequestRegistry()
    tok = CharTokenizer()
    reg.admit("a", None, tok.encode("Hi there. Bye now.\nok"), tok)
    st = reg.get("a")
    assert st.token_delims is not None and st.token_delims.nonzero().flatten().tolist() == [8, 17, 18]
    first, last = st.chunk_spans(21, 4, 64)
    assert first.tolist() == [0, 2, 4, 4] and last.tolist() == [2, 4, 4, 5]
    assert st.chunk_spans(21, 4, 64) is st.chunk_spans(21, 4, 64)  # one computation per step
    reg.admit("b", None)  # tokens unknown: fixed-length chunks
    assert reg.get("b").token_delims is None
    assert reg.get("b").chunk_spans(40, 16, 16)[0].tolist() == [0, 1, 2]


class CountingTokenizer(CharTokenizer):
    """A CharTokenizer that counts the batched decodes (each one builds its delimiter table)."""

    def __init__(self):
        self.tables_built = 0

    def batch_decode(self, ids):
        self.tables_built += 1
        return super().batch_decode(ids)


def test_admission_builds_no_delimiter_table_until_a_chunk_leaf_reads_the_chunks():
    """Admission keeps the prompt; the delimiter table and the prompt's mask are built at the first routed step
    that runs the chunk leaf, once per tokenizer; a request whose split has no chunk leaf never builds them."""
    from test_routed_decode import HQ, D, make_backend

    from sglang_mux.attention.step_planner import RequestPlan
    from sglang_mux.router.spine import StaticSpineRouter

    L, tok = 300, CountingTokenizer()
    ids = tok.encode(("A short sentence. " * 20)[:L])
    cfg = MuxConfig(budget=64, page_size=8, leaves="sink=8,recent=16,retrieval=rest")
    be, layer, kv, r2t, slots = make_backend(cfg, L)
    reg = be.registry = RequestRegistry()
    reg.admit("plain", None, ids, tok)  # the server's split: no chunk leaf
    reg.admit("chunked", {"mux_leaves": "sink=8,recent=16,chunk=rest"}, ids, tok)
    assert tok.tables_built == 0
    router, q = StaticSpineRouter(cfg), torch.randn(HQ, D, generator=torch.Generator().manual_seed(0))

    def step(rid):
        st = reg.get(rid)
        return be.planner.select(RequestPlan(rid, 1, L, router.grant(L, st.options), st), 0, q, r2t.req_to_token[1])

    assert step("plain").by_leaf.get("chunk", 0) == 0 and tok.tables_built == 0
    assert reg.get("plain").token_delims is not None and tok.tables_built == 1  # built when read
    assert step("chunked").by_leaf["chunk"] > 0 and tok.tables_built == 1  # once per tokenizer
    assert reg.get("chunked").token_delims.nonzero().flatten().tolist()[:2] == [16, 34]


def test_selection_cost_benchmark_small_run(tmp_path):
    """benchmark/selection_cost.py on a small synthetic backend: every arm runs, reads at most its budget's pages
    (pyramid reads more at layer 0, its share of the total), and the JSON is written; bad arms are one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmark" / "selection_cost.py"
    out = subprocess.run([sys.executable, str(script), "--context", "1024", "--layers", "3", "--steps", "1",
                          "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "selection_cost.json").read_text())["results"]
    assert set(res) == {"page", "chunk", "chunk_quest", "chunk_shared", "both", "pyramid", "adaptive"}
    budget_pages = 128 // 16
    for arm, r in res.items():
        assert r["select_ms"] > 0 and r["step_ms"] > 0
        if arm != "pyramid":
            assert r["pages_read_layer0"] <= budget_pages + 1, (arm, r)
    assert res["chunk"]["by_leaf_layer0"]["chunk"] > 0 and res["page"]["by_leaf_layer0"]["chunk"] == 0
    assert res["chunk_shared"]["by_leaf_layer0"]["chunk"] > 0
    assert res["pyramid"]["pages_read_layer0"] > res["page"]["pages_read_layer0"]
    bad = subprocess.run([sys.executable, str(script), "--arms", "pages"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--arms: unknown 'pages'; allowed: page, chunk" in bad.stderr
