"""Build a tiny model without any download: a locally trained tokenizer + a small seeded-random Llama.

    .venv/bin/python scripts/build_default_model.py --out /tmp/tiny [--seed 0]

Deterministic for a seed. The tokenizer (byte-level BPE, digits split one by one so numbers in
synthetic long-context tasks tokenize uniformly) is trained on a corpus generated here. The weights
are a seeded random init. The bundled tiny model (`python/sglang_mux/models/tiny/`, the tests' fixture) was
built from this tokenizer and then trained to retrieve; its training script is in the project's git history.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "build" / "tiny-random"

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A small English vocabulary for the tokenizer corpus (and the filler of synthetic tasks).
WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or which his her has had "
    "not but what all were when we there can more if no out so said up its about into than them only "
    "other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three small city house blue green river "
    "mountain music water light stone garden window paper market story number letter answer question key "
    "value passkey magic special remember hidden find word list common frequent variable assign equal "
    "sky tree bird road cloud field forest ocean summer winter morning evening table chair door book "
    "apple orange red yellow white black dog cat horse fish cold warm quiet loud fast slow open close"
).split()


def corpus(seed: int, n_lines: int = 20000):
    rng = random.Random(seed)
    punct = [".", ",", "?", "!", ":", ";", "-", "'", '"', "(", ")"]
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.12:
                parts.append(str(rng.randint(0, 10**rng.randint(1, 7))))
            elif r < 0.2:
                parts.append(rng.choice(WORDS).capitalize())
            else:
                parts.append(rng.choice(WORDS))
            if rng.random() < 0.1:
                parts[-1] += rng.choice(punct)
        yield " ".join(parts)


def build_tokenizer(out: Path, seed: int, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return save_hf_tokenizer(tok, out)


def save_hf_tokenizer(tok, out: Path):
    """Wrap a trained ``tokenizers.Tokenizer`` as the project's HF tokenizer (specials, chat template, 64K) and save it."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 65536
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer, seed: int, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Larger init than HF's default so that a random model's greedy output is not one repeated token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-positions", type=int, default=65536)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.out, args.seed, args.vocab_size)
    build_model(args.out, tok, args.seed, args)
    (args.out / "mux_model_card.json").write_text(
        json.dumps({"kind": "random-init", "seed": args.seed, "built_by": "scripts/build_default_model.py"}, indent=2)
        + "\n"
    )
    print(f"default model written to {args.out}")


if __name__ == "__main__":
    main()
