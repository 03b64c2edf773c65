"""The real default model (SmolLM2-135M-Instruct) served by mux: with a budget that covers the context, greedy
decoding is token for token that of stock SGLang and of HF transformers; chat completions give a real answer.

float32 on every side, so the three compute the same function (the saved bf16 weights upcast exactly)."""

from __future__ import annotations

import pytest
import requests
from mux_test_support import hf_greedy_ignore_eos

pytestmark = pytest.mark.server

MAX_NEW = 16
# --mem-fraction-static: the launcher's CPU default (0.05 of the memory SGLang finds free) does not always leave
# room for the fp32 weights (540 MB) next to other servers; 0.2 does, and --max-total-tokens caps the pool.
COMMON = ["--model-path", "smollm2", "--dtype", "float32", "--max-running-requests", "4",
          "--max-total-tokens", "16384", "--mem-fraction-static", "0.2", "--log-level", "warning"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "The grass is green. The sky is blue. The pass key is 71432. Remember it. The grass is green. " * 6
    + "What is the pass key? The pass key is",
]


@pytest.fixture(scope="module")
def servers():
    from sglang_mux.server_process import ServerProcess

    with ServerProcess(COMMON + ["--mux-budget", "4096"], timeout=600) as mux, \
            ServerProcess(COMMON, stock=True, timeout=600) as stock:
        yield mux, stock


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_mux.models import resolve_model_path

    path = resolve_model_path("smollm2")
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_greedy_equals_stock_and_hf_on_the_real_model(servers, model_and_tokenizer):
    mux, stock = servers
    model, tok = model_and_tokenizer
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        got = mux.greedy_ids(ids, MAX_NEW)
        assert len(got) == MAX_NEW
        assert got == stock.greedy_ids(ids, MAX_NEW), text[:40]
        assert got == hf_greedy_ignore_eos(model, ids, MAX_NEW), text[:40]
    # the pass key is read back from the context (the model really retrieves)
    assert "71432" in tok.decode(mux.greedy_ids(tok(PROMPTS[2])["input_ids"], 8))


def test_chat_completions_answer_through_mux(servers):
    mux, stock = servers
    body = {"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}
    a = requests.post(mux.url + "/v1/chat/completions", json=body, timeout=120).json()
    b = requests.post(stock.url + "/v1/chat/completions", json=body, timeout=120).json()
    answer = a["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    assert answer == b["choices"][0]["message"]["content"]
