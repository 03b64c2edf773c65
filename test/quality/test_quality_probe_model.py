"""The bundled probe model is a standard HF Llama + fast tokenizer with what serving needs, and the training
script's copy-source bookkeeping (used to supervise one attention head) points at the right tokens."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from sglang_mux.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_bundled_model_is_a_standard_llama(tok):
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from sglang_mux.models import default_model_path

    cfg = AutoConfig.from_pretrained(default_model_path())
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.head_dim == 64 and cfg.max_position_embeddings >= 32768
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    weights = Path(default_model_path()) / "model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    card = json.loads((Path(default_model_path()) / "mux_model_card.json").read_text())
    assert "seed" in card and "built_by" in card
    # served with YaRN set for 4x the longest training length (scripts/extend_probe_context.py), as recorded
    longest = max(stage[-1] for stage in card["training_lengths"])  # [fraction of steps, shortest, longest]
    assert cfg.rope_parameters == card["context_extension"]["rope_parameters"]
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 4.0
    assert cfg.rope_parameters["original_max_position_embeddings"] == longest == 3072


def test_copy_pairs_point_at_the_copied_tokens(tok):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample

    T.SEPARATOR_IDS.update(T.separator_token_ids(tok))
    for task in ("niah_multikey", "niah_multivalue", "vt", "kv"):
        s = make_sample(task, tok, 512, 0, 0)
        row = T.sample_row(tok, s)
        prompt = row[0][0]
        flat = prompt + row[1][0]
        pairs = T.copy_pairs(row)
        assert pairs, task
        for t, src in pairs:
            assert t + 1 >= len(prompt) and src < len(prompt)  # from an answer position back into the prompt
            assert flat[t + 1] == flat[src]  # the supervised source holds the token to be written
    seg = T.dense_recall(tok, random.Random(0), 192)
    flat = [x for t, _ in seg for x in t]
    assert all(flat[t + 1] == flat[s] for t, s in T.copy_pairs(seg))


def test_mixture_flag_parses_and_names_what_is_wrong():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_probe_model as T

    assert T.parse_mixture("dense=0.25, niah_multikey=0.5,vt=0") == {"dense": 0.25, "niah_multikey": 0.5, "vt": 0.0}
    for bad, says in [("needle=1", "niah_single"), ("vt", "TASK=WEIGHT"), ("vt=x", "'vt'"), ("vt=-1", ">= 0"),
                      ("vt=nan", ">= 0"), ("vt=0,cwe=0", "at least one")]:
        with pytest.raises(ValueError, match="--mixture") as e:
            T.parse_mixture(bad)
        assert says in str(e.value), (bad, str(e.value))


def test_structure_pairs_point_where_a_causal_key_can_answer(tok):
    """Variable tracking: each answer variable is read at the end of the statement that assigns it (where a
    causal key has seen both names); the statement head looks from a statement's tail back to its name; a
    needle's first digit looks back to the end of the needle before it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample

    digits = set(T.digit_token_ids(tok))
    ids = T.structure_token_ids(tok)
    assert ids["digits"] == digits and ids["var"] == tok.convert_tokens_to_ids("ĠVAR") and ids["is"] == tok.convert_tokens_to_ids("Ġis")
    conv = tok.convert_ids_to_tokens
    s = make_sample("vt", tok, 512, 3, 0)
    row = T.sample_row(tok, s)
    prompt = row[0][0]
    flat = prompt + row[1][0]
    out = T.structure_pairs(row, ids)
    assert len(out["chain"]) == len(s.answers) == 5
    for (query, src), name in zip(out["chain"], s.answers):
        assert query >= len(prompt) - 1 and src < len(prompt)
        assert conv(flat[query + 1]) == "Ġ" + name  # the pair predicts this answer variable ...
        start = max(i for i in range(src) if conv(flat[i]) == "ĠVAR")
        assert conv(flat[start + 1]) == "Ġ" + name and conv(flat[src + 1]) == "."  # ... read at its statement's end
        assert (src, flat[start + 1]) in out["chain_copy"]
    # the first hop is read at the asked value's last digit, the others at the previous variable
    assert conv(flat[out["chain"][0][1]]) == s.prompt.split("equal to ")[1][4]
    assert [conv(flat[src]) for _, src in out["chain"][1:]] == ["Ġ" + n for n in s.answers[:-1]]
    for query, src in out["statement"]:
        assert conv(flat[src - 1]) == "ĠVAR" and 0 < query - src <= 9
    s = make_sample("niah_multivalue", tok, 512, 3, 0)
    row = T.sample_row(tok, s)
    prompt = row[0][0]
    out = T.structure_pairs(row, ids)
    assert [conv(prompt[q]).lstrip("Ġ") for q, _ in out["prev_needle"]] == [v[0] for v in s.answers]
    assert out["prev_needle"][0][1] == 0  # the first needle has none before it: the start token
    for (q, src), prev in zip(out["prev_needle"][1:], s.answers):
        assert conv(prompt[src]) == "." and tok.decode(prompt[src - 6 : src]).strip() == prev
    # each needle but the first is told the last digit of the value before it
    assert [(q, conv(t)) for q, t in out["prev_needle_copy"]] == [(q, v[-1]) for (q, _), v in zip(out["prev_needle"][1:], s.answers)]
    assert not out["statement"] and not out["chain"]  # no statements, no chain in a needle task
    # the second previous-needle head brings the digit before the last one
    assert [(q, conv(t)) for q, t in out["prev_needle_copy_2"]] == [(q, v[-2]) for (q, _), v in zip(out["prev_needle"][1:], s.answers)]
    # with two positions, each needle's second digit looks back too, to the same place, for the same digits
    two = T.structure_pairs(row, ids, prev_positions=2)
    assert two["prev_needle"] == sorted(out["prev_needle"] + [(q + 1, src) for q, src in out["prev_needle"]])
    assert [conv(prompt[q]).lstrip("Ġ") for q, _ in two["prev_needle"]] == [d for v in s.answers for d in v[:2]]
    assert two["prev_needle_copy"] == sorted(out["prev_needle_copy"] + [(q + 1, t) for q, t in out["prev_needle_copy"]])
    assert two["prev_needle_copy_2"] == sorted(out["prev_needle_copy_2"] + [(q + 1, t) for q, t in out["prev_needle_copy_2"]])
    # shifted: at the second digit the second head brings the last digit too (what the answer's first digit sees
    # two tokens back); at the first digit it still brings the digit before the last (what the ',' sees there)
    shifted = T.structure_pairs(row, ids, prev_positions=2, prev_shift=True)
    assert {k: v for k, v in shifted.items() if k != "prev_needle_copy_2"} == {k: v for k, v in two.items() if k != "prev_needle_copy_2"}
    firsts = {q for q, _ in out["prev_needle"]}
    assert [(q, conv(t)) for q, t in shifted["prev_needle_copy_2"]] == [
        (q + j, v[-2] if j == 0 else v[-1]) for (q, _), v in zip(out["prev_needle"][1:], s.answers) for j in (0, 1)]
    assert all((q in firsts) == (t == u) for (q, t), (_, u) in zip(shifted["prev_needle_copy_2"], two["prev_needle_copy_2"]))
    # with the first-needle tag, the first needle's digits (the ones that look at the start token) name that token;
    # nothing else changes
    tagged = T.structure_pairs(row, ids, prev_positions=2, first_tag=True)
    first = [q for q, src in two["prev_needle"] if src == 0]
    assert len(first) == 2 and ids["bos"] == tok.bos_token_id
    for name in ("prev_needle_copy", "prev_needle_copy_2"):
        assert tagged[name] == sorted(two[name] + [(q, tok.bos_token_id) for q in first])
    assert {k: v for k, v in tagged.items() if not k.startswith("prev_needle_copy")} == {k: v for k, v in two.items() if not k.startswith("prev_needle_copy")}


