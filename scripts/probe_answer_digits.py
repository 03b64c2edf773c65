"""Where a probe model's listed answers go wrong: teacher-forced accuracy per digit of each answer value, and
how often the needle head (last layer, head 0) looks hardest at the token it should copy.

    .venv/bin/python scripts/probe_answer_digits.py --model python/sglang_mux/models/default \
        --task niah_multivalue --length 2048 --samples 25

Each sample's prompt is followed by its reference completion (teacher forcing), so every value is read in
the context a perfect model would have written. Digit 0 of a value is where the head picks a needle (for
multi-value: the needle after the one just written), digits 1-5 continue copying from it (with a tokenizer of
``train_probe_model.py --number-chunk N``, "digit" k is a value's k-th token, a group of up to N digits).
``--json`` writes the table as JSON.

``--by-value`` (multi-value, multi-query) breaks digit 0 down by the value's place in the list, with the
needle head's weight on the needle holding that value and on each needle (in prompt order), where it picks
the value, and digit 1 by whether another needle's value starts with the same digit (then digit 0 alone
does not say which needle is being copied), and, where one does, by the two needles' places.

``--follow`` (multi-value) asks whether the head follows the value just written or counts: for each listed value
after the first it replaces, teacher-forced, the value written before it by the value of another needle's
predecessor, so that by text order the list should now go on at that other needle, and reports the head's
weight on the needle the list was at and on the one it should now go to, before and after the edit: at the
',' (where the next needle is picked) and at the value's first digit (where its second digit is read; only
edits whose new needle's value starts with the same digit). A head that follows the text moves; one that
counts the values written does not.

``--head H`` reads another head of the last layer in both tables (the needle head is 0): e.g. the list head
of ``train_probe_model.py --list-head H``, to see whether it looks where the needle head does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark.quality.tasks import TASKS, make_sample  # noqa: E402

NEEDLE_HEAD = 0  # last layer; the head the training's pointer loss supervises


def teacher_forced(model, tokenizer, task: str, length: int, samples: int, seed: int, progress: bool = False,
                   head: int = NEEDLE_HEAD):
    """One forward pass per sample over its prompt and reference completion: yields ``(sample, row, flat,
    pred, attn)`` (the sample, its token segments, the tokens fed, the argmax prediction after each one, the
    attention matrix of ``head`` in the last layer), for the tables below to count from."""
    import torch
    from tqdm import tqdm

    import train_probe_model as T

    for i in tqdm(range(samples), desc="answer digits", disable=not progress):
        s = make_sample(task, tokenizer, length, i, seed)
        row = T.sample_row(tokenizer, s)
        flat = row[0][0] + row[1][0]
        with torch.no_grad():
            out = model(torch.tensor([flat]), output_attentions=True)
        yield s, row, flat, out.logits[0].argmax(-1), out.attentions[-1][0][head]


class DigitCounts:
    """Rows ``{digit, n, attention, prediction}``: for the k-th digit of every answer value, how often the needle
    head's strongest attention is on the source token and how often the model predicts the digit."""

    def __init__(self, tokenizer):
        import train_probe_model as T

        self.T, self.tokenizer = T, tokenizer
        T.SEPARATOR_IDS.update(T.separator_token_ids(tokenizer))
        self.n, self.attended, self.predicted = {}, {}, {}

    def add(self, sample, row, flat, pred, attn) -> None:
        k = 0
        for q, src in self.T.copy_pairs(row):
            k = 0 if self.tokenizer.convert_ids_to_tokens(flat[q]).lstrip("Ġ").isalpha() or flat[q] in self.T.SEPARATOR_IDS else k + 1
            self.n[k] = self.n.get(k, 0) + 1
            self.attended[k] = self.attended.get(k, 0) + int(int(attn[q].argmax()) == src)
            self.predicted[k] = self.predicted.get(k, 0) + int(int(pred[q]) == flat[q + 1])

    def table(self) -> list[dict]:
        return [{"digit": k, "n": n, "attention": self.attended[k] / n, "prediction": self.predicted[k] / n}
                for k, n in sorted(self.n.items())]


LISTED_TASKS = ("niah_multivalue", "niah_multiquery")


