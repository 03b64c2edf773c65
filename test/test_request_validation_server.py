"""No request can take the server down: malformed requests against a real server, mux on and off.

Every request below either gets HTTP 4xx naming the field (our validation, or SGLang's own checks) or a
clean per-request error; after each one a fixed greedy request still returns the tokens it returned when
the server started, and no server process exited. Three server modes (one server at a time):

* ``mux``           - ``python -m sglang_mux.launch_server`` (mux memory on), all validation layers;
* ``mux-disable``   - the same with ``--mux-disable`` (stock SGLang memory; the plugin still validates);
* ``scheduler-only``- mux on, ``SGLANG_MUX_VALIDATION_LAYERS=scheduler``: the HTTP and tokenizer layers
  are off, so the crash classes reach the scheduler and its guard alone must hold.

Stock SGLang 0.5.23 dies on several of these bodies (see docs/validation.md and
test/fuzz/stock_crash_repro.py, which is not part of this suite because each crash costs a server start).
"""

from __future__ import annotations

import json
import threading

import psutil
import pytest
import requests

from sglang_mux.serving.hooks import FAULT_ENV, LAYERS_ENV
from sglang_mux.serving.validation import RequestLimits, RequestValidationError, validate_generate_request

from fuzz.malformed_requests import CHAT, COMPLETIONS, GENERATE, VOCAB, malformed_requests

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

SERVER_ARGS = ["--dtype", "float32", "--max-running-requests", "16", "--log-level", "warning"]
MODES = {
    "mux": ([], {}),
    "mux-disable": (["--mux-disable"], {}),
    "scheduler-only": ([], {LAYERS_ENV: "scheduler"}),
}
FAULT_PREFIX = "injected-fault-"
GREEDY = {"input_ids": [1, 5, 9, 33, 70, 101], "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
FUZZ_COUNT, FUZZ_SEED = 300, 2026  # the same 300 generated bodies go to the mux and the --mux-disable server

# (name, endpoint, body, field the 400 must name). The first ten are the classes that kill stock SGLang
# 0.5.23 or make it answer 500 / hang; the rest are range checks of ours.
CRASH_CLASSES = [
    ("id=vocab", GENERATE, {"input_ids": [1, 2, VOCAB], "sampling_params": {"max_new_tokens": 2}}, "input_ids[2]"),
    ("id>vocab", GENERATE, {"input_ids": [1, 10**9], "sampling_params": {"max_new_tokens": 2}}, "input_ids[1]"),
    ("id<0", GENERATE, {"input_ids": [-1, 2, 3], "sampling_params": {"max_new_tokens": 2}}, "input_ids[0]"),
    ("id-in-batch", GENERATE, {"input_ids": [[1, 2, 3], [4, VOCAB + 7]], "sampling_params": {"max_new_tokens": 2}},
     "input_ids[1][1]"),
    ("id-streamed", GENERATE, {"input_ids": [1, VOCAB], "stream": True, "sampling_params": {"max_new_tokens": 2}},
     "input_ids[1]"),
    ("logprob_start_len<-1", GENERATE, {"input_ids": [1, 2, 3, 4, 5], "return_logprob": True, "logprob_start_len": -2,
                                        "sampling_params": {"max_new_tokens": 2}}, "logprob_start_len"),
    ("top_logprobs_num>vocab", GENERATE, {"text": "hello", "return_logprob": True, "top_logprobs_num": 100000,
                                          "sampling_params": {"max_new_tokens": 2}}, "top_logprobs_num"),
    ("text+list-sampling_params", GENERATE, {"text": "hello", "sampling_params": [{"max_new_tokens": 2}] * 2},
     "sampling_params"),
    ("empty-text", GENERATE, {"text": "", "sampling_params": {"max_new_tokens": 2}}, "text"),
    ("n-huge", GENERATE, {"text": "hello", "sampling_params": {"max_new_tokens": 2, "n": 100000}}, "sampling_params.n"),
    ("stop_token_ids>vocab", GENERATE, {"text": "hello", "sampling_params": {"max_new_tokens": 3, "min_new_tokens": 2,
                                                                             "stop_token_ids": [VOCAB + 3]}},
     "sampling_params.stop_token_ids[0]"),
    ("top_k=0", GENERATE, {"text": "hello", "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
    ("stream_interval=0", GENERATE, {"text": "hello", "sampling_params": {"max_new_tokens": 2, "stream_interval": 0}},
     "sampling_params.stream_interval"),
    ("batch-length-mismatch", GENERATE, {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 2}] * 3},
     "sampling_params"),
    ("mux_budget=0", GENERATE, {"text": "hello", "sampling_params": {"custom_params": {"mux_budget": 0}}},
     "sampling_params.custom_params.mux_budget"),
    ("mux_leaves-bad", GENERATE, {"text": "hello", "sampling_params": {"custom_params": {"mux_leaves": "sink=4,bad=rest"}}},
     "sampling_params.custom_params.mux_leaves"),
    ("mux_exact-type", GENERATE, {"text": ["a", "b"], "sampling_params": [{}, {"custom_params": {"mux_exact": "yes"}}]},
     "sampling_params[1].custom_params.mux_exact"),
    ("completions-id", COMPLETIONS, {"model": "m", "prompt": [1, 2, VOCAB], "max_tokens": 2}, "prompt[2]"),
    ("completions-logprobs", COMPLETIONS, {"model": "m", "prompt": "hi", "max_tokens": 2, "logprobs": 100000}, "logprobs"),
    ("completions-stream-n", COMPLETIONS, {"model": "m", "prompt": "hi", "max_tokens": 2, "n": 100000, "stream": True}, "n"),
    ("chat-top_logprobs", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                 "logprobs": True, "top_logprobs": 100000}, "top_logprobs"),
    ("chat-stream-mux_budget", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                      "stream": True, "custom_params": {"mux_budget": -1}}, "custom_params.mux_budget"),
]
# Classes only visible after tokenization (rejected inside SGLang's tokenizer manager, not at the edge).
POST_TOKENIZATION = {"empty-text"}
# The classes that reach the scheduler when the front layers are off (the others are shapes the tokenizer
# manager itself must refuse, or a fan-out that happens before the scheduler), with the field the scheduler
# guard names: it sees one tokenized prompt under SGLang's internal names.
SCHEDULER_CLASSES = {
    "id=vocab": "input_ids[2]", "id>vocab": "input_ids[1]", "id<0": "input_ids[0]", "id-in-batch": "input_ids[1]",
    "id-streamed": "input_ids[1]", "empty-text": "input_ids", "logprob_start_len<-1": "logprob_start_len",
    "top_logprobs_num>vocab": "top_logprobs_num", "stop_token_ids>vocab": "sampling_params.stop_token_ids[0]",
    "stream_interval=0": "sampling_params.stream_interval", "mux_budget=0": "sampling_params.custom_params.mux_budget",
    "mux_leaves-bad": "sampling_params.custom_params.mux_leaves", "completions-id": "input_ids[2]",
    "chat-top_logprobs": "top_logprobs_num", "chat-stream-mux_budget": "sampling_params.custom_params.mux_budget",
}