def test_listed_pairs_are_where_a_list_goes_on(tok):
    """The extra pointer supervision of listed answers: exactly the ',' that precede the next value, each
    pointing at that value's first digit in its needle; single-answer tasks have none."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample

    comma = tok.convert_tokens_to_ids(",")
    for task, n_listed in [("niah_multivalue", 3), ("niah_multiquery", 1), ("niah_single", 0), ("vt", 0)]:
        s = make_sample(task, tok, 512, 1, 0)
        row = T.sample_row(tok, s)
        prompt = row[0][0]
        flat = prompt + row[1][0]
        ids = torch.tensor([flat])
        is_answer = torch.zeros_like(ids, dtype=torch.bool)
        is_answer[0, len(prompt):] = True
        listed = T.listed_pairs([(0, t, src) for t, src in T.copy_pairs(row)], ids, is_answer, comma)
        assert len(listed) == n_listed, task
        if n_listed:  # each points at the next listed value, in its needle
            assert [tok.decode(flat[src : src + 6]).strip() for _, _, src in listed] == list(s.answers[1:]), task
        assert all(flat[q] == comma and q >= len(prompt) for _, q, _ in listed)
        if task == "niah_multivalue":  # the same ',' outside an answer (as in a prompt) is not one
            assert listed and not T.listed_pairs(listed, ids, torch.zeros_like(is_answer), comma)


def test_value_start_pairs_are_each_values_first_digit(tok):
    """--value-start-pointer-weight's steps: one per listed value, at the value's first digit in the answer,
    pointing at the needle's second digit (right after the same first digit); none for vt's names."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample

    T.SEPARATOR_IDS.update(T.separator_token_ids(tok))
    first = T.first_digit_token_ids(tok)
    assert sorted(tok.convert_ids_to_tokens(sorted(first))) == [f"Ġ{d}" for d in range(1, 10)]  # numbers never start with 0
    for task in ("niah_multivalue", "niah_multiquery", "niah_single", "vt"):
        s = make_sample(task, tok, 512, 1, 0)
        row = T.sample_row(tok, s)
        flat = row[0][0] + row[1][0]
        x = torch.tensor([flat])
        is_answer = torch.zeros_like(x, dtype=torch.bool)
        is_answer[0, len(row[0][0]):] = True
        got = T.value_start_pairs([(0, t, src) for t, src in T.copy_pairs(row)], x, is_answer, first)
        digits = [a for a in s.answers if a.isdigit()]
        assert len(got) == len(digits), task
        assert [tok.decode(flat[src - 1 : src + 1]).strip() for _, _, src in got] == [a[:2] for a in digits]
        assert all(q >= len(row[0][0]) and flat[q] == flat[src - 1] for _, q, src in got)
        assert not T.value_start_pairs([(0, t, src) for t, src in T.copy_pairs(row)], x, torch.zeros_like(is_answer), first)


