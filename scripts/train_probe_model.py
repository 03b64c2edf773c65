"""Train the bundled probe model: a small Llama whose attention really retrieves.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_probe_model.py --seed 0 \
        [--out python/sglang_mux/models/default] [--steps 3000] [--device cpu]

What it does, deterministically for a seed (on one CPU thread; a GPU only makes it faster):
1. Trains a byte-level BPE tokenizer (digits split one per token, every word of the task vocabulary a
   single token) on text of the synthetic suite (`benchmark/quality`), with bos/eos/pad and a chat template.
2. Trains a `LlamaForCausalLM` (RoPE, GQA, head_dim 64) on the suite's tasks mixed with their filler
   haystacks: next-token loss on every token but the prompt's random digits (the haystack repeats phrases,
   which teaches copying) plus an extra loss on the answer tokens. Curriculum over lengths: a short copy warm-up, then longer contexts.
3. Scores the result with HF greedy decoding on held-out seeds and writes the model, its tokenizer and
   `mux_model_card.json` (command, seed, measured accuracies) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark.quality.tasks import TaskError, make_sample, needle  # noqa: E402
from benchmark.quality.haystack import filler_phrases, insert_at_depths  # noqa: E402
from benchmark.quality.vocab import FILLER_WORDS, KEY_WORDS, VAR_NAMES, number  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from build_default_model import SPECIAL, save_hf_tokenizer  # noqa: E402  (same specials and HF wrapping)

DEFAULT_OUT = ROOT / "python" / "sglang_mux" / "models" / "default"
# Copy warm-up mixture of the first stage: short retrieval tasks only ("dense": see dense_recall).
WARMUP_MIXTURE = {"dense": 0.7, "niah_multikey": 0.15, "vt": 0.15}
# Training mixture (task -> weight). Aggregation tasks are in it at a small weight: the suite reports them.
MIXTURE = {
    "dense": 0.25,
    "niah_single": 0.1,
    "niah_multikey": 0.12,
    "niah_multivalue": 0.08,
    "niah_multiquery": 0.08,
    "vt": 0.22,
    "kv": 0.07,
    "cwe": 0.04,
    "fwe": 0.04,
    "many_values": 0.0,  # training-only, off unless --mixture names it (see many_values_recall)
    "many_values_among_others": 0.0,  # the same with other keys' needles before and after (others=True)
    "many_values_shared_first_digit": 0.0,  # many_values_among_others whose values share first digits (shared=True)
    "many_values_continued": 0.0,  # many_values_among_others whose answer goes on after a given value (continued=True)
}
# Curriculum: (fraction of steps where the stage ends, min length, max length) in tokens, for the default
# training length; --train-length L scales the last two stages to (L/8, L/2) and (L/4, L).
STAGES = ((0.15, 64, 192), (0.45, 128, 512), (1.0, 256, 1024))


def stages(train_length: int) -> tuple:
    return ((0.15, 64, 192), (0.45, 128, train_length // 2), (1.0, train_length // 4, train_length))
EVAL_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "kv", "cwe", "fwe")
EVAL_SEED = 12345  # held out: training samples use --seed + 1_000_000


def tokenizer_corpus(seed: int, n: int = 400, number_chunk: int = 1):
    """Word lists (so every filler word, key and variable name becomes one token) and needle / variable-tracking
    prompts (so template words do); ids and coded words stay split into pieces. With ``number_chunk`` > 1,
    every digit group of 2..number_chunk digits, with and without its leading space (so each is one token)."""
    words = [*FILLER_WORDS, *KEY_WORDS, *VAR_NAMES]
    for w in words:
        yield " ".join([w, w.capitalize()] * 20)
    for k in range(2, number_chunk + 1):
        groups = [f"{i:0{k}d}" for i in range(10**k)]
        for _ in range(4):
            yield " ".join(groups)  # " 07" " 42" ...: a number's first group
            yield "".join(groups)  # "07" "42" ...: the groups after it (split into k digits by the pre-tokenizer)
    tasks = ("niah_single", "niah_multivalue", "niah_multiquery", "vt")
    for i in range(n):
        s = make_sample(tasks[i % len(tasks)], None, 400, i, seed)
        yield s.prompt + s.completion


def number_chunk_vocab(number_chunk: int) -> int:
    """How many tokens digit groups of 2..number_chunk digits add (each with and without a leading space; the
    merges run out one short of this, at " 00", which no number of the suite starts with)."""
    return sum(2 * 10**k for k in range(2, number_chunk + 1))


def build_tokenizer(out: Path, seed: int, vocab_size: int, number_chunk: int = 1):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # One token per digit (or per group of up to ``number_chunk`` digits, left to right, as many LLM tokenizers
    # split numbers); a number's first token carries its leading space (" 7", "4", "1"), so a value follows the
    # word before it directly (no lone space token between a key and its value).
    digits = "[0-9]" if number_chunk == 1 else f"[0-9]{{1,{number_chunk}}}"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(f" ?{digits}"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + number_chunk_vocab(number_chunk),
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed, number_chunk=number_chunk), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return save_hf_tokenizer(tok, out)


def build_model(tokenizer, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=64,
        max_position_embeddings=args.max_positions,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def load_for_training(path: Path, log, keep_rope_scaling: bool = False):
    """A saved probe to train on. By default on plain RoPE: a YaRN extension written by
    scripts/extend_probe_context.py is dropped here (run that script again after the last stage);
    ``keep_rope_scaling`` trains under it instead (and saves it)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(path)
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        if keep_rope_scaling:
            log(f"{path}: training under its RoPE scaling {rope}")
        else:
            log(f"{path}: dropping RoPE scaling {rope} for training (plain RoPE, theta {rope['rope_theta']:g})")
            config.rope_parameters = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    return LlamaForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)


