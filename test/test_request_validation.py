"""Request validation rules (sglang_mux.serving.validation), without a server.

Each rule is checked on a body that breaks exactly it (the error must name that field) and on the valid
body next to it (accepted). A seeded stream of random junk shows the rules never raise anything but
RequestValidationError.
"""

from __future__ import annotations

import random
from array import array

import pytest

from sglang_mux.request_options import MAX_BUDGET
from sglang_mux.serving.validation import (
    MAX_PARALLEL_SAMPLES,
    OPENAI_CHAT_NAMES,
    OPENAI_COMPLETION_NAMES,
    SAMPLING_PARAM_FIELDS,
    RequestLimits,
    RequestValidationError,
    as_public_error,
    rename_field,
    validate_generate_request,
    validate_prompt_token_ids,
    validate_scheduled_request,
)

LIMITS = RequestLimits(vocab_size=512, hidden_size=128)
SP = {"max_new_tokens": 4}


def field_of(body: dict) -> str | None:
    try:
        validate_generate_request(body, LIMITS)
    except RequestValidationError as e:
        assert str(e).startswith(e.field + ": ")
        return e.field
    return None


# (bad body, field the error must name, a valid neighbour)
CASES = [
    ({"input_ids": [1, 2, 512]}, "input_ids[2]", {"input_ids": [1, 2, 511]}),
    ({"input_ids": [1, 10**9]}, "input_ids[1]", {"input_ids": [1, 0]}),
    ({"input_ids": [-1, 2]}, "input_ids[0]", {"input_ids": [0, 2]}),
    ({"input_ids": [[1, 2], [3, 600]]}, "input_ids[1][1]", {"input_ids": [[1, 2], [3, 6]]}),
    ({"input_ids": [[1], []]}, "input_ids[1]", {"input_ids": [[1], [2]]}),
    ({"input_ids": [1, True]}, "input_ids[1]", {"input_ids": [1, 1]}),
    ({"input_ids": []}, "input_ids", {"input_ids": [5]}),
    ({"input_ids": [], "session_params": {}}, "input_ids", {"input_ids": [], "session_params": {"id": "s1"}}),
    ({"text": "a", "input_ids": [1]}, "text", {"text": "a"}),
    ({"sampling_params": SP}, "text", {"text": "a", "sampling_params": SP}),
    ({"text": ["a", 3]}, "text[1]", {"text": ["a", "3"]}),
    ({"input_embeds": [[0.0] * 7]}, "input_embeds[0]", {"input_embeds": [[0.0] * 128]}),
    # batch / sampling_params shape agreement
    ({"text": "a", "sampling_params": [SP, SP]}, "sampling_params", {"text": ["a", "b"], "sampling_params": [SP, SP]}),
    ({"text": ["a", "b"], "sampling_params": [SP]}, "sampling_params", {"text": ["a"], "sampling_params": [SP]}),
    ({"text": ["a", "b"], "rid": ["x"]}, "rid", {"text": ["a", "b"], "rid": ["x", "y"]}),
    ({"text": "a", "return_logprob": [True]}, "return_logprob", {"text": "a", "return_logprob": True}),
    ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]}, "sampling_params",
     {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 2}]}),
    # logprobs
    ({"text": "a", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len",
     {"text": "a", "return_logprob": True, "logprob_start_len": -1}),
    ({"text": "a", "return_logprob": True, "top_logprobs_num": 513}, "top_logprobs_num",
     {"text": "a", "return_logprob": True, "top_logprobs_num": 512}),
    ({"text": "a", "top_logprobs_num": -1}, "top_logprobs_num", {"text": "a", "top_logprobs_num": 0}),
    ({"text": ["a", "b"], "top_logprobs_num": [1, 600]}, "top_logprobs_num[1]", {"text": ["a", "b"], "top_logprobs_num": [1, 6]}),
    ({"text": "a", "token_ids_logprob": [5, 512]}, "token_ids_logprob[1]", {"text": "a", "token_ids_logprob": [5, 511]}),
    ({"text": ["a", "b"], "token_ids_logprob": [[1], [2], [3]]}, "token_ids_logprob",
     {"text": ["a", "b"], "token_ids_logprob": [[1], [2]]}),
    ({"text": "a", "stream": "yes"}, "stream", {"text": "a", "stream": True}),
    # sampling fields
    ({"text": "a", "sampling_params": {"n": 0}}, "sampling_params.n", {"text": "a", "sampling_params": {"n": 1}}),
    ({"text": "a", "sampling_params": {"n": MAX_PARALLEL_SAMPLES + 1}}, "sampling_params.n",
     {"text": "a", "sampling_params": {"n": MAX_PARALLEL_SAMPLES}}),
    ({"text": ["a"] * 64, "sampling_params": {"n": 128}}, "sampling_params.n", {"text": ["a"] * 32, "sampling_params": {"n": 128}}),
    ({"text": "a", "sampling_params": {"top_k": 0}}, "sampling_params.top_k", {"text": "a", "sampling_params": {"top_k": -1}}),
    ({"text": "a", "sampling_params": {"top_k": 1.5}}, "sampling_params.top_k", {"text": "a", "sampling_params": {"top_k": 2}}),
    ({"text": "a", "sampling_params": {"top_p": 0}}, "sampling_params.top_p", {"text": "a", "sampling_params": {"top_p": 1}}),
    ({"text": "a", "sampling_params": {"min_p": 1.1}}, "sampling_params.min_p", {"text": "a", "sampling_params": {"min_p": 1}}),
    ({"text": "a", "sampling_params": {"temperature": -0.1}}, "sampling_params.temperature",
     {"text": "a", "sampling_params": {"temperature": 0}}),
    ({"text": "a", "sampling_params": {"temperature": float("nan")}}, "sampling_params.temperature",
     {"text": "a", "sampling_params": {"temperature": 0.7}}),
    ({"text": "a", "sampling_params": {"repetition_penalty": 0}}, "sampling_params.repetition_penalty",
     {"text": "a", "sampling_params": {"repetition_penalty": 2}}),
    ({"text": "a", "sampling_params": {"presence_penalty": -2.5}}, "sampling_params.presence_penalty",
     {"text": "a", "sampling_params": {"presence_penalty": -2}}),
    ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens",
     {"text": "a", "sampling_params": {"max_new_tokens": 0}}),
    ({"text": "a", "sampling_params": {"max_new_tokens": 2, "min_new_tokens": 3}}, "sampling_params.min_new_tokens",
     {"text": "a", "sampling_params": {"max_new_tokens": 3, "min_new_tokens": 3}}),
    ({"text": "a", "sampling_params": {"stop_token_ids": [2, 512]}}, "sampling_params.stop_token_ids[1]",
     {"text": "a", "sampling_params": {"stop_token_ids": [2, 511]}}),
    ({"text": "a", "sampling_params": {"logit_bias": {"512": 1.0}}}, "sampling_params.logit_bias.512",
     {"text": "a", "sampling_params": {"logit_bias": {"511": 1.0}}}),
    ({"text": "a", "sampling_params": {"stream_interval": 0}}, "sampling_params.stream_interval",
     {"text": "a", "sampling_params": {"stream_interval": 1}}),
    ({"text": "a", "sampling_params": {"stop": ["s"] * 33}}, "sampling_params.stop", {"text": "a", "sampling_params": {"stop": ["s"] * 32}}),
    ({"text": "a", "sampling_params": {"regex": "a", "ebnf": "b"}}, "sampling_params.ebnf",
     {"text": "a", "sampling_params": {"regex": "a"}}),
    ({"text": "a", "sampling_params": {"sampling_seed": 2**63}}, "sampling_params.sampling_seed",
     {"text": "a", "sampling_params": {"sampling_seed": 2**63 - 1}}),
    ({"text": "a", "sampling_params": {"is_normalized": True}}, "sampling_params.is_normalized", {"text": "a"}),
    ({"text": "a", "sampling_params": {"ignore_eos": 1}}, "sampling_params.ignore_eos",
     {"text": "a", "sampling_params": {"ignore_eos": True}}),
    # our per-request mux fields
    ({"text": "a", "sampling_params": {"custom_params": {"mux_budget": 0}}}, "sampling_params.custom_params.mux_budget",
     {"text": "a", "sampling_params": {"custom_params": {"mux_budget": 1}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_budget": MAX_BUDGET + 1}}},
     "sampling_params.custom_params.mux_budget", {"text": "a", "sampling_params": {"custom_params": {"mux_budget": MAX_BUDGET}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_leaves": "sink=8,bogus=rest"}}},
     "sampling_params.custom_params.mux_leaves",
     {"text": "a", "sampling_params": {"custom_params": {"mux_leaves": "sink=8,retrieval=rest"}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_exact": "yes"}}}, "sampling_params.custom_params.mux_exact",
     {"text": "a", "sampling_params": {"custom_params": {"mux_exact": True}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_retrieval_score": "max"}}},
     "sampling_params.custom_params.mux_retrieval_score",
     {"text": "a", "sampling_params": {"custom_params": {"mux_retrieval_score": "bound"}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_sparse_prefill": "yes"}}},
     "sampling_params.custom_params.mux_sparse_prefill",
     {"text": "a", "sampling_params": {"custom_params": {"mux_sparse_prefill": True}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_sparse_prefill": 1}}},
     "sampling_params.custom_params.mux_sparse_prefill",
     {"text": "a", "sampling_params": {"custom_params": {"mux_sparse_prefill": False}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_cold_bits": 3}}},
     "sampling_params.custom_params.mux_cold_bits",
     {"text": "a", "sampling_params": {"custom_params": {"mux_cold_bits": 4}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_cold_bits": "4"}}},
     "sampling_params.custom_params.mux_cold_bits",
     {"text": "a", "sampling_params": {"custom_params": {"mux_cold_bits": 16}}}),
    ({"text": "a", "sampling_params": {"custom_params": {"mux_budgt": 5}}}, "sampling_params.custom_params.mux_budgt",
     {"text": "a", "sampling_params": {"custom_params": {"other_plugin_key": 5}}}),
    ({"text": ["a", "b"], "sampling_params": [SP, {"custom_params": {"mux_budget": -1}}]},
     "sampling_params[1].custom_params.mux_budget", {"text": ["a", "b"], "sampling_params": [SP, {"custom_params": {"mux_budget": 64}}]}),
]


@pytest.mark.parametrize("bad,field,good", CASES, ids=[c[1] for c in CASES])
def test_rule_names_the_field_and_accepts_the_valid_neighbour(bad, field, good):
    assert field_of(bad) == field
    assert field_of(good) is None


def test_error_body_names_the_field():
    with pytest.raises(RequestValidationError) as info:
        validate_generate_request({"input_ids": [7, 512]}, LIMITS)
    body = info.value.to_error_body()
    assert body == {
        "error": {
            "message": "input_ids[1]: token id 512 is outside the vocabulary [0, 512)",
            "type": "invalid_request_error",
            "param": "input_ids[1]",
            "code": 400,
        }
    }
    assert isinstance(info.value, ValueError) and info.value.status_code == 400


def test_openai_names():
    assert rename_field("sampling_params.top_k", OPENAI_CHAT_NAMES) == "top_k"
    assert rename_field("sampling_params.custom_params.mux_budget", OPENAI_CHAT_NAMES) == "custom_params.mux_budget"
    assert rename_field("sampling_params.max_new_tokens", OPENAI_COMPLETION_NAMES) == "max_tokens"
    assert rename_field("top_logprobs_num", OPENAI_CHAT_NAMES) == "top_logprobs"
    assert rename_field("top_logprobs_num", OPENAI_COMPLETION_NAMES) == "logprobs"
    assert rename_field("input_ids[1][2]", OPENAI_COMPLETION_NAMES) == "prompt[1][2]"
    e = as_public_error(RequestValidationError("sampling_params.n", "must be ..."), OPENAI_CHAT_NAMES)
    assert str(e) == "n: must be ..."


def test_tokenized_prompt_ids():
    validate_prompt_token_ids("text", array("q", [0, 511]), 512)
    validate_prompt_token_ids("text", None, 512)
    validate_prompt_token_ids("text", [], 512, allow_empty=True)
    with pytest.raises(RequestValidationError, match=r"^text: the prompt has no tokens"):
        validate_prompt_token_ids("text", array("q"), 512)
    with pytest.raises(RequestValidationError, match=r"^text\[1\]: token id 512"):
        validate_prompt_token_ids("text", array("q", [0, 512]), 512)


def test_scheduled_request_second_line():
    ok = {"input_ids": array("q", [1, 2]), "logprob_start_len": -1, "top_logprobs_num": 0, "token_ids_logprob": None,
          "stop_token_ids": {2, 3}, "logit_bias": None, "top_k": 1 << 30, "n": 1, "stream_interval": None,
          "custom_params": {"mux_budget": 64}}
    validate_scheduled_request(ok, LIMITS)
    validate_scheduled_request({**ok, "input_ids": [], "session": True}, LIMITS)
    for key, bad, field in [
        ("input_ids", array("q", [1, 512]), "input_ids[1]"),
        ("input_ids", array("q"), "input_ids"),
        ("logprob_start_len", -3, "logprob_start_len"),
        ("top_logprobs_num", 10**5, "top_logprobs_num"),
        ("token_ids_logprob", [-1], "token_ids_logprob[0]"),
        ("stop_token_ids", {1, 600}, "sampling_params.stop_token_ids[1]"),
        ("custom_params", {"mux_budget": 0}, "sampling_params.custom_params.mux_budget"),
        ("stream_interval", 0, "sampling_params.stream_interval"),
    ]:
        with pytest.raises(RequestValidationError) as info:
            validate_scheduled_request({**ok, key: bad}, LIMITS)
        assert info.value.field == field, key


def test_sampling_fields_match_sglang():
    """Our list of client sampling fields is SGLang's SamplingParams API (upgrade tripwire)."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    internal = {"stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized",
                "ebnf_full_assistant"}
    assert set(SAMPLING_PARAM_FIELDS) == set(SamplingParams.__struct_fields__) - internal


def _junk(rng: random.Random, depth: int = 0):
    pick = rng.randrange(9 if depth < 3 else 6)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 1, 511, 512, 2**70, -(2**70)])
    if pick == 2:
        return rng.choice([0.5, float("inf"), float("nan"), -1e300])
    if pick in (3, 4, 5):
        return rng.choice(["", "x", "12", "input_ids", "sampling_params"])
    if pick == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["text", "input_ids", "input_embeds", "sampling_params", "n", "top_k", "custom_params", "mux_budget",
            "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "rid", "stop_token_ids",
            "logit_bias", "5", "stream"]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_rules_raise_only_validation_errors_on_junk():
    rng = random.Random(7)
    rejected = 0
    for _ in range(3000):
        body = _junk(rng)
        if rng.random() < 0.5:
            body = {"text": "a", **(body if isinstance(body, dict) else {"sampling_params": body})}
        try:
            validate_generate_request(body, LIMITS)
        except RequestValidationError:
            rejected += 1
        try:
            validate_scheduled_request(body if isinstance(body, dict) else {"input_ids": body}, LIMITS)
        except RequestValidationError:
            pass
    assert rejected > 2000  # junk is mostly invalid; the point is that nothing else was raised


def test_hook_targets_exist_in_sglang():
    """Every SGLang function the hooks patch exists under that name (upgrade tripwire)."""
    import pkgutil

    from sglang_mux.serving import hooks

    for target in (hooks.HTTP_GENERATE, hooks.OPENAI_COMPLETION, hooks.OPENAI_CHAT, hooks.TOKENIZER_ENTRY,
                   hooks.TOKENIZED_PROMPT, hooks.SCHEDULER_ENTRY):
        module, _, attr = target.rpartition(".")
        assert callable(getattr(pkgutil.resolve_name(module), attr)), target
        assert hooks._module_of(target) in target and hooks._module_of(target).startswith("sglang.srt.")


def test_layer_switch_is_checked(monkeypatch):
    from sglang_mux.serving.hooks import LAYERS_ENV, enabled_layers

    monkeypatch.setenv(LAYERS_ENV, "scheduler")
    assert enabled_layers() == ("scheduler",)
    monkeypatch.setenv(LAYERS_ENV, "edge,bogus")
    with pytest.raises(ValueError, match="SGLANG_MUX_VALIDATION_LAYERS: unknown layer 'bogus'"):
        enabled_layers()


def test_sparse_prefill_field_rule():
    """mux_sparse_prefill: absent follows --mux-sparse-prefill-min-tokens (0: off), true forces it on at any
    length when the server is off, false forces exact prefill; the scheduler line rejects non-bools too."""
    from sglang_mux.config import MuxConfig
    from sglang_mux.request_options import parse_request_options

    on, off = MuxConfig(sparse_prefill_min_tokens=4096), MuxConfig()
    absent = parse_request_options({"mux_budget": 64})
    yes, no = parse_request_options({"mux_sparse_prefill": True}), parse_request_options({"mux_sparse_prefill": False})
    assert (absent.sparse_prefill, yes.sparse_prefill, no.sparse_prefill) == (None, True, False)
    assert [absent.prefills_sparsely(on, n) for n in (4095, 4096, 5000)] == [False, True, True]
    assert not absent.prefills_sparsely(off, 10**6)
    assert yes.prefills_sparsely(off, 10) and not yes.prefills_sparsely(on, 3000)
    assert not no.prefills_sparsely(on, 10**6)
    with pytest.raises(RequestValidationError) as info:
        validate_scheduled_request({"input_ids": [1], "custom_params": {"mux_sparse_prefill": "on"}}, LIMITS)
    assert info.value.field == "sampling_params.custom_params.mux_sparse_prefill"
    assert "true or false" in str(info.value)


@pytest.mark.parametrize("bad", [3, 1, 32, 0, -4, "4", 4.0, True, [4]])
def test_mux_cold_bits_rejected_naming_field_and_allowed_values(bad):
    from sglang_mux.request_options import MuxRequestError, parse_request_options

    with pytest.raises(MuxRequestError) as info:
        parse_request_options({"mux_cold_bits": bad})
    msg = str(info.value)
    assert msg.startswith("sampling_params.custom_params.mux_cold_bits: ") and "allowed: 16, 8, 4, 2" in msg
    assert "\n" not in msg


def test_mux_cold_bits_overrides_the_server_value():
    from sglang_mux.config import MuxConfig
    from sglang_mux.request_options import parse_request_options

    server = MuxConfig(cold_bits=8)
    assert parse_request_options({"mux_cold_bits": 2}).effective_config(server).cold_bits == 2
    assert parse_request_options({"mux_cold_bits": 16}).effective_config(server).cold_bits == 16
    assert parse_request_options({"mux_budget": 64}).effective_config(server).cold_bits == 8
    assert parse_request_options({}).cold_bits is None