@pytest.fixture(scope="module", params=list(MODES))
def server(request):
    from sglang_mux.server_process import ServerProcess

    args, env = MODES[request.param]
    with ServerProcess(SERVER_ARGS + args, env={**env, FAULT_ENV: FAULT_PREFIX}) as srv:
        srv.mode = request.param
        srv.processes = [psutil.Process(srv.proc.pid)] + psutil.Process(srv.proc.pid).children(recursive=True)
        srv.reference = greedy(srv)
        yield srv


def greedy(srv) -> list[int]:
    r = requests.post(srv.url + "/generate", json=GREEDY, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def assert_still_serving(srv, after: str) -> None:
    dead = [p.pid for p in srv.processes if not (p.is_running() and p.status() != psutil.STATUS_ZOMBIE)]
    assert not dead, f"server processes {dead} exited after {after}; log:\n{srv.log_tail()}"
    assert greedy(srv) == srv.reference, f"greedy output changed after {after}"


def post(srv, endpoint: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(srv.url + endpoint, data=data, headers={"Content-Type": "application/json"}, timeout=120)


def error_text(r: requests.Response) -> tuple[str, str | None]:
    """(message, param) of an error answer: JSON error body, or the error/abort event of a stream."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return event["error"].get("message", ""), event["error"].get("param")
            reason = (event.get("meta_info") or {}).get("finish_reason") or {}
            if isinstance(reason, dict) and reason.get("type") == "abort":
                return reason.get("message", ""), None
        return "", None
    body = r.json()
    if not isinstance(body, dict):  # a batch answer: a list of results, no error
        return "", None
    err = body.get("error", body)
    if isinstance(err, dict):
        return err.get("message", ""), err.get("param")
    return str(err), None


def _tokenizer_adds_tokens_to_empty_text() -> bool:
    from transformers import AutoTokenizer

    from sglang_mux.models import default_model_path

    return len(AutoTokenizer.from_pretrained(default_model_path())("")["input_ids"]) > 0


def test_served_model_has_the_vocab_the_tests_assume(server):
    info = requests.get(server.url + "/get_model_info", timeout=30).json()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(info["model_path"]).vocab_size == VOCAB


@pytest.mark.parametrize("name,endpoint,body,field", CRASH_CLASSES, ids=[c[0] for c in CRASH_CLASSES])
def test_crash_class_is_rejected_and_server_keeps_serving(server, name, endpoint, body, field):
    if server.mode == "scheduler-only" and name not in SCHEDULER_CLASSES:
        pytest.skip("refused before the scheduler; needs the front layers")
    if name == "empty-text" and _tokenizer_adds_tokens_to_empty_text():
        pytest.skip("the served tokenizer puts <s> in front of every prompt: empty text is a valid 1-token prompt")
    r = post(server, endpoint, body)
    message, param = error_text(r)
    if server.mode == "scheduler-only":
        # The scheduler guard aborts the request: HTTP 400 when not streamed, an abort chunk when streamed.
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            assert r.headers.get("content-type", "").startswith("text/event-stream"), r.text
        assert SCHEDULER_CLASSES[name] + ": " in message, message
    else:
        assert r.status_code == 400, r.text
        assert message.startswith(field + ": "), message
        if endpoint == GENERATE:
            # Checks that need the tokenized prompt answer through SGLang's own error body (no "param").
            assert param == (None if name in POST_TOKENIZATION else field), r.text
    assert_still_serving(server, name)


def test_exception_while_admitting_aborts_only_that_request(server):
    """A failure inside the scheduler's handling of one request: that client gets an error, others don't."""
    r = post(server, GENERATE, {"rid": FAULT_PREFIX + "1", "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 500 and FAULT_PREFIX + "1" in r.text, r.text
    r = post(server, GENERATE, {"rid": FAULT_PREFIX + "2", "input_ids": [1, 2, 3], "stream": True,
                                "sampling_params": {"max_new_tokens": 2}})
    message, _ = error_text(r)
    assert r.status_code == 200 and "internal error while admitting request" in message, r.text
    assert_still_serving(server, "an injected scheduler fault")


def test_bad_requests_do_not_change_concurrent_good_ones(server):
    """Greedy requests running while crash-class bodies arrive get exactly the reference tokens."""
    results, stop = [], threading.Event()

    def worker():
        while not stop.is_set():
            results.append(greedy(server))

    t = threading.Thread(target=worker)
    t.start()
    try:
        for name, endpoint, body, _ in CRASH_CLASSES:
            if server.mode == "scheduler-only" and name not in SCHEDULER_CLASSES:
                continue
            assert post(server, endpoint, body).status_code < 500
    finally:
        stop.set()
        t.join(timeout=120)
    assert results and all(r == server.reference for r in results), results
    assert_still_serving(server, "concurrent bad requests")


def test_valid_requests_still_pass(server):
    ok = [
        (GENERATE, {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 1}]}),
        (GENERATE, {"input_ids": [1, VOCAB - 1], "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": VOCAB,
                    "sampling_params": {"max_new_tokens": 2, "custom_params": {"mux_budget": 64, "mux_exact": False}}}),
        (GENERATE, {"text": "hi", "sampling_params": {"max_new_tokens": 2, "n": 2, "temperature": 0.8}}),
        (COMPLETIONS, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 3}),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
                "custom_params": {"mux_budget": 128}}),
    ]
    for endpoint, body in ok:
        r = post(server, endpoint, body)
        assert r.status_code == 200 and '"error"' not in r.text[:500], (body, r.text[:500])


def test_generated_malformed_requests(server):
    if server.mode == "scheduler-only":
        pytest.skip("the generated bodies target the full stack")
    limits = RequestLimits(vocab_size=VOCAB, hidden_size=128)
    statuses: dict[int, int] = {}
    for i, (endpoint, body) in enumerate(malformed_requests(FUZZ_COUNT, seed=FUZZ_SEED)):
        r = post(server, endpoint, body)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, body, r.text[:500])
        message, param = error_text(r)
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
            assert "Traceback" not in r.text
        if endpoint == GENERATE and param is not None:
            # Our HTTP layer rejected it: the pure rules name the same field for the same body.
            with pytest.raises(RequestValidationError) as info:
                validate_generate_request(body, limits)
            assert info.value.field == param, (body, message)
        assert_still_serving(server, f"generated request {i}: {json.dumps(body)[:200]}")
    assert statuses.get(400, 0) >= FUZZ_COUNT // 2, statuses


def test_log_shows_no_unexpected_failure(server):
    """Runs last in each mode: the only scheduler-side failures were the injected ones, none crashed a step."""
    from pathlib import Path

    log = Path(server.log_path).read_text(errors="replace")
    assert "Scheduler hit an exception" not in log
    failed = [line for line in log.splitlines() if "failed while being admitted" in line]
    assert failed and all(FAULT_PREFIX in line for line in failed), failed
