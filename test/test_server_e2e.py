"""The mux server end to end on CPU: same answers as stock SGLang and HF transformers, all endpoints work."""

from __future__ import annotations

import json
import random
import time

import pytest
import requests
from mux_test_support import hf_greedy_ignore_eos

pytestmark = pytest.mark.server

MAX_NEW = 24


def _prompts(tokenizer):
    rng = random.Random(7)
    words = "the blue river and green mountain under a quiet morning sky with old stone garden".split()
    texts = ["hello there", "the passkey is 4815 remember it", " ".join(rng.choice(words) for _ in range(300))]
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def hf_greedy():
    import torch
    from transformers import AutoModelForCausalLM

    from sglang_mux.models import default_model_path

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(default_model_path(), torch_dtype=torch.float32).eval()

    return lambda ids, n: hf_greedy_ignore_eos(model, ids, n)


def test_greedy_matches_stock_and_hf(mux_server, stock_server, tokenizer, hf_greedy):
    for ids in _prompts(tokenizer):
        mux = mux_server.greedy_ids(ids, MAX_NEW)
        stock = stock_server.greedy_ids(ids, MAX_NEW)
        hf = hf_greedy(ids, MAX_NEW)
        assert len(mux) == MAX_NEW
        assert mux == stock, (ids[:8], mux, stock)
        assert mux == hf, (ids[:8], mux, hf)


def test_batch_generate_matches_single(mux_server, tokenizer):
    prompts = _prompts(tokenizer)
    singles = [mux_server.greedy_ids(ids, 8) for ids in prompts]
    r = mux_server.generate(
        {"input_ids": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    )
    r.raise_for_status()
    assert [o["output_ids"] for o in r.json()] == singles


def test_streaming_concatenates_to_the_full_answer(mux_server):
    body = {"text": "the green river", "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}}
    full = mux_server.generate(body).json()
    chunks = []
    with requests.post(mux_server.url + "/generate", json={**body, "stream": True}, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                chunks.append(json.loads(line[5:]))
    assert len(chunks) >= 2
    assert chunks[-1]["output_ids"] == full["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_chat_completions(mux_server, stock_server):
    body = {"model": "default", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0}
    a = requests.post(mux_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    b = requests.post(stock_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert a["object"] == "chat.completion"
    assert a["usage"]["completion_tokens"] >= 1
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_radix_prefix_reuse(mux_server, tokenizer):
    requests.post(mux_server.url + "/flush_cache", timeout=30)
    ids = _prompts(tokenizer)[2]
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    first = mux_server.generate(body).json()
    second = mux_server.generate(body).json()
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= len(ids) - 16
    assert first["output_ids"] == second["output_ids"]


def test_frontend_program_gen_select_run_batch(mux_server, stock_server):
    import sglang as sgl

    @sgl.function
    def pick(s, topic):
        s += "Tell me about " + topic + ". "
        s += sgl.gen("desc", max_tokens=8, temperature=0)
        s += " The colour is " + sgl.select("colour", choices=["red", "blue", "green"])

    def run(url):
        backend = sgl.RuntimeEndpoint(url)
        states = pick.run_batch([{"topic": "the river"}, {"topic": "a stone"}], backend=backend)
        return [(st["desc"], st["colour"]) for st in states]

    got, want = run(mux_server.url), run(stock_server.url)
    assert all(c in ("red", "blue", "green") for _, c in got)
    assert got == want


def test_idle_servers_do_not_spin(mux_server, stock_server):
    """On CPU the launcher adds --sleep-on-idle: an idle server's processes use a small share of one core (SGLang's
    busy-polling scheduler used a whole core each, starving the other servers on a 2-core machine)."""
    import psutil

    def cpu_seconds(procs) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)  # user + system

    for srv in (mux_server, stock_server):
        srv.greedy_ids([1, 2, 3], 2)  # the server has served and is idle again
        time.sleep(1.0)
        root = psutil.Process(srv.proc.pid)
        procs = [root, *root.children(recursive=True)]
        before, t0 = cpu_seconds(procs), time.time()
        time.sleep(4.0)
        share = (cpu_seconds(procs) - before) / (time.time() - t0)
        assert share < 0.3, f"idle server used {share:.0%} of a core"
