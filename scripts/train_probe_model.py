"""Train the bundled probe model: a small Llama whose attention really retrieves.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_probe_model.py --seed 0 \
        [--out python/sglang_mux/models/default] [--steps 3000] [--device cpu]

What it does, deterministically for a seed (on one CPU thread; a GPU only makes it faster):
1. Trains a byte-level BPE tokenizer (digits split one per token, every word of the task vocabulary a
   single token) on text of the synthetic suite (`benchmark/quality`), with bos/eos/pad and a chat template.
2. Trains a `LlamaForCausalLM` (RoPE, GQA, head_dim 64) on the suite's tasks mixed with their filler
   haystacks: next-token loss on every token (the haystack repeats phrases, which teaches copying) plus
   an extra loss on the answer tokens. Curriculum over lengths: a short copy warm-up, then longer contexts.
3. Scores the result with HF greedy decoding on held-out seeds and writes the model, its tokenizer and
   `mux_model_card.json` (command, seed, measured accuracies) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark.quality.tasks import TaskError, make_sample  # noqa: E402
from benchmark.quality.vocab import FILLER_WORDS, KEY_WORDS, VAR_NAMES  # noqa: E402

DEFAULT_OUT = ROOT / "python" / "sglang_mux" / "models" / "default"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Copy warm-up mixture of the first stage: short retrieval tasks only.
WARMUP_MIXTURE = {"niah_single": 0.4, "niah_multikey": 0.4, "vt": 0.2}
# Training mixture (task -> weight). Aggregation tasks are in it at a small weight: the suite reports them.
MIXTURE = {
    "niah_single": 0.18,
    "niah_multikey": 0.2,
    "niah_multivalue": 0.1,
    "niah_multiquery": 0.1,
    "vt": 0.24,
    "kv": 0.1,
    "cwe": 0.04,
    "fwe": 0.04,
}
# Curriculum: (fraction of steps where the stage ends, min length, max length) in tokens (word-count units).
STAGES = ((0.15, 64, 192), (0.45, 128, 1024), (1.0, 256, 2048))
EVAL_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "kv", "cwe", "fwe")
EVAL_SEED = 12345  # held out: training samples use --seed + 1_000_000


def tokenizer_corpus(seed: int, n: int = 400):
    """Word lists (so every filler word, key and variable name becomes one token) and needle / variable-tracking
    prompts (so template words do); ids and coded words stay split into pieces."""
    words = [*FILLER_WORDS, *KEY_WORDS, *VAR_NAMES]
    for w in words:
        yield " ".join([w, w.capitalize()] * 20)
    tasks = ("niah_single", "niah_multivalue", "niah_multiquery", "vt")
    for i in range(n):
        s = make_sample(tasks[i % len(tasks)], None, 400, i, seed)
        yield s.prompt + s.completion


def build_tokenizer(out: Path, seed: int, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # One token per digit; a number's first digit carries its leading space (" 7", "4", "1"), so a value
    # follows the word before it directly (no lone space token between a key and its value).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
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
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def stage_for(step: int, steps: int) -> tuple[int, int]:
    for end, lo, hi in STAGES:
        if step < end * steps:
            return lo, hi
    return STAGES[-1][1:]


def make_batch(tokenizer, rng: random.Random, step: int, steps: int, tokens_per_step: int, seed: int):
    """Token ids, next-token loss mask and answer mask for one step: same-length samples padded on the right."""
    import torch

    lo, hi = stage_for(step, steps)
    mixture = WARMUP_MIXTURE if step < STAGES[0][0] * steps else MIXTURE
    length = rng.randint(lo, hi)
    rows = []
    for b in range(max(1, tokens_per_step // length)):
        while True:
            task = rng.choices(list(mixture), weights=list(mixture.values()))[0]
            try:
                s = make_sample(task, tokenizer, length, step * 64 + b, seed + 1_000_000)
                break
            except TaskError:
                continue
        prompt = tokenizer.encode(s.prompt)
        answer = tokenizer.encode(s.completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    is_answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        valid[i, : len(p) + len(a)] = True
        is_answer[i, len(p) : len(p) + len(a)] = True
    return ids, valid, is_answer


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

    t0, ema, ema_ans = time.time(), None, None
    for step in range(args.steps):
        ids, valid, is_answer = make_batch(tokenizer, rng, step, args.steps, args.tokens_per_step, args.seed)
        ids, valid, is_answer = ids.to(device), valid.to(device), is_answer.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target, mask, amask = ids[:, 1:], valid[:, 1:], is_answer[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view_as(target)
        lm = (nll * mask).sum() / mask.sum()
        ans = (nll * amask).sum() / amask.sum()
        loss = lm + args.answer_weight * ans
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        ema_ans = ans.item() if ema_ans is None else 0.98 * ema_ans + 0.02 * ans.item()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"step {step} len {ids.shape[1]} lm {ema:.3f} answer {ema_ans:.3f} lr {lr_at(step):.2e} {time.time() - t0:.0f}s")
    model.eval()
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--max-positions", type=int, default=65536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-samples", type=int, default=50)
    ap.add_argument("--eval-lengths", default="2048")
    ap.add_argument("--log", type=Path, help="also append progress lines to this file")
    args = ap.parse_args(argv)
    if args.max_positions < 32768:
        ap.error("--max-positions: must be >= 32768 (benchmarks use long prompts)")

    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)

    def log(msg):
        print(msg, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(msg + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = build_tokenizer(args.out, args.seed, args.vocab_size)
    log(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.0f}s)")
    model = build_model(tok, args)
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
        "training_lengths": [list(s) for s in STAGES],
        "mixture": MIXTURE,
        "hf_greedy_accuracy": {"eval_seed": EVAL_SEED, "samples_per_cell": args.eval_samples, "table": table},
    }
    (args.out / "mux_model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