def test_in_order_pairs_are_the_list_steps_that_follow_the_text(tok):
    """The list head's steps: every ',' of a multi-value answer, and a multi-query ',' exactly when the next
    asked key's needle is the one right after the needle just answered (checked on the text itself)."""
    import re

    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample

    T.SEPARATOR_IDS.update(T.separator_token_ids(tok))
    ids = T.structure_token_ids(tok)
    comma = tok.convert_tokens_to_ids(",")
    seen = {True: 0, False: 0}
    for task, index in [("niah_multivalue", i) for i in range(4)] + [("niah_multiquery", i) for i in range(40)]:
        s = make_sample(task, tok, 512, index, 0)
        row = T.sample_row(tok, s)
        flat = row[0][0] + row[1][0]
        x = torch.tensor([flat])
        is_answer = torch.zeros_like(x, dtype=torch.bool)
        is_answer[0, len(row[0][0]):] = True
        pairs = [(0, t, src) for t, src in T.copy_pairs(row)]
        listed = T.listed_pairs(pairs, x, is_answer, comma)
        prev = [(0, *p) for p in T.structure_pairs(row, ids)["prev_needle"]]
        got = T.in_order_pairs(listed, pairs, prev)
        order = [v for _, v in re.findall(r"for (\w+) is (\d+)\.", s.prompt)]  # every needle's value, text order
        want = [p for p, (a, b) in zip(listed, zip(s.answers, s.answers[1:])) if order.index(b) == order.index(a) + 1]
        assert got == want, (task, index)
        if task == "niah_multivalue":
            assert got == listed and len(got) == len(s.answers) - 1
        else:
            seen[bool(got)] += 1
    assert seen[True] and seen[False]  # both kinds of multi-query step were drawn
    assert T.in_order_pairs(listed, pairs, []) == []  # without previous-needle tags nothing is in order


def test_list_head_flag_names_the_free_heads(tmp_path):
    """A taken or missing head, or a list head without the previous-needle tags it follows: exit 2 naming the
    flag and what is allowed, nothing written."""
    script = str(ROOT / "scripts/train_probe_model.py")
    prev = ["--prev-needle-weight", "1"]
    for extra, words in [(prev + ["--list-head", "4", "--chain-weight", "2"], ["chain head", "allowed", "[1, 2, 3, 5, 6, 7]"]),
                         (prev + ["--list-head", "8"], ["out of range", "[1, 2, 3, 4, 5, 6, 7]"]),
                         (["--list-head", "1"], ["--prev-needle-weight"])]:
        r = subprocess.run([sys.executable, script, *extra, "--steps", "1", "--out", str(tmp_path / "m")], capture_output=True, text=True)
        assert r.returncode == 2 and "--list-head" in r.stderr and all(w in r.stderr for w in words), r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "m").exists()