def insert_layers(model, n: int, seed: int):
    """``model`` with ``n`` fresh decoder layers put in before its last one. Each new layer's attention output
    (o_proj) and MLP output (down_proj) start at zero, so it adds nothing to the residual: the grown model
    computes exactly what the saved one did, and training gives the new layers a job without unlearning the old
    ones. Layers 0 and 1 keep their places and the last layer stays last, so every head the auxiliary losses
    supervise (offset heads in layer 0, statement and previous-needle heads in layer 1, needle and chain heads
    in the last layer) is where they look for it."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    old = model.config.num_hidden_layers
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = old + n
    torch.manual_seed(seed)
    grown = LlamaForCausalLM(config).to(torch.float32)
    moved = f"model.layers.{old - 1}."
    state = {k.replace(moved, f"model.layers.{old - 1 + n}.", 1) if k.startswith(moved) else k: v
             for k, v in model.state_dict().items()}
    missing, unexpected = grown.load_state_dict(state, strict=False)
    fresh = tuple(f"model.layers.{old - 1 + j}." for j in range(n))
    assert not unexpected and all(k.startswith(fresh) for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in grown.model.layers[old - 1 : old - 1 + n]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return grown


def untie_and_reset_digits(model, tokenizer, seed: int) -> None:
    """Give the model its own output head (a copy of the tied embeddings) and fresh, distinct input
    embeddings for the digit tokens: under tied embeddings, next-token loss on unpredictable digits pulls
    the ten digit embeddings together until a head that finds a number can no longer tell its digits."""
    import torch

    emb = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
    digits = digit_token_ids(tokenizer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fresh = torch.randn(len(digits), emb.shape[1], generator=g)
        emb[digits] = fresh / fresh.norm(dim=-1, keepdim=True) * emb[digits].norm(dim=-1, keepdim=True).mean()


def set_train_length(train_length: int) -> None:
    global STAGES
    STAGES = stages(train_length)


def parse_mixture(text: str) -> dict[str, float]:
    """``task=weight,...`` (tasks of MIXTURE, weights >= 0, at least one > 0) -> {task: weight}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, weight = part.partition("=")
        if not sep or task not in MIXTURE:
            raise ValueError(f"--mixture: {part!r} is not TASK=WEIGHT with TASK one of {', '.join(MIXTURE)}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--mixture: weight of {task!r} must be a number, got {weight!r}") from None
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"--mixture: weight of {task!r} must be >= 0, got {weight!r}")
        out[task] = w
    if not any(out.values()):
        raise ValueError("--mixture: give at least one task a weight > 0")
    return out


