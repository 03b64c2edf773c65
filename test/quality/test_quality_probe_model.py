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
