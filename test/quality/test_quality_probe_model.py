"""The bundled probe model is a standard HF Llama + fast tokenizer with what serving needs, and the training
script's copy-source bookkeeping (used to supervise one attention head) points at the right tokens."""

from __future__ import annotations

import json
import random
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

    T.SEPARATOR_IDS.update(i for t, i in tok.get_vocab().items() if t in {",", ".", "Ġ,", "Ġ.", '"', 'Ġ"', "Ġ", "Ċ", "</s>"})
    for task in ("niah_multikey", "niah_multivalue", "vt", "kv"):
        s = make_sample(task, tok, 512, 0, 0)
        prompt = tok.encode(s.prompt)
        row = [(prompt, False), (tok.encode(s.completion, add_special_tokens=False) + [tok.eos_token_id], True)]
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
    ids = {"var": tok.convert_tokens_to_ids("ĠVAR"), "eq": tok.convert_tokens_to_ids("Ġ="),
           "period": tok.convert_tokens_to_ids("."), "is": tok.convert_tokens_to_ids("Ġis"), "digits": digits}
    conv = tok.convert_ids_to_tokens
    s = make_sample("vt", tok, 512, 3, 0)
    prompt = tok.encode(s.prompt)
    row = [(prompt, False), (tok.encode(s.completion, add_special_tokens=False) + [tok.eos_token_id], True)]
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
    prompt = tok.encode(s.prompt)
    row = [(prompt, False), (tok.encode(s.completion, add_special_tokens=False) + [tok.eos_token_id], True)]
    out = T.structure_pairs(row, ids)
    assert [conv(prompt[q]).lstrip("Ġ") for q, _ in out["prev_needle"]] == [v[0] for v in s.answers]
    assert out["prev_needle"][0][1] == 0  # the first needle has none before it: the start token
    for (q, src), prev in zip(out["prev_needle"][1:], s.answers):
        assert conv(prompt[src]) == "." and tok.decode(prompt[src - 6 : src]).strip() == prev
    # each needle but the first is told the last digit of the value before it
    assert [(q, conv(t)) for q, t in out["prev_needle_copy"]] == [(q, v[-1]) for (q, _), v in zip(out["prev_needle"][1:], s.answers)]
    assert not out["statement"] and not out["chain"]  # no statements, no chain in a needle task


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