def dense_recall(tokenizer, rng: random.Random, length: int) -> list[tuple[list[int], bool]]:
    """A training-only variant of the needle tasks: 2-8 needles in a filler haystack, then every needle
    asked for in turn (same question and answer wording as the suite), so each sample holds several
    retrievals. Returned as token segments, answer segments flagged."""
    n = rng.randint(2, max(2, min(8, length // 40)))
    keys = rng.sample(KEY_WORDS, n)
    values = [number(rng, 6) for _ in keys]
    n_phrases = max(2, (length - 34 * n) // 6)
    needles = [(rng.uniform(0.0, 1.0), needle(k, v)) for k, v in zip(keys, values)]
    haystack = " ".join(insert_at_depths(filler_phrases(rng, n_phrases), needles))
    segments = [(tokenizer.encode(haystack), False)]
    for i in rng.sample(range(n), n):
        q = f"\nWhat is the magic number for {keys[i]}? The magic number for {keys[i]} is"
        segments.append((tokenizer.encode(q, add_special_tokens=False), False))
        segments.append((tokenizer.encode(f" {values[i]}.", add_special_tokens=False), True))
    segments.append(([tokenizer.eos_token_id], True))
    return segments


def many_values_recall(tokenizer, rng: random.Random, length: int, others: bool = False, shared: bool = False,
                       continued: bool = False) -> list[tuple[list[int], bool]]:
    """A training-only multi-value variant: 2-8 needles with one key, all asked for at once and listed in the
    order of their needles (the suite's niah_multivalue wording). With the suite's four values a model can
    pick the next needle by counting the values it has written (the first and the last needle sharp, the
    middle ones blurred: seen in the needle head of the bundled model); with up to eight, counting blurs
    and it pays to find the needle after the one whose value was just written. Token segments as
    dense_recall's.

    With ``others``, 0-2 needles of other keys come before the first of them and 0-2 after the last:
    without them the first value is always the first needle of the prompt and the last the last, a
    shortcut that teaches "the numbers ... are" to start at the first needle, which multi-query (the
    same question over two keys) then pays for. The listed needles stay consecutive, so each one's
    previous needle is still the one holding the value written before it.

    With ``shared``, every listed value starts with the same digit as at least one other (two first digits,
    each drawn at least twice; one for two or three values): after writing a value's first digit, the digit
    that follows is then never found by that digit alone, only by which needle the list is at. In the suite's
    samples about a third of the values share their first digit, and the digit after it is where most
    multi-value answers of the 1024 recipe go wrong.

    With ``continued``, the list starts after a needle other than the last, whose value the prompt's answer
    prefix already holds (``... are 123456,``), and the answer lists the values of the needles after it. No
    count of the values written says where the list is then; only the value just written does, through the
    previous-needle tags. (Editing the value just written in a teacher-forced multi-value answer of the 1024
    models does not move their needle head at all: they pick by counting.)"""
    fewest = 3 if continued else 2  # continued: so that the given value is not always the first needle's
    n = rng.randint(fewest, max(fewest, min(8, length // 64)))
    key = rng.choice(KEY_WORDS)
    values = [number(rng, 6) for _ in range(n)]
    if shared:
        a, b = rng.sample("123456789", 2)
        firsts = [a] * n if n < 4 else [a] * (n - n // 2) + [b] * (n // 2)
        rng.shuffle(firsts)
        values = [f + v[1:] for f, v in zip(firsts, values)]
    depths = sorted(rng.uniform(0.02, 0.98) for _ in range(n))
    n_phrases = max(2, (length - 24 - 19 * n) // 6)  # a needle is about 12 tokens, a listed value 7
    needles = [(d, needle(key, v)) for d, v in zip(depths, values)]
    if others:
        n_before, n_after = rng.randint(0, 2), rng.randint(0, 2)
        keys = rng.sample([k for k in KEY_WORDS if k != key], n_before + n_after)
        spots = [rng.uniform(0.0, depths[0]) for _ in range(n_before)] + [rng.uniform(depths[-1], 1.0) for _ in range(n_after)]
        needles += [(d, needle(k, number(rng, 6))) for d, k in zip(spots, keys)]
        n_phrases = max(2, n_phrases - 2 * (n_before + n_after))
    haystack = " ".join(insert_at_depths(filler_phrases(rng, n_phrases), needles))
    q = f"\nWhat are all the magic numbers for {key}? The magic numbers for {key} are"
    if continued:
        after = rng.randrange(n - 1)
        q, values = q + f" {values[after]},", values[after + 1 :]
    return [(tokenizer.encode(haystack), False), (tokenizer.encode(q, add_special_tokens=False), False),
            (tokenizer.encode(" " + ", ".join(values) + ".", add_special_tokens=False) + [tokenizer.eos_token_id], True)]


# Mixture entries that are not suite tasks: their samples are built here (row builders of token segments).
TRAINING_ONLY = {"dense": dense_recall, "many_values": many_values_recall,
                 "many_values_among_others": lambda tok, rng, length: many_values_recall(tok, rng, length, others=True),
                 "many_values_shared_first_digit": lambda tok, rng, length: many_values_recall(tok, rng, length, others=True, shared=True),
                 "many_values_continued": lambda tok, rng, length: many_values_recall(tok, rng, length, others=True, continued=True)}


def sample_row(tokenizer, sample) -> list[tuple[list[int], bool]]:
    """A task sample as token segments: its prompt, then its reference completion and eos (the answer)."""
    answer = tokenizer.encode(sample.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [(tokenizer.encode(sample.prompt), False), (answer, True)]


def make_batch(tokenizer, rng: random.Random, stage: int, step: int, tokens_per_step: int, seed: int, prompt_digit_loss: bool = False, chain: bool = False, prev_positions: int = 1, prev_shift: bool = False, first_tag: bool = False):
    """Token ids, next-token loss mask and answer mask for one step: same-length samples padded on the right.

    Digits in the prompt (needle values, ids, list numbers) are random, so next-token loss on them only
    teaches the model that digits are interchangeable; unless `prompt_digit_loss`, they carry no loss."""
    import torch

    lo, hi = STAGES[stage][1:]
    mixture = WARMUP_MIXTURE if stage == 0 else MIXTURE
    length = rng.randint(lo, hi)
    rows = []
    for b in range(max(1, tokens_per_step // length)):
        while True:
            task = rng.choices(list(mixture), weights=list(mixture.values()))[0]
            if task in TRAINING_ONLY:
                rows.append(TRAINING_ONLY[task](tokenizer, rng, length))
                break
            try:
                s = make_sample(task, tokenizer, length, step * 64 + b, seed + 1_000_000)
            except TaskError:
                continue
            rows.append(sample_row(tokenizer, s))
            break
    width = max(sum(len(t) for t, _ in row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    is_answer = torch.zeros((len(rows), width), dtype=torch.bool)
    pairs, struct = [], defaultdict(list)  # struct: structure_pairs' lists, row index in front
    for i, row in enumerate(rows):
        pos = 0
        for toks, answer_flag in row:
            ids[i, pos : pos + len(toks)] = torch.tensor(toks)
            valid[i, pos : pos + len(toks)] = True
            if not answer_flag and not prompt_digit_loss:
                valid[i, pos : pos + len(toks)] = ~torch.isin(torch.tensor(toks), DIGIT_IDS)
            is_answer[i, pos : pos + len(toks)] = answer_flag
            pos += len(toks)
        pairs += [(i, t, src) for t, src in copy_pairs(row, first_occurrence=not chain)]
        if STRUCTURE_IDS:
            for name, found in structure_pairs(row, STRUCTURE_IDS, prev_positions, prev_shift, first_tag).items():
                struct[name] += [(i, *x) for x in found]
    return ids, valid, is_answer, pairs, struct


def copy_pairs(row: list[tuple[list[int], bool]], first_occurrence: bool = True) -> list[tuple[int, int]]:
    """(query position, source position) pairs: the position that predicts an answer token, and the
    earlier position of that token in the context it is copied from.

    An answer run (the tokens between separators such as ',' '.' '"' and a lone space) is looked up as a
    whole in the text before the answer: its j-th token's source is the match start + j. A run not found
    whole (variable names listed with spaces) maps each token to its first occurrence (for a variable, the
    statement that assigns it), unless not `first_occurrence`: a causal key there cannot know which variable
    comes next, so with the chain supervision (`structure_pairs`) those tokens are left to the chain head.
    """
    flat, spans = _flatten(row)
    out = []
    for a, b in spans:
        run_start = a
        for j in range(a, b + 1):
            if j == b or flat[j] in SEPARATOR_IDS:
                run = flat[run_start:j]
                if run:
                    src = _find(flat[:a], run)
                    if src is not None:
                        out += [(run_start + k - 1, src + k) for k in range(len(run))]
                    elif first_occurrence:  # e.g. variable names listed with spaces: each token from its first occurrence
                        for k, tok in enumerate(run):
                            src = _find(flat[:a], [tok])
                            if src is not None:
                                out.append((run_start + k - 1, src))
                run_start = j + 1
    return out


def listed_pairs(pairs: list[tuple[int, int, int]], ids, is_answer, comma_id: int) -> list[tuple[int, int, int]]:
    """The (row, query, source) pairs of ``pairs`` whose query is an answer's ',': where a listed answer
    (multi-value, multi-query) goes on, the needle head picks the needle of the next value."""
    return [p for p in pairs if ids[p[0], p[1]] == comma_id and is_answer[p[0], p[1]]]


def value_start_pairs(pairs: list[tuple[int, int, int]], ids, is_answer, first_digit_ids: set[int]) -> list[tuple[int, int, int]]:
    """The (row, query, source) pairs of ``pairs`` whose query is an answer value's first digit (a digit token
    with its leading space): the step that reads the value's second digit, where the head must stay on the
    needle it picked; when another needle's value starts with the same digit, the digit alone does not say
    which one that is."""
    return [p for p in pairs if int(ids[p[0], p[1]]) in first_digit_ids and is_answer[p[0], p[1]]]


def in_order_pairs(listed: list[tuple[int, int, int]], pairs: list[tuple[int, int, int]], prev_needle: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The list steps of ``listed`` (``listed_pairs``) whose next value's needle is the one right after the
    needle of the value just written: every step of a multi-value answer, and a multi-query step only where
    the two asked needles happen to be neighbours in the text. There the next needle is found by text order
    (the previous-needle heads tag each needle with the last digits of the one before, and the ',' sees the
    digit just written), not by its key, which the other list steps need (``--list-head``).

    ``pairs`` gives each answer token's copy source: the value's last digit, one token before the ',', comes
    from its needle's last digit, right before that needle's period; ``prev_needle`` (``structure_pairs``,
    row in front) gives for each needle's first digit the period of the needle before it."""
    source = {(r, t): s for r, t, s in pairs}
    before = {(r, q): e for r, q, e in prev_needle}
    return [(r, t, s) for r, t, s in listed if (r, t - 2) in source and before.get((r, s)) == source[(r, t - 2)] + 1]


def _find(hay: list[int], needle: list[int]) -> int | None:
    n = len(needle)
    for i in range(len(hay) - n + 1):
        if hay[i : i + n] == needle:
            return i
    return None


# Heads given a job by the structure losses, as (layer, head); layer -1 is the last. Their KV heads differ from
# the needle head's (last layer, head 0) and the offset heads' (layer 0, heads 0 and 2).
STATEMENT_HEAD = (1, 6)  # in "VAR Y = X." from "=", X and "." back to the name Y (a local pattern)
CHAIN_HEAD = (-1, 4)  # vt answers: from the variable just written (or the asked value) to the statement that
#                        assigns it, at that statement's last right-hand token, whose residual carries Y
# The previous-needle heads, with the structure_pairs list each one's copy loss names: the first (multi-value
# order) looks from a needle's first digit to the end of the needle before it and brings its last digit; the
# second (--prev-needle-digits 2) makes the same look and brings the digit before that one.
PREV_NEEDLE_HEADS = (((1, 4), "prev_needle_copy"), ((1, 0), "prev_needle_copy_2"))


def structure_pairs(row: list[tuple[list[int], bool]], ids: dict, prev_positions: int = 1, prev_shift: bool = False,
                    first_tag: bool = False) -> dict[str, list]:
    """Targets of the structure losses for one sample (positions in the flattened row).

    Variable tracking is a chain of lookups "which statement assigns the variable I just wrote": a causal
    key can only say that at the statement's right-hand side (it has seen ``VAR Y =`` and the value), so
    the chain head points there and reads ``Y``, which the statement head moved from the name to the end
    of the statement. ``ids`` names the token ids: var, eq, period, is, digits (a set).

    Multi-value answers are listed in the order of their needles, so after writing one value the needle head
    must find the needle after the one holding it: the previous-needle head looks from each needle's first
    digit to the end of the needle before it (``prev_needle``) and brings its last digit
    (``prev_needle_copy``), which the answer's ',' also sees one token back.

    The second previous-needle head brings the digit before that one (``prev_needle_copy_2``), which the ','
    sees two tokens back. With ``prev_positions`` 2 both heads also tag each needle's second digit, which the
    answer's first digit reads; that step sees the previous value's *last* digit two tokens back, so with
    ``prev_shift`` the second head brings the last digit there too (the query that reads "two back" at the ','
    then matches the same tag slot at both steps). The first needle has no needle before it: the heads look at the
    start token, and with ``first_tag`` their copy losses name it there (``bos``), so "first" is a tag the needle
    head can read at an answer's first value as it reads a digit at the later ones.

    Returns lists of (query, source) pairs for ``statement``, ``chain`` and ``prev_needle``, and
    (position, token) targets ``chain_copy`` and ``prev_needle_copy`` for those heads' value/output paths."""
    flat, spans = _flatten(row)
    prompt_end = len(row[0][0])
    answer_pos = [p for (a, b) in spans for p in range(a, b)]
    out = {"statement": [], "chain": [], "chain_copy": [], "prev_needle": [], "prev_needle_copy": [], "prev_needle_copy_2": []}
    rhs_end = {}  # variable name token -> last right-hand token of the statement that assigns it
    in_statement = set()
    for i in range(prompt_end - 3):
        if flat[i] != ids["var"] or flat[i + 2] != ids["eq"]:
            continue
        e = next((j for j in range(i + 3, min(prompt_end, i + 12)) if flat[j] == ids["period"]), None)
        if e is None or e == i + 3:
            continue
        out["statement"] += [(t, i + 1) for t in range(i + 2, e + 1)]
        out["chain_copy"].append((e - 1, flat[i + 1]))
        rhs_end[flat[i + 1]] = e - 1
        in_statement.update(range(i, e + 1))
    for p in answer_pos:
        if flat[p] in rhs_end:
            out["chain"].append((p - 1, rhs_end[flat[p]]))
    ends = [e for e in range(1, prompt_end) if flat[e] == ids["period"] and flat[e - 1] in ids["digits"] and e not in in_statement]
    for p in range(1, prompt_end):
        if flat[p - 1] == ids["is"] and flat[p] in ids["digits"]:
            before = [e for e in ends if e < p]
            for q in range(p, min(p + prev_positions, prompt_end)):
                if flat[q] not in ids["digits"]:
                    break
                out["prev_needle"].append((q, before[-1] if before else 0))
                if before:  # what the previous needle's value ends with: the digit before its period
                    out["prev_needle_copy"].append((q, flat[before[-1] - 1]))
                    out["prev_needle_copy_2"].append((q, flat[before[-1] - (1 if prev_shift and q > p else 2)]))
                elif first_tag:
                    out["prev_needle_copy"].append((q, ids["bos"]))
                    out["prev_needle_copy_2"].append((q, ids["bos"]))
    return out


def _flatten(row: list[tuple[list[int], bool]]) -> tuple[list[int], list[tuple[int, int]]]:
    """A sample's token segments as one list, and the (start, end) of each answer segment in it."""
    flat: list[int] = []
    spans = []
    for toks, answer_flag in row:
        if answer_flag:
            spans.append((len(flat), len(flat) + len(toks)))
        flat += toks
    return flat, spans


STRUCTURE_IDS: dict = {}  # token ids structure_pairs needs; set once the tokenizer exists
SEPARATOR_IDS: set[int] = set()  # filled once the tokenizer exists: ids of ',', '.', '</s>' and the like
DIGIT_IDS = None  # tensor of digit_token_ids, sorted; set once the tokenizer exists


def separator_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that end an answer run in ``copy_pairs``: ',', '.', quotes, a lone space, newline, eos."""
    return {i for t, i in tokenizer.get_vocab().items() if t in {",", ".", "Ġ,", "Ġ.", '"', 'Ġ"', "Ġ", "Ċ", "</s>"}}


def digit_token_ids(tokenizer) -> list[int]:
    """The number tokens: single digits, or digit groups with ``--number-chunk`` (with or without a leading
    space), in vocabulary order."""
    return [i for t, i in tokenizer.get_vocab().items() if t.removeprefix("Ġ").isdigit()]


def first_digit_token_ids(tokenizer) -> set[int]:
    """The number tokens with a leading space: how a number's first digit (or digit group) is written
    (``value_start_pairs``)."""
    return {i for t, i in tokenizer.get_vocab().items() if t.startswith("Ġ") and t[1:].isdigit()}


def structure_token_ids(tokenizer) -> dict:
    """The token ids ``structure_pairs`` reads: var, eq, period, is, bos, and the digits (a set)."""
    return dict(var=tokenizer.convert_tokens_to_ids("ĠVAR"), eq=tokenizer.convert_tokens_to_ids("Ġ="), bos=tokenizer.bos_token_id,
                period=tokenizer.convert_tokens_to_ids("."), digits=set(digit_token_ids(tokenizer)),
                **{"is": tokenizer.convert_tokens_to_ids("Ġis")})


def pointer_loss(attn, captured: dict, head: int, pairs: list[tuple[int, int, int]], device):
    """Attention supervision of one head: -log of its attention weight from each query position to its
    target position (mean over ``pairs`` of (row, query position, target position)). The model stays a
    plain Llama; this only tells a head where to look while the rest of the circuit learns to use it."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    h, (cos, sin) = captured["h"], captured["pe"]
    B, T = h.shape[:2]
    hd = attn.head_dim
    kvh = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    q = _head_proj(attn.q_proj, h, head, hd).view(B, 1, T, hd)  # this head, every position
    k = _head_proj(attn.k_proj, h, kvh, hd).view(B, 1, T, hd)  # its kv head
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    pairs = sorted(pairs)  # grouped by row: each row's queries are scored against that row's keys only
    t = torch.tensor([p[1] for p in pairs], device=device)
    src = torch.tensor([p[2] for p in pairs], device=device)
    # only the supervised query rows of the score matrix ([P, T], not [B, T, T]): at long contexts the full
    # matrix and its gradient would cost more than the model's own attention
    scores = torch.cat([q[row, 0, t[idx]] @ k[row, 0].T for row, idx in _row_groups(pairs, device)]) * attn.scaling
    causal = torch.arange(scores.shape[1], device=device)[None] > t[:, None]
    logp = torch.log_softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    return -logp[torch.arange(len(pairs), device=device), src].mean()


def _head_proj(proj, h, head: int, hd: int):
    """One head's slice of a q/k/v projection, without computing the other heads."""
    import torch.nn.functional as F

    part = slice(head * hd, (head + 1) * hd)
    return F.linear(h, proj.weight[part], None if proj.bias is None else proj.bias[part])


def _row_groups(pairs: list[tuple], device):
    """(row, index tensor) for each run of equal rows in ``pairs`` (sorted by row)."""
    import torch

    start = 0
    for i in range(1, len(pairs) + 1):
        if i == len(pairs) or pairs[i][0] != pairs[start][0]:
            yield pairs[start][0], torch.arange(start, i, device=device)
            start = i


def copy_loss(attn, model, captured: dict, head: int, ids, keep, at=None, scale=None) -> "torch.Tensor":
    """Teach one head's value/output path to copy: what it writes from a position, read through the final norm
    and the output head, should name that position's own token (cross-entropy over the ``keep`` positions),
    or with ``at`` (a list of (row, position, token)) the given token at each given position. The final norm
    makes this blind to how loud the write is; with ``scale`` (the final norm's 1/RMS of the real residual) the
    write is read at the model's own scale, so it must be loud enough to decide the output.
    Once the head attends to the needle (``pointer_loss``), its output then says which digit it found."""
    import torch
    import torch.nn.functional as F

    h = captured["h"]
    hd = attn.head_dim
    kvh = head // (attn.config.num_attention_heads // attn.config.num_key_value_heads)
    v = _head_proj(attn.v_proj, h, kvh, hd)  # [B, T, hd]
    out = F.linear(v, attn.o_proj.weight[:, head * hd : (head + 1) * hd])  # the head's write to the residual
    if at is not None:
        b, t, target = (torch.tensor([x[j] for x in at], device=ids.device) for j in range(3))
        read = model.model.norm(out[b, t]) if scale is None else model.model.norm.weight * out[b, t] * scale
        return F.cross_entropy(model.lm_head(read).float(), target)
    logits = model.lm_head(model.model.norm(out))[keep]
    return F.cross_entropy(logits.float(), ids[keep])


# Lower-layer helpers for the retrieval head (layer 0): (head, how many tokens back it should look). With them,
# the query " is" of "... magic number for apple is" carries "apple" (1 back) and the needle's first digit
# carries "apple" (2 back), so the last layer's head can match the key and copy the digit.
OFFSET_HEADS = ((0, 1), (2, 2))


def offset_pairs(lengths: list[int], rng: random.Random, per_row: int = 48) -> list[tuple[int, int]]:
    """(row, query position) samples for the offset heads: positions with at least 2 tokens before them."""
    out = []
    for i, n in enumerate(lengths):
        if n > 3:
            out += [(i, t) for t in rng.sample(range(2, n), min(per_row, n - 2))]
    return out


def train(model, tokenizer, args, log):
    import torch
    import torch.nn.functional as F

    device = torch.device(args.device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(args.seed)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    t0, ema, ema_ans, ema_ptr = time.time(), None, None, None
    layers = model.model.layers
    seen = [{} for _ in layers]  # each layer's attention input of this step (hidden states, rotary tables)
    for layer, store in zip(layers, seen):
        layer.self_attn.register_forward_pre_hook(
            lambda mod, a, kw, store=store: store.update(h=kw["hidden_states"], pe=kw["position_embeddings"]), with_kwargs=True)
    final: dict = {}  # the final norm's input of this step
    model.model.norm.register_forward_pre_hook(lambda mod, a: final.update(h=a[0]))
    captured, first_captured = seen[-1], seen[0]
    last_attn, first_attn = layers[-1].self_attn, layers[0].self_attn
    if args.chain_weight > 0 or args.prev_needle_weight > 0 or args.prev_needle_copy_weight > 0 or args.list_head:
        STRUCTURE_IDS.update(structure_token_ids(tokenizer))

    def head_pointer(where, pairs):
        layer, head = where
        return pointer_loss(layers[layer].self_attn, seen[layer], head, pairs, device)

    def head_copy(where, keep=None, at=None, scale=None):
        layer, head = where
        return copy_loss(layers[layer].self_attn, model, seen[layer], head, ids, keep, at=at, scale=scale)

    stage, ema_acc, ema_tok = args.start_stage, 0.0, 0.0
    comma_id = tokenizer.convert_tokens_to_ids(",")
    first_digit_ids = first_digit_token_ids(tokenizer)

    def residual_scale():
        """The final norm's 1/RMS of this step's residual: the scale a head's write is read at to decide the output."""
        return final["h"].detach().pow(2).mean(-1).add(1e-6).rsqrt().mean()
    digit_ids = DIGIT_IDS.to(device)
    for step in range(args.steps):
        # Curriculum: the next stage starts at its share of the steps, and (with --gate-accuracy) only once the
        # model answers the digits of this stage's answers; a stage that has not learned stays short.
        if stage + 1 < len(STAGES) and step >= STAGES[stage][0] * args.steps and ema_acc >= args.gate_accuracy:
            stage += 1
            log(f"step {step}: stage {stage} ({STAGES[stage][1]}-{STAGES[stage][2]} tokens), digit accuracy {ema_acc:.2f}")
        ids, valid, is_answer, pairs, struct = make_batch(tokenizer, rng, stage, step, args.tokens_per_step, args.seed,
                                                          args.prompt_digit_loss, chain=args.chain_weight > 0,
                                                          prev_positions=args.prev_needle_positions, prev_shift=args.prev_needle_shift,
                                                          first_tag=args.prev_needle_first_tag)
        ids, valid, is_answer = ids.to(device), valid.to(device), is_answer.to(device)
        for store in seen:
            store.clear()
        logits = model(input_ids=ids).logits[:, :-1].float()
        target, mask, amask = ids[:, 1:], valid[:, 1:], is_answer[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view_as(target)
        lm = (nll * mask).sum() / mask.sum()
        ans = (nll * amask).sum() / amask.sum()
        loss = lm + args.answer_weight * ans
        listed = listed_pairs(pairs, ids, is_answer, comma_id) if args.list_pointer_weight > 0 or args.list_head else []
        ordered = in_order_pairs(listed, pairs, struct["prev_needle"]) if args.list_head else []
        if ordered:  # these list steps belong to the list head: the needle head is not told where to look there
            moved = set(ordered)
            pairs, listed = [p for p in pairs if p not in moved], [p for p in listed if p not in moved]
        point = pointer_loss(last_attn, captured, 0, pairs, device) if pairs and args.pointer_weight > 0 else None
        if args.offset_weight > 0 and len(model.model.layers) > 1:
            at = offset_pairs((ids != tokenizer.pad_token_id).sum(1).tolist(), rng)
            for head, back in OFFSET_HEADS:
                loss = loss + args.offset_weight * pointer_loss(first_attn, first_captured, head, [(i, t, t - back) for i, t in at], device)
        if args.copy_weight > 0:
            loss = loss + args.copy_weight * copy_loss(last_attn, model, captured, 0, ids, ids != tokenizer.pad_token_id)
        if args.chain_weight > 0 and struct["statement"]:
            scale = residual_scale() if args.chain_copy_read == "residual" else None
            loss = loss + args.chain_weight * head_pointer(STATEMENT_HEAD, struct["statement"])
            loss = loss + args.chain_weight * head_copy(STATEMENT_HEAD, keep=ids != tokenizer.pad_token_id)
            loss = loss + args.chain_weight * head_copy(CHAIN_HEAD, at=struct["chain_copy"], scale=scale)
            if struct["chain"]:
                loss = loss + args.chain_weight * head_pointer(CHAIN_HEAD, struct["chain"])
        for where, copied in PREV_NEEDLE_HEADS[: args.prev_needle_digits]:
            if args.prev_needle_weight > 0 and struct["prev_needle"]:
                loss = loss + args.prev_needle_weight * head_pointer(where, struct["prev_needle"])
            if args.prev_needle_copy_weight > 0 and struct[copied]:
                loss = loss + args.prev_needle_copy_weight * head_copy(where, at=struct[copied])
        if args.value_start_pointer_weight > 0:
            starts = value_start_pairs(pairs, ids, is_answer, first_digit_ids)
            if starts:
                loss = loss + args.value_start_pointer_weight * pointer_loss(last_attn, captured, 0, starts, device)
        if args.list_pointer_weight > 0 and listed:
            loss = loss + args.list_pointer_weight * pointer_loss(last_attn, captured, 0, listed, device)
        if ordered:  # the list head looks at the next needle in text order and writes its first digit, loud enough to decide
            scale = residual_scale()
            list_weight = args.list_pointer_weight or args.pointer_weight
            loss = loss + list_weight * head_pointer((-1, args.list_head), ordered)
            loss = loss + list_weight * head_copy((-1, args.list_head), at=[(r, t, int(ids[r, s])) for r, t, s in ordered], scale=scale)
        if point is not None:
            loss = loss + args.pointer_weight * point
            ema_ptr = point.item() if ema_ptr is None else 0.98 * ema_ptr + 0.02 * point.item()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        ema_ans = ans.item() if ema_ans is None else 0.98 * ema_ans + 0.02 * ans.item()
        with torch.no_grad():
            correct = logits.argmax(-1) == target
            if amask.any():
                ema_tok = 0.95 * ema_tok + 0.05 * correct[amask].float().mean().item()
            digit = amask & torch.isin(target, digit_ids)
            if digit.any():
                ema_acc = 0.95 * ema_acc + 0.05 * correct[digit].float().mean().item()
        if step % 50 == 0 or step == args.steps - 1:
            ptr = f"{ema_ptr:.3f}" if ema_ptr is not None else "-"
            log(f"step {step} len {ids.shape[1]} lm {ema:.3f} answer {ema_ans:.3f} tokens {ema_tok:.2f} digits {ema_acc:.2f} pointer {ptr} lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
    model.eval()
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--train-length", type=int, default=1024, help="longest training context in tokens")
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--pointer-weight", type=float, default=1.0, help="weight of the attention supervision (0: off)")
    ap.add_argument("--copy-weight", type=float, default=0.5, help="weight of the copy supervision of the retrieval head's value/output path (0: off)")
    ap.add_argument("--gate-accuracy", type=float, default=0.0, help="move to the next curriculum stage only when the answer-digit accuracy (EMA) reaches this")
    ap.add_argument("--offset-weight", type=float, default=0.5, help="weight of the supervision of layer 0's 1-back and 2-back heads (0: off)")
    ap.add_argument("--chain-weight", type=float, default=0.0, help="weight of the variable-tracking supervision: statement head (layer 1) and chain head (last layer), see structure_pairs (0: off)")
    ap.add_argument("--chain-copy-read", choices=("residual", "norm"), default="residual", help="how the chain head's copy loss reads its write: at the scale of the real residual (residual), or normalised on its own (norm: blind to how loud it is; the first chain stage of the bundled probe ran so)")
    ap.add_argument("--prev-needle-weight", type=float, default=0.0, help="weight of the supervision of layer 1's previous-needle head, which orders multi-value answers (0: off)")
    ap.add_argument("--prev-needle-copy-weight", type=float, default=0.0, help="weight of the copy supervision of the previous-needle head: what it writes at a needle names the last digit of the needle before (0: off; with --prev-needle-weight the head is also told where to look)")
    ap.add_argument("--prev-needle-digits", type=int, choices=(1, 2), default=1, help="how many of the previous needle's last digits the previous-needle heads bring to each needle (2: a second head, layer 1 head 0, brings the digit before the last, with the same weights)")
    ap.add_argument("--prev-needle-positions", type=int, choices=(1, 2), default=1, help="at how many of a needle's first digits the previous-needle heads look back (2: also at the second digit, which the answer's first digit reads)")
    ap.add_argument("--prev-needle-first-tag", action="store_true", help="at the first needle of a prompt (none before it) the previous-needle heads' copy losses name the start token they look at, so the first needle carries a tag of its own")
    ap.add_argument("--prev-needle-shift", action="store_true", help="with --prev-needle-digits 2 --prev-needle-positions 2: at a needle's second digit the second previous-needle head brings the previous needle's last digit, not the one before it (the answer's first digit sees the previous value's last digit two tokens back, where the ',' sees the digit before the last)")
    ap.add_argument("--list-pointer-weight", type=float, default=0.0, help="extra weight of the needle head's attention supervision where a listed answer goes on (the ',' before the next value of multi-value and multi-query answers), the step that decides which needle comes next (0: off)")
    ap.add_argument("--value-start-pointer-weight", type=float, default=0.0, help="extra weight of the needle head's attention supervision at each answer value's first digit, the step that reads its second digit from the needle just picked (0: off)")
    ap.add_argument("--list-head", type=int, default=0, help="a last-layer head of its own for the list steps that go on in text order (every ',' of a multi-value answer, see in_order_pairs): it is told to look at the next needle and write its first digit, and the needle head (head 0) is no longer told to look there (0: off, the needle head does every list step)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--number-chunk", type=int, choices=(1, 2, 3), default=1, help="digits per number token in a new tokenizer: 1 (one token per digit) or groups of up to 2 or 3 digits, left to right, as many LLM tokenizers split numbers (a 6-digit value is then 3 or 2 tokens); adds that many groups to --vocab-size; without --init-from only")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--max-positions", type=int, default=65536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-samples", type=int, default=25)
    ap.add_argument("--eval-lengths", default="1024")
    ap.add_argument("--init-from", type=Path, help="continue from a probe saved by this script (second stage)")
    ap.add_argument("--keep-rope-scaling", action="store_true", help="with --init-from: train under the model's RoPE scaling (YaRN from scripts/extend_probe_context.py) and save it; default: drop it and train on plain RoPE")
    ap.add_argument("--insert-layers", type=int, default=0, help="with --init-from: put this many fresh decoder layers in before the saved model's last one, each adding nothing at first (its output projections start at zero), so training starts from what the saved model computes with more depth to use (0: off)")
    ap.add_argument("--untie-embeddings", action="store_true", help="with --init-from: own output head, fresh digit embeddings")
    ap.add_argument("--tie-embeddings", action="store_true", help="tie input and output embeddings (off: under tied embeddings the digits collapse)")
    ap.add_argument("--prompt-digit-loss", action="store_true", help="also put next-token loss on the prompt's (random) digits")
    ap.add_argument("--log", type=Path, help="also append progress lines to this file")
    ap.add_argument("--mixture", help="training mixture after the warm-up stage, TASK=WEIGHT,... (default: MIXTURE in this script)")
    ap.add_argument("--start-stage", type=int, default=0, choices=range(len(STAGES)), help="first curriculum stage (2: straight to the longest lengths, for further stages of a trained probe)")
    args = ap.parse_args(argv)
    if args.keep_rope_scaling and not args.init_from:
        ap.error("--keep-rope-scaling: needs --init-from (a new model starts on plain RoPE)")
    if args.insert_layers and not args.init_from:
        ap.error("--insert-layers: needs --init-from (a new model gets its depth from --layers)")
    if args.init_from and args.number_chunk != 1:
        ap.error("--number-chunk: only for a new tokenizer (without --init-from, the saved model's tokenizer is kept)")
    if args.insert_layers < 0:
        ap.error(f"--insert-layers: must be >= 0, got {args.insert_layers}")
    prev_needle_on = args.prev_needle_weight > 0 or args.prev_needle_copy_weight > 0
    if args.prev_needle_first_tag and args.prev_needle_copy_weight <= 0:
        ap.error("--prev-needle-first-tag: needs --prev-needle-copy-weight > 0 (the tag is what that loss names)")
    for flag, value in (("--prev-needle-digits", args.prev_needle_digits), ("--prev-needle-positions", args.prev_needle_positions)):
        if value != 1 and not prev_needle_on:
            ap.error(f"{flag}: needs --prev-needle-weight or --prev-needle-copy-weight > 0 (it shapes their supervision)")
    if args.prev_needle_shift and (args.prev_needle_digits != 2 or args.prev_needle_positions != 2):
        ap.error("--prev-needle-shift: needs --prev-needle-digits 2 and --prev-needle-positions 2 (it changes what the second head brings at a needle's second digit)")
    taken = {0: "the needle head", CHAIN_HEAD[1]: "the chain head (--chain-weight)"} if args.chain_weight > 0 else {0: "the needle head"}
    if args.list_head and (args.list_head in taken or not 0 < args.list_head < args.heads):
        free = [h for h in range(1, args.heads) if h not in taken]
        ap.error(f"--list-head: {args.list_head} is not a free head of the last layer ({taken.get(args.list_head, 'out of range')}); allowed: 0 (off) or one of {free}")
    if args.list_head and not prev_needle_on:
        ap.error("--list-head: needs --prev-needle-weight or --prev-needle-copy-weight > 0 (the list head follows the previous-needle tags)")
    if args.max_positions < 32768:
        ap.error("--max-positions: must be >= 32768 (benchmarks use long prompts)")
    if args.mixture:
        try:
            mixture = parse_mixture(args.mixture)
        except ValueError as e:
            ap.error(str(e))
        MIXTURE.clear()
        MIXTURE.update(mixture)

    import torch

    set_train_length(args.train_length)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)

    def log(msg):
        print(msg, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(msg + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.init_from:  # continue training a saved probe (its tokenizer and weights)
        from transformers import AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(args.init_from)
        tok.save_pretrained(args.out)
    else:
        tok = build_tokenizer(args.out, args.seed, args.vocab_size, args.number_chunk)
    log(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.0f}s)")
    SEPARATOR_IDS.update(separator_token_ids(tok))
    global DIGIT_IDS
    DIGIT_IDS = torch.tensor(sorted(digit_token_ids(tok)))
    model = load_for_training(args.init_from, log, args.keep_rope_scaling) if args.init_from else build_model(tok, args)
    if args.insert_layers:
        model = insert_layers(model, args.insert_layers, args.seed)
        log(f"inserted {args.insert_layers} layer(s) before the last: {model.config.num_hidden_layers} layers")
    if args.untie_embeddings:
        untie_and_reset_digits(model, tok, args.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    train(model, tok, args, log)
    train_s = time.time() - t0
    model.to("cpu")
    model.save_pretrained(args.out, safe_serialization=True)
    model.generation_config.save_pretrained(args.out)
    log(f"saved to {args.out} after {train_s:.0f}s; evaluating")

    from benchmark.quality.hf_eval import evaluate

    lengths = [int(x) for x in args.eval_lengths.split(",")]
    table = evaluate(model, tok, list(EVAL_TASKS), lengths, args.eval_samples, EVAL_SEED)
    log(json.dumps(table))
    card = {
        "kind": "trained-probe",
        "built_by": "scripts/train_probe_model.py",
        "command": "OMP_NUM_THREADS=1 .venv/bin/python scripts/train_probe_model.py " + " ".join(argv or sys.argv[1:]),
        "seed": args.seed,
        "train_seconds": round(train_s),
        "device": args.device,
        "threads": args.threads,
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "log")},
        "init_card": json.loads((args.init_from / "mux_model_card.json").read_text()) if args.init_from else None,
        "training_lengths": [list(s) for s in STAGES],
        "mixture": {"warmup": WARMUP_MIXTURE, "main": MIXTURE},
        "hf_greedy_accuracy": {"eval_seed": EVAL_SEED, "samples_per_cell": args.eval_samples, "table": table},
    }
    (args.out / "mux_model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