def test_many_values_rows_list_every_same_key_needle_in_order(tok):
    """The training-only multi-value variant: 2-8 needles of one key, asked in the suite's wording, answered
    with every value in needle order; each listed value's copy source, list pointer and previous-needle tag
    point where the suite's own multi-value samples do. Off in the default mixture."""
    import re

    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample

    T.SEPARATOR_IDS.update(T.separator_token_ids(tok))
    assert T.MIXTURE["many_values"] == 0 and T.parse_mixture("many_values=1") == {"many_values": 1.0}
    ids = T.structure_token_ids(tok)
    suite_q = make_sample("niah_multivalue", tok, 512, 0, 0).prompt.split("\n")[-1]
    comma = tok.convert_tokens_to_ids(",")
    counts, outside = set(), set()
    rng = random.Random(0)
    for length, others in [(n, o) for n in (256, 1024, 3072) * 10 for o in (False, True)]:
        row = T.many_values_recall(tok, rng, length, others=others)
        haystack, question, answer = (tok.decode(t, skip_special_tokens=True) for t, _ in row)
        assert [flag for _, flag in row] == [False, False, True] and row[2][0][-1] == tok.eos_token_id
        key = re.search(r"numbers for (\w+)\?", question).group(1)
        assert question.strip() == re.sub(r"for \w+([?]| are)", rf"for {key}\1", suite_q)  # the suite's wording
        values = answer.strip().rstrip(".").split(", ")
        counts.add(len(values))
        assert 2 <= len(values) <= 8 and re.findall(rf"for {key} is (\d+)\.", haystack) == values  # needle order
        found = re.findall(r"for (\w+) is (\d+)\.", haystack)
        mine = [i for i, (k, _) in enumerate(found) if k == key]
        assert mine == list(range(mine[0], mine[0] + len(values)))  # consecutive: no other key between them
        if not others:
            assert len(found) == len(values)
        else:  # 0-2 needles of other, distinct keys before the first and after the last
            assert mine[0] <= 2 and len(found) - mine[-1] - 1 <= 2
            assert len({k for k, _ in found}) == len(found) - len(values) + 1
            outside.add((mine[0], len(found) - mine[-1] - 1))
        flat = [x for t, _ in row for x in t]
        assert 0.75 * length <= len(flat) <= 1.02 * length + 8  # sized by estimate (as dense_recall rows), about length
        prompt_len = len(row[0][0]) + len(row[1][0])
        pairs = T.copy_pairs(row)
        assert len(pairs) == 6 * len(values) and all(flat[t + 1] == flat[src] for t, src in pairs)
        x = torch.tensor([flat])
        is_answer = torch.zeros_like(x, dtype=torch.bool)
        is_answer[0, prompt_len:] = True
        listed = T.listed_pairs([(0, t, src) for t, src in pairs], x, is_answer, comma)
        assert [tok.decode(flat[src : src + 6]).strip() for _, q, src in listed if flat[q] == comma] == values[1:]
        tags = T.structure_pairs([(row[0][0] + row[1][0], False), row[2]], ids)["prev_needle_copy"]
        tags = [tok.convert_ids_to_tokens(t) for _, t in tags][mine[0] : mine[-1]]  # tags of the 2nd..last listed
        assert tags == [v[-1] for v in values[:-1]]  # each listed needle is told the value written before it
    assert {2, 8} <= counts and {(0, 0), (2, 2)} <= outside  # the whole range is drawn
    assert "many_values_among_others" in T.TRAINING_ONLY and T.MIXTURE["many_values_among_others"] == 0


def test_shared_first_digit_rows_make_every_first_digit_ambiguous(tok):
    """many_values_shared_first_digit: rows as many_values_among_others (same-key needles listed in order, other
    keys around them), but every listed value starts with the same digit as another listed value, so the digit
    after it is never told by the first digit alone. Off in the default mixture."""
    import re

    sys.path.insert(0, str(ROOT / "scripts"))
    import train_probe_model as T

    assert T.MIXTURE["many_values_shared_first_digit"] == 0
    build = T.TRAINING_ONLY["many_values_shared_first_digit"]
    sizes = set()
    for i, length in enumerate((256, 1024, 3072) * 8):
        row = build(tok, random.Random(i), length)
        haystack, question, answer = (tok.decode(t, skip_special_tokens=True) for t, _ in row)
        key = re.search(r"numbers for (\w+)\?", question).group(1)
        values = answer.strip().rstrip(".").split(", ")
        sizes.add(len(values))
        assert re.findall(rf"for {key} is (\d+)\.", haystack) == values and all(len(v) == 6 and v[0] != "0" for v in values)
        firsts = [v[0] for v in values]
        assert all(firsts.count(f) >= 2 for f in firsts) and len(set(firsts)) <= 2, values
        others = [k for k, _ in re.findall(r"for (\w+) is (\d+)\.", haystack) if k != key]
        assert len(others) <= 4 and key not in others
    assert {2, 8} <= sizes


def test_continued_rows_go_on_after_the_value_the_prompt_gives(tok):
    """many_values_continued: the answer prefix already holds the value of one same-key needle (not the last),
    and the answer lists the values of the same-key needles after it, in text order; the first answer digit is
    copied from the needle right after the given value's. No count of values written gives that needle. Off in
    the default mixture."""
    import re

    sys.path.insert(0, str(ROOT / "scripts"))
    import train_probe_model as T

    T.SEPARATOR_IDS.update(T.separator_token_ids(tok))
    assert T.MIXTURE["many_values_continued"] == 0
    build = T.TRAINING_ONLY["many_values_continued"]
    places = set()
    for i, length in enumerate((256, 1024, 3072) * 8):
        row = build(tok, random.Random(i), length)
        assert [flag for _, flag in row] == [False, False, True]
        haystack, question, answer = (tok.decode(t, skip_special_tokens=True) for t, _ in row)
        key, given = re.search(r"numbers for (\w+) are (\d+),$", question).groups()
        same_key = re.findall(rf"for {key} is (\d+)\.", haystack)
        listed = answer.strip().rstrip(".").split(", ")
        at = same_key.index(given)
        places.add(at)
        assert listed == same_key[at + 1 :] and len(listed) >= 1
        flat = [x for t, _ in row for x in t]
        prompt_len = len(row[0][0]) + len(row[1][0])
        query, src = T.copy_pairs(row)[0]
        assert query == prompt_len - 1 and tok.convert_ids_to_tokens(flat[query]) == ","  # the given value's ','
        assert tok.decode(flat[src : src + 6]).strip() == listed[0] and tok.convert_ids_to_tokens(flat[src - 1]) == "Ġis"
    assert {0, 1, 2} <= places  # the list does not always go on after the first needle


