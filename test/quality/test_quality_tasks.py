"""The task generator: deterministic per seed, fitted to the length, and every answer recoverable from the prompt
text by an independent solver (a parser of the prompt, not the generator's own bookkeeping)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from benchmark.quality.tasks import TASKS, TaskError, generate_tasks, make_sample, parse_task_list
from benchmark.quality.vocab import FILLER_WORDS, KEY_WORDS, TEMPLATE_WORDS


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from sglang_mux.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _needles(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"The magic number for (\w+) is (\d+)\.", prompt)


def solve(task: str, prompt: str) -> list[str]:
    """Answer a prompt by reading its text only."""
    context, question = prompt.rsplit("\n", 1)
    if task in ("niah_single", "niah_multikey"):
        key = re.match(r"What is the magic number for (\w+)\?", question).group(1)
        return [v for k, v in _needles(context) if k == key]
    if task == "niah_multivalue":
        key = re.match(r"What are all the magic numbers for (\w+)\?", question).group(1)
        return [v for k, v in _needles(context) if k == key]
    if task == "niah_multiquery":
        keys = re.match(r"What are the magic numbers for ([\w ]+)\?", question).group(1).split(" and ")
        found = dict(_needles(context))
        return [found[k] for k in keys]
    if task == "vt":
        value = re.match(r"Which variables are equal to (\d+)\?", question).group(1)
        assign = re.findall(r"VAR (\w+) = (\w+)\.", context)
        chain, frontier = [], value
        while True:
            nxt = [a for a, b in assign if b == frontier]
            if not nxt:
                return chain
            assert len(nxt) == 1
            chain.append(nxt[0])
            frontier = nxt[0]
    if task == "cwe":
        n = int(re.match(r"What are the (\d+) most common", question).group(1))
        words = re.findall(r"\d+\. (\w+)", context)
        counts = Counter(words)
        top = counts.most_common(n)
        assert len(counts) == n or counts.most_common(n + 1)[-1][1] < top[-1][1]  # a unique answer
        return sorted(w for w, _ in top)
    if task == "fwe":
        n = int(re.match(r"What are the (\d+) most frequent", question).group(1))
        words = context.split("\n", 1)[1].split()
        top = Counter(words).most_common(n + 1)
        assert top[n - 1][1] > top[n][1]
        return [w for w, _ in top[:n]]
    if task == "kv":
        key = re.search(r'Key: "([\w-]+)"', question + prompt[-80:]).group(1)
        obj = json.loads(re.search(r"\{.*\}", prompt, re.S).group(0))
        return [obj[key]]
    raise AssertionError(task)


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_recoverable_from_prompt(task, tok):
    for s in generate_tasks(task, tok, 1024, 4, seed=3):
        got = solve(task, s.prompt)
        want = sorted(s.answers) if task == "cwe" else list(s.answers)
        assert got == want, (task, s.index)
        # the perfect completion scores 1 and contains every answer in order
        assert all(a in s.completion for a in s.answers)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [512, 2048])
def test_fitted_to_length(task, length, tok):
    s = make_sample(task, tok, length, 0, 0)
    assert s.n_tokens == len(tok.encode(s.prompt))
    assert s.n_tokens + s.max_new_tokens <= length
    assert s.n_tokens + s.max_new_tokens >= 0.9 * length  # the haystack fills the length


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_tasks(task, tok):
    a = generate_tasks(task, tok, 640, 3, seed=11)
    b = generate_tasks(task, tok, 640, 3, seed=11)
    c = generate_tasks(task, tok, 640, 3, seed=12)
    assert a == b
    assert [x.prompt for x in a] != [x.prompt for x in c]
    assert len({x.prompt for x in a}) == 3  # samples differ from each other


def test_sample_does_not_depend_on_count_or_order(tok):
    many = generate_tasks("niah_multikey", tok, 512, 5, seed=0)
    assert make_sample("niah_multikey", tok, 512, 3, 0) == many[3]


def test_golden_sample_pinned():
    """A fixed sample (word-count fitting, no tokenizer) pinned byte for byte: generation must not drift."""
    s = make_sample("niah_single", None, 128, 0, 0)
    assert (s.answers, s.depth, len(s.prompt)) == (("745032",), 0.5368, 483)
    assert "The magic number for" in s.prompt and s.prompt.endswith(" is")


def test_keys_never_in_filler():
    assert not set(FILLER_WORDS) & set(KEY_WORDS)
    assert not set(FILLER_WORDS) & {w.lower() for w in TEMPLATE_WORDS}


def test_bad_task_names_give_one_line_errors():
    with pytest.raises(TaskError, match=r"--tasks: unknown task 'niah'; allowed: all, needle"):
        parse_task_list("niah")
    assert parse_task_list("needle,vt") == ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"]
    with pytest.raises(TaskError, match="too short"):
        make_sample("fwe", None, 100, 0, 0)