def needle_values(tokenizer, flat: list[int], prompt_end: int, is_id: int, digits: set[int]) -> tuple[list[int], list[str]]:
    """The needles of a prompt: the position of each value's first digit (the digit after ``is``), in prompt
    order, and the value each one holds (its run of number tokens: 6 digits, or fewer digit groups with a
    ``--number-chunk`` tokenizer)."""
    needles = [p for p in range(1, prompt_end) if flat[p - 1] == is_id and flat[p] in digits]
    ends = [next((e for e in range(q, prompt_end) if flat[e] not in digits), prompt_end) for q in needles]
    return needles, [tokenizer.decode(flat[q:e]).strip() for q, e in zip(needles, ends)]


def first_token_digits(tokenizer, token_id: int) -> int:
    """How many digits a value's first token holds: 1, or a digit group's size (``--number-chunk``); two values
    whose first tokens are the same share that many leading digits."""
    return len(tokenizer.convert_ids_to_tokens(token_id).removeprefix("Ġ"))


class ValueCounts:
    """A listed-answer task: ``by_value`` rows ``{value, n, first_digit, on_source, weights}`` (how often the
    k-th listed value's first digit is predicted, and the needle head's mean weight, at the position that
    predicts it, on the first digit of the needle holding the value and of each needle in prompt order) and
    ``second_digit`` rows ``{shared, n, predicted}`` (digit 1 split by whether another needle's value in the
    prompt starts with the same digit), and ``shared_pairs`` rows ``{needle, other, n, predicted}`` (digit 1 of
    the values whose first digit another needle's value shares, by the place of the value's needle and of each
    needle sharing it, in prompt order)."""

    def __init__(self, tokenizer):
        import train_probe_model as T

        self.tokenizer = tokenizer
        self.is_id, self.digits = tokenizer.convert_tokens_to_ids("Ġis"), set(T.digit_token_ids(tokenizer))
        self.first, self.weights, self.on_source, self.second, self.pairs = {}, {}, {}, {}, {}

    def add(self, sample, row, flat, pred, attn) -> None:
        tok, values, prompt_end = self.tokenizer, list(sample.answers), len(row[0][0])
        needles, held = needle_values(tok, flat, prompt_end, self.is_id, self.digits)
        k = -1
        for p in range(prompt_end, len(flat)):
            token = tok.convert_ids_to_tokens(flat[p])
            if not token.lstrip("Ġ").isdigit():
                continue
            k += token.startswith("Ġ")  # a value's first digit keeps its leading space
            j = next(d for d in range(6) if tok.convert_ids_to_tokens(flat[p - d]).startswith("Ġ"))  # place in the value
            hit = int(int(pred[p - 1]) == flat[p])
            if j == 0:
                n, ok = self.first.get(k, (0, 0))
                self.first[k] = (n + 1, ok + hit)
                w = self.weights.setdefault(k, [0.0] * len(needles))
                for m, q in enumerate(needles):
                    w[m] += float(attn[p - 1, q])
                source = needles[held.index(values[k])]
                self.on_source[k] = self.on_source.get(k, 0.0) + float(attn[p - 1, source])
            elif j == 1:
                lead = first_token_digits(tok, flat[p - 1])
                sharing = [m for m, v in enumerate(held) if v[:lead] == values[k][:lead] and v != values[k]]
                n, ok = self.second.get(bool(sharing), (0, 0))
                self.second[bool(sharing)] = (n + 1, ok + hit)
                own = held.index(values[k])
                for m in sharing:
                    n, ok = self.pairs.get((own, m), (0, 0))
                    self.pairs[(own, m)] = (n + 1, ok + hit)

    def table(self) -> dict:
        return {"by_value": [{"value": k, "n": n, "first_digit": ok / n, "on_source": self.on_source[k] / n,
                              "weights": [w / n for w in self.weights[k]]}
                             for k, (n, ok) in sorted(self.first.items())],
                "second_digit": [{"shared": sh, "n": n, "predicted": ok / n} for sh, (n, ok) in sorted(self.second.items())],
                "shared_pairs": [{"needle": a, "other": b, "n": n, "predicted": ok / n}
                                 for (a, b), (n, ok) in sorted(self.pairs.items())]}


