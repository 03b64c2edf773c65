"""The bundled tiny model (the tests' fast fixture, a 3-layer probe trained to retrieve) is a standard HF Llama +
fast tokenizer with what serving needs; `hf_eval` shows and scores its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from sglang_mux.models import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


def test_bundled_model_is_a_standard_llama(tok):
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from sglang_mux.models import tiny_model_path

    cfg = AutoConfig.from_pretrained(tiny_model_path())
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.head_dim == 64 and cfg.max_position_embeddings >= 32768
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    weights = Path(tiny_model_path()) / "model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    card = json.loads((Path(tiny_model_path()) / "mux_model_card.json").read_text())
    assert "seed" in card and "built_by" in card
    # served with YaRN set for 4x the longest training length, as its card records
    longest = max(stage[-1] for stage in card["training_lengths"])  # [fraction of steps, shortest, longest]
    assert cfg.rope_parameters == card["context_extension"]["rope_parameters"]
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 4.0
    assert cfg.rope_parameters["original_max_position_embeddings"] == longest == 3072


def test_hf_eval_shows_outputs_next_to_answers_and_scores_them(capsys):
    """`hf_eval --show N` prints each of the first N greedy outputs with its answers and recall, and the table's
    score is the mean of those recalls (one sample: the same number)."""
    from benchmark.quality import hf_eval
    from benchmark.quality.scoring import recall
    from sglang_mux.models import tiny_model_path

    hf_eval.main(["--model", str(tiny_model_path()), "--tasks", "niah_multivalue", "--lengths", "512",
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
