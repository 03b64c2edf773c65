"""Seeded generator of malformed generation requests for the three endpoints.

Each request starts from a small valid body (few prompt tokens, at most 4 new tokens) and gets one to
three mutations: a field set to a value of the wrong type, out of range, at a boundary (vocab size,
-1, 0), huge, or a shape that disagrees with the batch. Some mutations happen to stay valid; the tests
use the pure validator as the oracle of which ones must be rejected and with which field.

    python test/fuzz/malformed_requests.py 5     # print 5 generated (endpoint, body) pairs
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path
from typing import Any, Iterator


def _bundled_vocab_size() -> int:
    from sglang_mux.models import default_model_path

    return json.loads((Path(default_model_path()) / "config.json").read_text())["vocab_size"]


VOCAB = _bundled_vocab_size()  # the bundled default model; the tests assert the server reports the same

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# Values that are wrong for most fields; mixed with field-specific boundaries below.
JUNK = [None, True, False, -1, 0, 1, -(2**63), 2**63, 10**12, 0.5, -0.5, 1e308, "", "x", "12", [], [1], {}, {"a": 1},
        [[1, 2]], [None]]
BAD_IDS = [VOCAB, VOCAB + 1, 10**9, -1, -(2**40), 2**63 - 1]


def _ids(rng: random.Random, n: int | None = None) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n or rng.randint(1, 6))]


def _poison(rng: random.Random, ids: Any) -> list:
    ids = list(ids) if isinstance(ids, list) and ids else [1]
    ids[rng.randrange(len(ids))] = rng.choice(BAD_IDS)
    return ids


def _sampling_value(rng: random.Random, key: str) -> Any:
    field_specific = {
        "max_new_tokens": [-1, -100, 10**9, 1.5, "4"],
        "min_new_tokens": [-1, 5, 10**6, "1"],
        "temperature": [-1, -0.001, "hot", 1e400 if False else 1e308 * 10],
        "top_p": [0, -0.1, 1.0001, 2, "1"],
        "top_k": [0, -2, -100, 1.5, "5"],
        "min_p": [-0.1, 1.5, 2],
        "frequency_penalty": [-2.5, 3, 100],
        "presence_penalty": [-3, 2.0001],
        "repetition_penalty": [0, -1, 2.5],
        "n": [0, -1, 129, 1000, 100000, 1.5],
        "stop_token_ids": [[VOCAB], [-1], [10**9], ["a"], [1, VOCAB + 5]],
        "stop": [[1, 2], ["a"] * 40, 5],
        "stream_interval": [0, -1, 1.5],
        "logit_bias": [{str(VOCAB): 1.0}, {"-1": 1.0}, {"abc": 1.0}, {"5": "x"}, [1, 2]],
        "sampling_seed": [2**64, -(2**64), "seed", 1.5],
        "ignore_eos": ["yes", 1, None],
        "regex": [5, ["a"]],
        "custom_params": [
            {"mux_budget": 0}, {"mux_budget": -5}, {"mux_budget": "big"}, {"mux_budget": 2**30},
            {"mux_budget": True}, {"mux_leaves": "sink=64,bogus=rest"}, {"mux_leaves": 7},
            {"mux_leaves": "sink=99999999"}, {"mux_exact": "yes"}, {"mux_exact": 1}, {"mux_typo": 1}, "notadict",
        ],
        "bogus_param": [1],
        "is_normalized": [True],
    }
    # An explicit null max_new_tokens is valid in SGLang and means "until the context is full" (64K tokens
    # here): legitimate but slow, so the generator does not send it.
    pool = field_specific.get(key, []) + [v for v in JUNK if not (key == "max_new_tokens" and v is None)]
    return rng.choice(pool)


SAMPLING_KEYS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "n", "stop_token_ids", "stop", "stream_interval",
                 "logit_bias", "sampling_seed", "ignore_eos", "regex", "custom_params", "custom_params",
                 "custom_params", "bogus_param", "is_normalized"]


def _mutate_generate(rng: random.Random, body: dict) -> None:
    ids = body.get("input_ids")
    batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
    kind = rng.choice(["ids", "ids", "ids", "sampling", "sampling", "sampling", "logprob", "logprob", "shape",
                       "shape", "prompt", "stream"])
    if kind == "ids" and isinstance(ids, list):
        if batch:
            i = rng.randrange(len(body["input_ids"]))
            body["input_ids"][i] = _poison(rng, body["input_ids"][i])
        else:
            body["input_ids"] = _poison(rng, body["input_ids"])
    elif kind in ("sampling", "ids"):
        sp = body.setdefault("sampling_params", {})
        if isinstance(sp, list):
            sp = rng.choice(sp)
        key = rng.choice(SAMPLING_KEYS)
        sp[key] = _sampling_value(rng, key)
    elif kind == "logprob":
        body["return_logprob"] = rng.choice([True, True, "yes", 1])
        choice = rng.randrange(4)
        if choice == 0:
            body["logprob_start_len"] = rng.choice([-2, -5, -(2**31), 10**6, "0", 1.5])
        elif choice == 1:
            body["top_logprobs_num"] = rng.choice([-1, VOCAB + 1, 10**5, 10**9, "3"])
        elif choice == 2:
            body["token_ids_logprob"] = rng.choice([[VOCAB], [-1], [[1], [2]], "x", [1.5]])
        else:
            body["top_logprobs_num"] = rng.choice([[1, 2, 3], [1] * 7])
    elif kind == "shape":
        choice = rng.randrange(5)
        if choice == 0:  # list sampling_params for one prompt, or wrong length for a batch
            body["sampling_params"] = [{"max_new_tokens": 2}] * rng.choice([1, 2, 3])
        elif choice == 1:
            body["rid"] = rng.choice([["a", "b", "c", "d", "e", "f", "g"], 5, ["dup", "dup"]])
        elif choice == 2:
            body["return_logprob"] = [True] * rng.choice([1, 5])
        elif choice == 3:
            body["input_ids"] = rng.choice([[[1, 2], 3], [[]], [[1], []], [], [[VOCAB]]])
            body.pop("text", None)
        else:
            body["text"] = rng.choice(["hi", ["a", 3], [], [["nested"]], "", [""], ["", "a"]])
            body.pop("input_ids", None)
    elif kind == "prompt":
        choice = rng.randrange(3)
        if choice == 0:
            body["text"] = "both"
        elif choice == 1:
            body["input_embeds"] = rng.choice([[[0.1] * 3], [[0.0] * 128, [0.0] * 7], "x"])
        else:
            body.pop("input_ids", None)
            body.pop("text", None)
    else:
        body["stream"] = rng.choice([True, "yes", 1])


def _mutate_openai(rng: random.Random, body: dict, chat: bool) -> None:
    key = rng.choice(["n", "top_k", "stop_token_ids", "custom_params", "logprobs", "top_p", "min_tokens", "seed",
                      "logit_bias", "prompt", "temperature", "stream", "max_tokens", "repetition_penalty"])
    if key == "logprobs":
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = rng.choice([-1, VOCAB + 1, 10**5, 100000])
        else:
            body["logprobs"] = rng.choice([-1, VOCAB + 1, 10**5])
    elif key == "prompt":
        if chat:
            body["messages"] = rng.choice([[], [{"role": "user"}], [{"role": "nobody", "content": "x"}], "hi"])
        else:
            body["prompt"] = rng.choice([_poison(rng, _ids(rng)), [[1, 2], [3, VOCAB]], [], [-1], ""])
    elif key == "stream":
        body["stream"] = True
    elif key == "max_tokens":
        body["max_tokens"] = rng.choice([0, -1, 10**9, "4"])
    else:
        sp_key = {"min_tokens": "min_new_tokens", "seed": "sampling_seed"}.get(key, key)
        body[key] = _sampling_value(rng, sp_key)


def base_body(rng: random.Random, endpoint: str) -> dict:
    if endpoint == GENERATE:
        sp = {"max_new_tokens": rng.randint(1, 4), "temperature": 0}
        if rng.random() < 0.3:
            return {"input_ids": [_ids(rng) for _ in range(rng.randint(2, 3))], "sampling_params": sp}
        if rng.random() < 0.3:
            return {"text": "hello there", "sampling_params": sp}
        return {"input_ids": _ids(rng), "sampling_params": sp}
    if endpoint == COMPLETIONS:
        return {"model": "default", "prompt": _ids(rng) if rng.random() < 0.5 else "hello", "max_tokens": 3,
                "temperature": 0}
    return {"model": "default", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
            "temperature": 0}


def malformed_requests(count: int, seed: int = 1234) -> Iterator[tuple[str, dict]]:
    """``count`` (endpoint, body) pairs; the same seed gives the same sequence."""
    rng = random.Random(seed)
    for _ in range(count):
        endpoint = rng.choices([GENERATE, COMPLETIONS, CHAT], weights=[6, 2, 2])[0]
        body = base_body(rng, endpoint)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if endpoint == GENERATE:
                _mutate_generate(rng, body)
            else:
                _mutate_openai(rng, body, chat=endpoint == CHAT)
        yield endpoint, copy.deepcopy(body)


if __name__ == "__main__":
    for ep, b in malformed_requests(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(ep, json.dumps(b))