def count(counters: list, model, tokenizer, task: str, length: int, samples: int, seed: int, progress: bool = False,
          head: int = NEEDLE_HEAD) -> None:
    """Feed every sample's forward pass to each counter (one pass, however many tables)."""
    for forced in teacher_forced(model, tokenizer, task, length, samples, seed, progress, head):
        for c in counters:
            c.add(*forced)


def digit_table(model, tokenizer, task: str, length: int, samples: int, seed: int, progress: bool = False,
                head: int = NEEDLE_HEAD) -> list[dict]:
    """The DigitCounts table of ``samples`` samples."""
    c = DigitCounts(tokenizer)
    count([c], model, tokenizer, task, length, samples, seed, progress, head)
    return c.table()


def value_table(model, tokenizer, length: int, samples: int, seed: int, progress: bool = False,
                task: str = "niah_multivalue", head: int = NEEDLE_HEAD) -> dict:
    """The ValueCounts table of ``samples`` samples of ``task``."""
    c = ValueCounts(tokenizer)
    count([c], model, tokenizer, task, length, samples, seed, progress, head)
    return c.table()


def follow_edit(flat: list[int], starts: list[int], needles: list[int], k: int, c: int) -> list[int]:
    """``flat`` with the listed value before the k-th one (answer value k - 1, starting at ``starts[k - 1]``)
    replaced by the value of needle c - 1 (the needle before needle c; ``needles`` are first-digit positions)."""
    edited = list(flat)
    edited[starts[k - 1] : starts[k - 1] + 6] = flat[needles[c - 1] : needles[c - 1] + 6]
    return edited


