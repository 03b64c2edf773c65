"""Settings and helpers shared by the test modules that start servers (a module of its own: `conftest` names
collide between test folders)."""

import random
import time

import requests

# Test servers run the bundled model in float32 so that greedy outputs can be compared token for token with
# HF transformers (also float32); a 128K-token pool is enough for every test and starts fast.
SERVER_COMMON = [
    "--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "131072", "--log-level", "warning",
]


# prompt words: each one or two tokens of the bundled models' tokenizers
WORDS = "the blue river and green mountain under a quiet morning sky with old stone garden".split()


def word_ids(tokenizer, n: int, seed: int) -> list[int]:
    """``n`` token ids of a text of random ``WORDS`` (the same for a seed)."""
    rng = random.Random(seed)
    ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(n)))["input_ids"][:n]
    assert len(ids) == n
    return ids


def mux_stats(server) -> dict:
    """The ``mux`` section of ``/mux/stats`` of a server (a ``ServerProcess`` or its URL)."""
    r = requests.get(getattr(server, "url", server) + "/mux/stats", timeout=30)
    r.raise_for_status()
    return r.json()["mux"]


def wait_for(pred, timeout: float = 120.0, what: str = "", every: float = 0.05):
    """``pred()``'s first true value, polled every ``every`` seconds; AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def hf_greedy_ignore_eos(model, ids: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation of ``ids`` for exactly ``n`` tokens, as SGLang's ``ignore_eos`` makes
    it: an end token may be chosen and generation goes on. (``generate(min_new_tokens=n)`` is not this oracle: it
    bans the end token, so it differs from the server wherever the model's top choice is that token.)"""
    import torch

    out, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = model(input_ids=step, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out