def test_hf_eval_shows_outputs_next_to_answers_and_scores_them(capsys):
    """`hf_eval --show N` prints each of the first N greedy outputs with its answers and recall, and the table's
    score is the mean of those recalls (one sample: the same number)."""
    from benchmark.quality import hf_eval
    from benchmark.quality.scoring import recall
    from sglang_mux.models import default_model_path

    hf_eval.main(["--model", str(default_model_path()), "--tasks", "niah_multivalue", "--lengths", "512",
                  "--samples", "1", "--show", "1"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("niah_multivalue 512 #0:"))
    answers = line.split("answers ")[1].split(" | ")[0].split(", ")
    written = line.split("| output ")[1].strip("'\"")
    assert len(answers) == 4 and all(a.isdigit() and len(a) == 6 for a in answers)
    shown = float(line.split("recall ")[1].split()[0])
    assert shown == round(recall(written, answers), 2)
    table = json.loads(out[out.index("{") : out.index("exact match:")])
    assert table["niah_multivalue"]["512"]["recall"] == pytest.approx(shown, abs=0.005)


def test_pointer_loss_equals_the_full_score_matrix_formula():
    """pointer_loss scores only the supervised query rows; the loss and its gradient must equal those of the
    whole [B, T, T] score matrix (float64 reference, several rows, pairs out of row order)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    import train_probe_model as T
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=32)
    attn = LlamaAttention(cfg, 0).double()
    B, n, head, hd = 3, 40, 5, 8
    h = torch.randn(B, n, 64, dtype=torch.float64)
    cos, sin = (x.double() for x in LlamaRotaryEmbedding(cfg)(h.float(), torch.arange(n)[None].expand(B, -1)))
    rng = random.Random(0)
    pairs = [(rng.randrange(B), t, rng.randrange(t + 1)) for t in (rng.randrange(1, n) for _ in range(30))]

    got = T.pointer_loss(attn, {"h": h, "pe": (cos, sin)}, head, pairs, "cpu")
    (g_got,) = torch.autograd.grad(got, attn.q_proj.weight)

    kvh = head // 2
    q = attn.q_proj(h)[..., head * hd : (head + 1) * hd].view(B, 1, n, hd)
    k = attn.k_proj(h)[..., kvh * hd : (kvh + 1) * hd].view(B, 1, n, hd)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    b, t, src = (torch.tensor([p[j] for p in pairs]) for j in range(3))
    scores = (q[:, 0] @ k[:, 0].transpose(-1, -2))[b, t] * attn.scaling
    scores = scores.masked_fill(torch.arange(n)[None] > t[:, None], float("-inf"))
    want = -torch.log_softmax(scores, -1)[torch.arange(len(pairs)), src].mean()
    (g_want,) = torch.autograd.grad(want, attn.q_proj.weight)
    assert abs(float(got) - float(want)) < 1e-12 and float(want) > 0.1
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12) and g_want.abs().max() > 0


@pytest.mark.parametrize("flag", ["--prev-needle-digits", "--prev-needle-positions"])
def test_previous_needle_shape_flags_need_the_previous_needle_losses(tmp_path, flag):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_probe_model.py"), flag, "2", "--steps", "1",
                        "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 2 and flag in r.stderr and "--prev-needle-weight" in r.stderr
    assert not (tmp_path / "m").exists()
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_probe_model.py"), flag, "3"], capture_output=True, text=True)
    assert r.returncode == 2 and flag in r.stderr and "choose from 1, 2" in r.stderr


def test_previous_needle_shift_needs_two_digits_at_two_positions(tmp_path):
    base = [sys.executable, str(ROOT / "scripts/train_probe_model.py"), "--prev-needle-weight", "1", "--prev-needle-shift",
            "--steps", "1", "--out", str(tmp_path / "m")]
    for extra in ([], ["--prev-needle-digits", "2"], ["--prev-needle-positions", "2"]):
        r = subprocess.run(base + extra, capture_output=True, text=True)
        assert r.returncode == 2 and "--prev-needle-shift" in r.stderr and "--prev-needle-digits 2 and --prev-needle-positions 2" in r.stderr
    assert not (tmp_path / "m").exists()


def test_answer_digit_table_of_the_bundled_probe(tmp_path, tok):
    """scripts/probe_answer_digits.py: one row per digit of a 6-digit value, counted over every value; the bundled
    probe reads single needles at 512 tokens without a miss, so every rate there is 1."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import probe_answer_digits as P
    import torch
    from transformers import LlamaForCausalLM

    from sglang_mux.models import default_model_path

    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32, attn_implementation="eager").eval()
    rows = P.digit_table(model, tok, "niah_single", 512, 3, 12345)
    assert [(r["digit"], r["n"], r["attention"], r["prediction"]) for r in rows] == [(k, 3, 1.0, 1.0) for k in range(6)]
    rows = P.digit_table(model, tok, "niah_multivalue", 512, 2, 12345)
    assert [(r["digit"], r["n"]) for r in rows] == [(k, 8) for k in range(6)]  # 4 values a sample
    assert all(0.0 <= r["attention"] <= 1.0 and 0.0 <= r["prediction"] <= 1.0 for r in rows)
    # the per-value breakdown splits the same digits: pooled, it gives the digit table's rates back
    rows = P.digit_table(model, tok, "niah_multivalue", 1024, 4, 12345)
    split = P.value_table(model, tok, 1024, 4, 12345)
    assert [r["n"] for r in split["by_value"]] == [4] * 4
    assert sum(r["first_digit"] * r["n"] for r in split["by_value"]) == pytest.approx(rows[0]["prediction"] * 16)
    assert sum(r["n"] for r in split["second_digit"]) == 16
    assert sum(r["predicted"] * r["n"] for r in split["second_digit"]) == pytest.approx(rows[1]["prediction"] * 16)
    shared = next((r for r in split["second_digit"] if r["shared"]), {"n": 0, "predicted": 0.0})
    pairs = split["shared_pairs"]  # each shared value once per needle sharing its first digit, never with itself
    assert all(r["needle"] != r["other"] and 0 <= r["needle"] < 4 and 0 <= r["other"] < 4 for r in pairs)
    assert sum(r["n"] for r in pairs) >= shared["n"] and (shared["n"] == 0) == (not pairs)
    for r in split["by_value"]:  # one weight per needle; the first listed value is read from the first needle
        assert len(r["weights"]) == 4 and 0.0 <= sum(r["weights"]) <= 1.0 + 1e-6
    assert split["by_value"][0]["weights"][0] > 0.9
    for r in split["by_value"]:  # in multi-value the k-th value's needle is the k-th needle
        assert r["on_source"] == pytest.approx(r["weights"][r["value"]])
    mq = P.value_table(model, tok, 1024, 4, 12345, task="niah_multiquery")
    assert [r["n"] for r in mq["by_value"]] == [4, 4]  # two values asked a sample
    assert all(0.8 < r["on_source"] <= 1.0 for r in mq["by_value"])  # found by key, wherever the needle is
    other = P.value_table(model, tok, 1024, 4, 12345, task="niah_multiquery", head=3)  # not the needle head
    assert [r["first_digit"] for r in other["by_value"]] == [r["first_digit"] for r in mq["by_value"]]
    assert all(r["on_source"] < 0.5 for r in other["by_value"])
    # --follow: at the ',' the weight before the edit is the by-value table's weight on the source (values 2-4,
    # each edited twice); the bundled probe (trained at up to 3072 tokens) moves towards the needle after the
    # value written in some of the edits
    follow = {r["step"]: r for r in P.follow_table(model, tok, 1024, 4, 12345)}
    assert follow[","]["n"] == 4 * 6
    assert follow[","]["kept_before"] == pytest.approx(sum(r["on_source"] for r in split["by_value"][1:]) / 3)
    assert follow[","]["follow_after"] > follow[","]["follow_before"]
    assert follow["first digit"]["n"] <= 4 * 6
    flat, starts, needles = list(range(40)), [30, 36], [2, 12, 22]
    edited = P.follow_edit(flat, starts, needles, 1, 2)  # value 1 replaced by needle 1's value: next is needle 2
    assert edited[30:36] == flat[12:18] and edited[:30] == flat[:30] and edited[36:] == flat[36:]
    for argv, says in [([], "config.json"), (["--task", "niah_single", "--by-value"], "niah_multiquery"),
                       (["--task", "niah_single", "--follow"], "niah_multivalue"),
                       (["--head", "8"], "allowed: 0-7")]:
        model_dir = tmp_path if not argv else default_model_path()
        r = subprocess.run([sys.executable, str(ROOT / "scripts/probe_answer_digits.py"), "--model", str(model_dir), *argv],
                           capture_output=True, text=True)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr


