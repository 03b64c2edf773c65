"""Bootstrap-field rules of PD servers (disagg/bootstrap.py): malformed -> one-line error naming the field."""

from __future__ import annotations

import pytest

from sglang_mux.disagg.bootstrap import MAX_ROOM, validate_bootstrap_fields
from sglang_mux.serving.validation import RequestValidationError

GOOD = {"text": "hi", "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 12345}


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"bootstrap_port": None},
        {"bootstrap_host": "decode-0.cluster.local"},
        {"bootstrap_host": "[::1]"},
        {"bootstrap_room": 0},
        {"bootstrap_room": MAX_ROOM},
        {"bootstrap_port": 1},
        {"bootstrap_port": 65535},
    ],
)
def test_well_formed_fields_pass(change):
    validate_bootstrap_fields({**GOOD, **change}, required=True)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"bootstrap_room": "abc"}, "bootstrap_room"),
        ({"bootstrap_room": -1}, "bootstrap_room"),
        ({"bootstrap_room": MAX_ROOM + 1}, "bootstrap_room"),
        ({"bootstrap_room": 1.5}, "bootstrap_room"),
        ({"bootstrap_room": True}, "bootstrap_room"),
        ({"bootstrap_port": 0}, "bootstrap_port"),
        ({"bootstrap_port": 70000}, "bootstrap_port"),
        ({"bootstrap_port": "8998"}, "bootstrap_port"),
        ({"bootstrap_host": ""}, "bootstrap_host"),
        ({"bootstrap_host": 42}, "bootstrap_host"),
        ({"bootstrap_host": "evil host; rm -rf"}, "bootstrap_host"),
        ({"bootstrap_host": "a" * 300}, "bootstrap_host"),
        ({"bootstrap_room": [1, 2]}, "bootstrap_room"),
        ({"bootstrap_room": None}, "bootstrap_room"),
        ({"bootstrap_host": None}, "bootstrap_host"),
    ],
)
def test_malformed_field_is_named(change, field):
    with pytest.raises(RequestValidationError) as e:
        validate_bootstrap_fields({**GOOD, **change}, required=True)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)
    assert e.value.status_code == 400


def test_batch_lists_one_value_per_prompt():
    batch = {"text": ["a", "b"], "bootstrap_host": ["h1", "h2"], "bootstrap_port": [1, 2], "bootstrap_room": [5, 6]}
    validate_bootstrap_fields(batch, required=True)
    with pytest.raises(RequestValidationError) as e:
        validate_bootstrap_fields({**batch, "bootstrap_room": [5, -6]}, required=True)
    assert e.value.field == "bootstrap_room[1]"
    with pytest.raises(RequestValidationError) as e:
        validate_bootstrap_fields({**batch, "bootstrap_port": [1]}, required=True)
    assert e.value.field == "bootstrap_port"


def test_not_required_on_aggregated_requests():
    validate_bootstrap_fields({"text": "hi"}, required=False)
    with pytest.raises(RequestValidationError):
        validate_bootstrap_fields({"text": "hi", "bootstrap_room": "x"}, required=False)