def follow_table(model, tokenizer, length: int, samples: int, seed: int, progress: bool = False,
                 head: int = NEEDLE_HEAD) -> list[dict]:
    """Multi-value, teacher-forced: rows ``{step, n, kept_before, kept_after, follow_before, follow_after,
    wins_before, wins_after}`` for the steps ``,`` and ``first digit`` (see ``--follow`` above): the head's mean
    weight on the needle the list was at (``kept``) and on the needle after the edited value (``follow``),
    before and after the edit, and how often ``follow`` outweighs ``kept``."""
    import torch
    from tqdm import tqdm

    import train_probe_model as T

    is_id, digits = tokenizer.convert_tokens_to_ids("Ġis"), set(T.digit_token_ids(tokenizer))
    names = ("kept_before", "kept_after", "follow_before", "follow_after", "wins_before", "wins_after")
    sums = {step: dict.fromkeys(("n",) + names, 0.0) for step in (",", "first digit")}

    def weights(flat):
        with torch.no_grad():
            return model(torch.tensor([flat]), output_attentions=True).attentions[-1][0][head]

    for i in tqdm(range(samples), desc="follow", disable=not progress):
        s = make_sample("niah_multivalue", tokenizer, length, i, seed)
        row = T.sample_row(tokenizer, s)
        flat, prompt_end = row[0][0] + row[1][0], len(row[0][0])
        needles, held = needle_values(tokenizer, flat, prompt_end, is_id, digits)
        starts = [p for p in range(prompt_end, len(flat)) if flat[p] in digits
                  and tokenizer.convert_ids_to_tokens(flat[p]).startswith("Ġ")]
        if held != list(s.answers) or len(starts) != len(needles):
            continue  # the k-th value is the k-th needle's (the suite's multi-value); anything else is skipped
        before = weights(flat)
        for k in range(1, len(needles)):
            lead = first_token_digits(tokenizer, flat[starts[k]])  # the k-th value's first token, shared or not
            for c in range(1, len(needles)):
                if c == k:
                    continue
                edited = follow_edit(flat, starts, needles, k, c)
                after = None
                for step, q, off in ((",", starts[k] - 1, 0), ("first digit", starts[k], 1)):
                    if step == "first digit" and held[c][:lead] != held[k][:lead]:
                        continue
                    after = weights(edited) if after is None else after
                    acc = sums[step]
                    acc["n"] += 1
                    for when, w in (("before", before), ("after", after)):
                        kept, follow = float(w[q, needles[k] + off]), float(w[q, needles[c] + off])
                        acc[f"kept_{when}"] += kept
                        acc[f"follow_{when}"] += follow
                        acc[f"wins_{when}"] += follow > kept
    return [{"step": step, "n": int(acc["n"]), **{name: acc[name] / max(acc["n"], 1) for name in names}}
            for step, acc in sums.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "python/sglang_mux/models/default", help="a probe model folder (HF format)")
    ap.add_argument("--task", default="niah_multivalue", choices=[t for t in TASKS if t.startswith("niah_")])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--seed", type=int, default=12345, help="task seed (12345: the held-out evaluation samples)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--by-value", action="store_true", help="niah_multivalue / niah_multiquery: also break digits 0 and 1 down (see above)")
    ap.add_argument("--follow", action="store_true", help="niah_multivalue: also edit the value written before each listed value and see whether the head follows (see above)")
    ap.add_argument("--head", type=int, default=NEEDLE_HEAD, help="the last layer's head whose attention the tables read (0: the needle head)")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        ap.error(f"--model: {args.model} has no config.json (expected a probe model folder)")
    if args.by_value and args.task not in LISTED_TASKS:
        ap.error(f"--by-value: only with --task {' or '.join(LISTED_TASKS)}, got --task {args.task}")
    if args.follow and args.task != "niah_multivalue":
        ap.error(f"--follow: only with --task niah_multivalue, got --task {args.task}")
    if args.samples < 1 or args.length < 128:
        ap.error("--samples must be >= 1 and --length >= 128")

    heads = json.loads((args.model / "config.json").read_text()).get("num_attention_heads", 0)
    if not 0 <= args.head < heads:
        ap.error(f"--head: {args.head} is not a head of this model; allowed: 0-{heads - 1}")

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    counters = [DigitCounts(tokenizer)] + ([ValueCounts(tokenizer)] if args.by_value else [])
    count(counters, model, tokenizer, args.task, args.length, args.samples, args.seed, progress=True, head=args.head)
    rows = counters[0].table()
    name = "needle head" if args.head == NEEDLE_HEAD else f"head {args.head}"
    print(f"{args.task} at {args.length} tokens, {args.samples} samples, teacher-forced:")
    print(f"| digit | n | {name} on the source | digit predicted |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['digit']} | {r['n']} | {r['attention']:.3f} | {r['prediction']:.3f} |")
    result = {"task": args.task, "length": args.length, "samples": args.samples, "head": args.head, "rows": rows}
    if args.by_value:
        result.update(counters[1].table())
        print(f"\nfirst digit of each listed value, and {'the ' * (args.head == NEEDLE_HEAD)}{name}'s mean weight there on its needle and on each needle (prompt order):")
        print("| value | n | first digit predicted | on its needle | on each needle |\n|---:|---:|---:|---:|---|")
        for r in result["by_value"]:
            print(f"| {r['value']} | {r['n']} | {r['first_digit']:.3f} | {r['on_source']:.2f} | {' '.join(f'{w:.2f}' for w in r['weights'])} |")
        print("\nsecond digit, by whether another needle's value starts with the same digit:")
        print("| shared first digit | n | predicted |\n|---|---:|---:|")
        for r in result["second_digit"]:
            print(f"| {'yes' if r['shared'] else 'no'} | {r['n']} | {r['predicted']:.3f} |")
        print("\nsecond digit after a shared first digit, by the value's needle and the needle sharing it (prompt order, from 0):")
        print("| needle | other | n | predicted |\n|---:|---:|---:|---:|")
        for r in result["shared_pairs"]:
            print(f"| {r['needle']} | {r['other']} | {r['n']} | {r['predicted']:.3f} |")
    if args.follow:
        result["follow"] = follow_table(model, tokenizer, args.length, args.samples, args.seed, progress=True, head=args.head)
        print(f"\nthe value before each listed value replaced by another needle's predecessor's: {name}'s mean weight on the"
              " needle the list was at (kept) and on the one after the new value (follow), before -> after the edit:")
        print("| step | n | kept | follow | follow outweighs kept |\n|---|---:|---:|---:|---:|")
        for r in result["follow"]:
            print(f"| {r['step']} | {r['n']} | {r['kept_before']:.2f} -> {r['kept_after']:.2f} | "
                  f"{r['follow_before']:.2f} -> {r['follow_after']:.2f} | {r['wins_before']:.2f} -> {r['wins_after']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
