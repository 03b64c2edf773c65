"""RULER / InfiniteBench style synthetic tasks, generated for any tokenizer and target length.

    samples = generate_tasks("niah_single", tokenizer, length=2048, n=100, seed=0)

Contract:
* Deterministic: the same ``(task, length, index, seed)`` and tokenizer give the same sample, byte for byte.
* Fitted: ``n_tokens + max_new_tokens <= length`` (prompt counted as the server counts it, special tokens
  included), with as much haystack as fits.
* Recoverable: every answer can be read back from the prompt text alone (tests check this per task).
* ``completion`` is what a perfect model writes after the prompt; ``answers`` are scored by recall
  (RULER's string_match_all, see :mod:`benchmark.quality.scoring`).

Prompts are plain completion-style text ending in an answer prefix (``... The magic number for apple is``),
so a base model and the bundled probe model can both answer without a chat template.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable

from benchmark.quality.haystack import Tokenizer, count_tokens, filler_phrases, fit_units, insert_at_depths
from benchmark.quality.vocab import KEY_WORDS, VAR_NAMES, hex_id, number, pseudo_words


@dataclass(frozen=True)
class TaskSample:
    task: str
    length: int
    index: int
    seed: int
    prompt: str
    completion: str
    answers: tuple[str, ...]
    max_new_tokens: int
    n_tokens: int
    depth: float | None = None  # relative depth of the (first) queried item, when there is one

    def to_json(self) -> dict:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d


@dataclass(frozen=True)
class _Draft:
    """A sample before fitting: ``build(n)`` is the prompt with ``n`` haystack units."""

    build: Callable[[int], str]
    completion: str
    answers: tuple[str, ...]
    depth: float | None = None
    min_units: int = 0


def _depth(rng: random.Random) -> float:
    return round(rng.uniform(0.05, 0.95), 4)


def _noise_builder(rng: random.Random, needles: list[tuple[float, str]], question: str) -> Callable[[int], str]:
    filler_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        phrases = insert_at_depths(filler_phrases(random.Random(filler_seed), n), needles)
        return " ".join(phrases) + "\n" + question

    return build


def needle(key: str, value: str) -> str:
    """One needle sentence (the training script builds its training-only needles with it too)."""
    return f"The magic number for {key} is {value}."


def niah_single(rng: random.Random) -> _Draft:
    """One needle (a 6-digit number under a key) in a noise haystack."""
    key, value, depth = rng.choice(KEY_WORDS), number(rng, 6), _depth(rng)
    q = f"What is the magic number for {key}? The magic number for {key} is"
    return _Draft(_noise_builder(rng, [(depth, needle(key, value))], q), f" {value}.", (value,), depth)


def niah_multikey(rng: random.Random, n_needles: int = 4) -> _Draft:
    """The queried needle among ``n_needles - 1`` distractor needles with other keys."""
    keys = rng.sample(KEY_WORDS, n_needles)
    values = [number(rng, 6) for _ in keys]
    depths = [_depth(rng) for _ in keys]
    q = f"What is the magic number for {keys[0]}? The magic number for {keys[0]} is"
    needles = [(d, needle(k, v)) for k, v, d in zip(keys, values, depths)]
    return _Draft(_noise_builder(rng, needles, q), f" {values[0]}.", (values[0],), depths[0])


def niah_multivalue(rng: random.Random, n_values: int = 4) -> _Draft:
    """One key with ``n_values`` needles; all values must be recalled (listed in order of appearance)."""
    key = rng.choice(KEY_WORDS)
    depths = sorted(_depth(rng) for _ in range(n_values))
    values = [number(rng, 6) for _ in range(n_values)]
    q = f"What are all the magic numbers for {key}? The magic numbers for {key} are"
    needles = [(d, needle(key, v)) for d, v in zip(depths, values)]
    return _Draft(_noise_builder(rng, needles, q), " " + ", ".join(values) + ".", tuple(values), depths[0])


def niah_multiquery(rng: random.Random, n_needles: int = 4, n_queries: int = 2) -> _Draft:
    """``n_needles`` needles with distinct keys; ``n_queries`` of them are asked for in one question."""
    keys = rng.sample(KEY_WORDS, n_needles)
    values = [number(rng, 6) for _ in keys]
    depths = [_depth(rng) for _ in keys]
    asked = rng.sample(range(n_needles), n_queries)
    names = " and ".join(keys[i] for i in asked)
    q = f"What are the magic numbers for {names}? The magic numbers for {names} are"
    needles = [(d, needle(k, v)) for k, v, d in zip(keys, values, depths)]
    answers = tuple(values[i] for i in asked)
    return _Draft(_noise_builder(rng, needles, q), " " + ", ".join(answers) + ".", answers, depths[asked[0]])


def variable_tracking(rng: random.Random, n_chains: int = 2, n_hops: int = 4) -> _Draft:
    """Chains of assignments ``VAR B = A.``; recall every variable of the chain that starts at the asked value."""
    names = rng.sample(VAR_NAMES, n_chains * (n_hops + 1))
    values: list[str] = []
    while len(values) < n_chains:
        v = number(rng, 5)
        if v not in values:
            values.append(v)
    items: list[tuple[float, str]] = []
    for c in range(n_chains):
        chain = names[c * (n_hops + 1) : (c + 1) * (n_hops + 1)]
        depths = sorted(_depth(rng) for _ in chain)
        items.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
        items += [(d, f"VAR {b} = {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
    target = tuple(names[: n_hops + 1])
    q = f"Which variables are equal to {values[0]}? The variables equal to {values[0]} are"
    first_depth = min(d for d, t in items if t.startswith(f"VAR {target[0]} "))
    return _Draft(_noise_builder(rng, items, q), " " + " ".join(target) + ".", target, first_depth)


def common_words(rng: random.Random, length: int, n_common: int = 10) -> _Draft:
    """A numbered word list where ``n_common`` words repeat often; recall those words (aggregation)."""
    freq = max(3, min(30, length // 400))
    words_seed, order_seed = rng.getrandbits(64), rng.getrandbits(64)
    common = pseudo_words(random.Random(words_seed), n_common)

    def build(n: int) -> str:
        words = pseudo_words(random.Random(words_seed), n_common + n)[n_common:]
        entries = common * freq + words
        random.Random(order_seed).shuffle(entries)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
        return (
            "Below is a numbered list of words. Some of them appear more often than the others.\n"
            f"{body}\nWhat are the {n_common} most common words in the list? The {n_common} most common words are"
        )

    return _Draft(build, " " + ", ".join(common) + ".", tuple(common))


def frequent_words(rng: random.Random, n_answers: int = 3, vocab: int = 60) -> _Draft:
    """Coded words drawn with Zipf(2) frequencies; recall the ``n_answers`` most frequent (aggregation)."""
    words_seed, order_seed = rng.getrandbits(64), rng.getrandbits(64)
    words = pseudo_words(random.Random(words_seed), vocab, syllables=(2, 2))
    weights = [1.0 / (r + 1) ** 2 for r in range(vocab)]
    total = sum(weights)

    def counts(n: int) -> list[int]:
        c = [max(1, round(n * w / total)) for w in weights]
        for r in range(n_answers, -1, -1):  # top n_answers + 1 strictly decreasing: a unique answer
            c[r] = max(c[r], c[r + 1] + 1)
        return c

    def build(n: int) -> str:
        seq = [w for w, k in zip(words, counts(n)) for _ in range(k)]
        random.Random(order_seed).shuffle(seq)
        return (
            "Read the coded text and count how often each coded word appears.\n"
            + " ".join(seq)
            + f"\nWhat are the {n_answers} most frequent coded words? The {n_answers} most frequent coded words are"
        )

    answers = tuple(words[:n_answers])
    return _Draft(build, " " + ", ".join(answers) + ".", answers, min_units=vocab)


def kv_retrieval(rng: random.Random) -> _Draft:
    """InfiniteBench kv_retrieval: a JSON object of id -> id pairs; return the value of one key."""
    key, value, depth = hex_id(rng), hex_id(rng), _depth(rng)
    pairs_seed = rng.getrandbits(64)

    def build(n: int) -> str:
        prng = random.Random(pairs_seed)
        pairs = [(hex_id(prng), hex_id(prng)) for _ in range(n)]
        pairs.insert(round(depth * n), (key, value))
        body = ", ".join(f'"{k}": "{v}"' for k, v in pairs)
        return (
            "Extract the value of the given key from the JSON object below.\n"
            f"{{{body}}}\nKey: \"{key}\"\nThe value of \"{key}\" is"
        )

    return _Draft(build, f' "{value}".', (value,), depth)


# name -> builder; builders taking the target length get it as a keyword.
TASKS: dict[str, Callable[..., _Draft]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": variable_tracking,
    "cwe": common_words,
    "fwe": frequent_words,
    "kv": kv_retrieval,
}
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
AGGREGATION_TASKS = ("cwe", "fwe")
_TAKES_LENGTH = {"cwe"}


class TaskError(ValueError):
    """Unknown task name or an impossible length; the message names the field and the allowed values."""


def parse_task_list(spec: str) -> list[str]:
    """``"all"``, ``"needle"`` or a comma list of task names -> task names (a clear error for unknown ones)."""
    groups = {"all": list(TASKS), "needle": list(NEEDLE_TASKS), "aggregation": list(AGGREGATION_TASKS)}
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in groups:
            out += [t for t in groups[name] if t not in out]
        elif name in TASKS:
            if name not in out:
                out.append(name)
        else:
            raise TaskError(f"--tasks: unknown task {name!r}; allowed: {', '.join([*groups, *TASKS])}")
    if not out:
        raise TaskError(f"--tasks: empty; allowed: {', '.join([*groups, *TASKS])}")
    return out


def make_sample(task: str, tokenizer: Tokenizer | None, length: int, index: int, seed: int) -> TaskSample:
    """One sample; see the module contract. ``tokenizer=None`` counts words (for quick corpus text)."""
    if task not in TASKS:
        raise TaskError(f"task: unknown {task!r}; allowed: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    draft = TASKS[task](rng, length=length) if task in _TAKES_LENGTH else TASKS[task](rng)
    max_new = count_tokens(tokenizer, draft.completion) + 8
    n_units, prompt = fit_units(draft.build, tokenizer, length - max_new, lo=draft.min_units)
    n_tokens = count_tokens(tokenizer, prompt)
    if n_tokens + max_new > length:
        raise TaskError(f"length: {length} is too short for task {task} (needs at least {n_tokens + max_new} tokens)")
    return TaskSample(task, length, index, seed, prompt, draft.completion, draft.answers, max_new, n_tokens, draft.depth)


def generate_tasks(task: str, tokenizer: Tokenizer | None, length: int, n: int, seed: int = 0) -> list[TaskSample]:
    """``n`` samples of ``task`` fitted to ``length`` tokens; sample ``i`` depends only on (task, length, i, seed)."""
    return [make_sample(task, tokenizer, length, i, seed) for i in range(n)]