def test_training_runs_every_supervision_and_is_deterministic(tmp_path):
    """A few steps with every structure loss on (chain, two previous-needle digits at two positions, the listed
    answers' pointer): the run saves a loadable model, the same flags give the same weights, and dropping the
    listed-answer loss changes them (so it takes part in training)."""
    from safetensors.torch import load_file

    base = [sys.executable, str(ROOT / "scripts/train_probe_model.py"), "--seed", "0", "--steps", "3", "--train-length",
            "512", "--tokens-per-step", "1024", "--start-stage", "2", "--chain-weight", "2", "--prev-needle-weight", "1",
            "--prev-needle-copy-weight", "2", "--prev-needle-digits", "2", "--prev-needle-positions", "2",
            "--mixture", "niah_multivalue=0.5,niah_multiquery=0.3,vt=0.2", "--eval-samples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    weights = {}
    for name, extra in [("a", ["--list-pointer-weight", "2"]), ("b", ["--list-pointer-weight", "2"]), ("c", []),
                        ("d", ["--list-pointer-weight", "2", "--list-head", "1"]),
                        ("e", ["--list-pointer-weight", "2", "--value-start-pointer-weight", "4"]),
                        ("f", ["--list-pointer-weight", "2", "--prev-needle-shift"])]:
        r = subprocess.run(base + extra + ["--out", str(tmp_path / name)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
        card = json.loads((tmp_path / name / "mux_model_card.json").read_text())
        assert "--prev-needle-digits 2" in json.dumps(card)
    assert weights["a"].keys() == weights["c"].keys()
    assert all((weights["a"][k] == weights["b"][k]).all() for k in weights["a"])
    assert any(not (weights["a"][k] == weights["c"][k]).all() for k in weights["a"])
    assert any(not (weights["a"][k] == weights["d"][k]).all() for k in weights["a"])  # the list head's losses train
    assert any(not (weights["a"][k] == weights["e"][k]).all() for k in weights["a"])  # and the value-start loss
    assert any(not (weights["a"][k] == weights["f"][k]).all() for k in weights["a"])  # and the shifted tags


def test_inserted_layers_compute_what_the_saved_model_did(tmp_path, tok):
    """--insert-layers grows a saved probe by fresh layers before its last one that add nothing yet: the grown
    model's logits equal the saved model's, greedy decoding through the KV cache writes the same tokens, the last
    layer (needle and chain heads) is the saved last layer, and the grown model saves and loads as a plain Llama."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    import train_probe_model as T
    from transformers import LlamaForCausalLM

    from benchmark.quality.tasks import make_sample
    from sglang_mux.models import default_model_path

    saved = T.load_for_training(default_model_path(), lambda msg: None)
    grown = T.insert_layers(saved, 2, seed=0)
    old = saved.config.num_hidden_layers
    assert grown.config.num_hidden_layers == old + 2 and len(grown.model.layers) == old + 2
    assert [layer.self_attn.layer_idx for layer in grown.model.layers] == list(range(old + 2))
    for name, w in saved.model.layers[-1].state_dict().items():
        assert torch.equal(w, grown.model.layers[-1].state_dict()[name]), name
    for layer in grown.model.layers[old - 1 : old + 1]:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.any()  # the rest is a fresh layer, ready to learn

    sample = make_sample("niah_multivalue", tok, 512, index=0, seed=3)
    ids = torch.tensor([tok.encode(sample.prompt)])
    with torch.no_grad():
        assert torch.equal(saved(input_ids=ids).logits, grown(input_ids=ids).logits)
        out = [m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id) for m in (saved, grown)]
    assert torch.equal(out[0], out[1])

    grown.save_pretrained(tmp_path / "grown")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "grown", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, grown(input_ids=ids).logits)


def test_insert_layers_trains_the_new_layer_and_needs_a_saved_model(tmp_path):
    """Two steps from the bundled probe with --insert-layers 1: the saved model has one layer more and the new
    layer's zero outputs have moved (it takes part in training). Without --init-from, or below 0: exit 2 naming
    the flag, nothing written."""
    from safetensors.torch import load_file

    from sglang_mux.models import default_model_path

    script = str(ROOT / "scripts/train_probe_model.py")
    for extra, words in [(["--insert-layers", "1"], ["--insert-layers", "--init-from", "--layers"]),
                         (["--insert-layers", "-1", "--init-from", str(default_model_path())], ["--insert-layers", ">= 0"])]:
        r = subprocess.run([sys.executable, script, *extra, "--steps", "1", "--out", str(tmp_path / "m")], capture_output=True, text=True)
        assert r.returncode == 2 and all(w in r.stderr for w in words), r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "m").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, "--seed", "0", "--init-from", str(default_model_path()), "--insert-layers", "1",
                        "--start-stage", "2", "--steps", "2", "--warmup", "1", "--lr", "1e-3", "--train-length", "512",
                        "--tokens-per-step", "1024", "--eval-samples", "0", "--out", str(tmp_path / "g")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    old = json.loads((Path(default_model_path()) / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((tmp_path / "g" / "config.json").read_text())["num_hidden_layers"] == old + 1
    w = load_file(str(tmp_path / "g" / "model.safetensors"))
    new = old - 1  # put in before the last layer
    assert w[f"model.layers.{new}.self_attn.o_proj.weight"].abs().sum() > 0
    assert w[f"model.layers.{new}.mlp.down_proj.weight"].abs().sum() > 0
    card = json.loads((tmp_path / "g" / "mux_model_card.json").read_text())
    assert card["hyperparameters"]["insert_layers"] == 1


def test_number_chunk_tokenizer_writes_numbers_in_digit_groups(tmp_path, tok):
    """--number-chunk N: a new tokenizer splits numbers left to right into groups of up to N digits, each one token
    (the first with its leading space), every word of the task vocabulary still one token; the default (1) builds
    the bundled tokenizer's vocabulary exactly. The supervision reads groups as it read digits: a needle value's
    last group is what the previous-needle head brings to the next needle."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_probe_model as T

    from benchmark.quality.tasks import make_sample
    from benchmark.quality.vocab import FILLER_WORDS, KEY_WORDS, VAR_NAMES

    assert T.build_tokenizer(tmp_path / "t1", 0, 2048, 1).get_vocab() == tok.get_vocab()
    t2 = T.build_tokenizer(tmp_path / "t2", 0, 2048, 2)
    words = [*FILLER_WORDS, *KEY_WORDS, *VAR_NAMES]
    assert all(len(t2.encode(" " + w, add_special_tokens=False)) == 1 for w in words)
    pieces = t2.convert_ids_to_tokens(t2.encode(" is 435968, 7012345.", add_special_tokens=False))
    assert pieces == ["Ġis", "Ġ43", "59", "68", ",", "Ġ70", "12", "34", "5", "."]
    for i in range(1, 100):  # every group is one token, with and without the leading space (" 00" cannot start a number)
        assert len(t2.encode(f" {i:02d}", add_special_tokens=False)) == 1 and len(t2.encode(f"{i:02d}", add_special_tokens=False)) == 1
    assert len(t2.encode("00", add_special_tokens=False)) == 1
    assert len(T.digit_token_ids(t2)) == len(T.digit_token_ids(tok)) + T.number_chunk_vocab(2) - 1
    assert T.first_digit_token_ids(t2) >= {t2.convert_tokens_to_ids(f"Ġ{i}") for i in range(10, 100)}

    sample = make_sample("niah_multivalue", t2, 512, index=0, seed=3)
    row = T.sample_row(t2, sample)
    found = T.structure_pairs(row, T.structure_token_ids(t2))
    flat = [t for toks, _ in row for t in toks]
    assert len(found["prev_needle"]) == len(sample.answers)  # one tag per needle's first group
    for (q, src), (q2, last) in zip(found["prev_needle"][1:], found["prev_needle_copy"]):
        assert q == q2 and flat[src] == t2.convert_tokens_to_ids(".") and last == flat[src - 1]
        assert t2.convert_ids_to_tokens(last).isdigit() and len(t2.convert_ids_to_tokens(last)) == 2
    assert t2.decode(t2.encode(" " + sample.completion, add_special_tokens=False)) == " " + sample.completion

    import probe_answer_digits as P  # the diagnostics read a needle's whole value, and its first group's size

    needles, held = P.needle_values(t2, flat, len(row[0][0]), t2.convert_tokens_to_ids("Ġis"), set(T.digit_token_ids(t2)))
    assert held == list(sample.answers) and all(t2.convert_ids_to_tokens(flat[q]).startswith("Ġ") for q in needles)
    assert [P.first_token_digits(t2, flat[q]) for q in needles] == [2] * len(needles)
    assert P.first_token_digits(tok, tok.convert_tokens_to_ids("Ġ4")) == 1


def test_number_chunk_trains_a_model_on_its_tokenizer_and_needs_a_new_one(tmp_path):
    from sglang_mux.models import default_model_path

    script = str(ROOT / "scripts/train_probe_model.py")
    r = subprocess.run([sys.executable, script, "--number-chunk", "2", "--init-from", str(default_model_path()), "--steps", "1",
                        "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 2 and "--number-chunk" in r.stderr and "--init-from" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()
    r = subprocess.run([sys.executable, script, "--number-chunk", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "choose from 1, 2, 3" in r.stderr

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, "--seed", "0", "--number-chunk", "2", "--steps", "2", "--warmup", "1",
                        "--tokens-per-step", "512", "--eval-samples", "0", "--out", str(tmp_path / "g")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["vocab_size"] == len(saved)
    assert saved.convert_ids_to_tokens(saved.encode(" 4359", add_special_tokens=False)) == ["Ġ43", "59"]
