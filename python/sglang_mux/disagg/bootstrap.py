"""Rules for the PD bootstrap fields of a ``/generate`` request (``bootstrap_host``, ``bootstrap_port``,
``bootstrap_room``), checked at the HTTP edge of a prefill or decode server.

sglang-router fills these fields for every request it sends to a PD pair; a client may also send them. SGLang
0.5.23 takes them unchecked: a wrong type or range reaches the transfer engine (a failed connection, a
scheduler assertion, or a request that waits for a peer that never comes). Here a malformed field is a
:class:`~sglang_mux.serving.validation.RequestValidationError` (HTTP 400, the field named, one line).

* ``bootstrap_host``: a host name or IP address (1-253 characters of ``[A-Za-z0-9.-:_[]%]``);
* ``bootstrap_port``: an integer in [1, 65535];
* ``bootstrap_room``: an integer in [0, 2**64 - 1] (SGLang keys transfers by it);
* each may be one value or, for a batch, a list with one value per prompt; ``None`` means "not given".
* On a PD server (``--disaggregation-mode prefill|decode``) ``bootstrap_host`` and ``bootstrap_room`` are
  required: without them the request can never be paired (``required=True``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from sglang_mux.serving.validation import RequestValidationError

MAX_ROOM = (1 << 64) - 1
_HOST = re.compile(r"^[A-Za-z0-9.\-:_\[\]%]{1,253}$")
FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_one(field: str, v: Any) -> None:
    if v is None:
        return
    if field == "bootstrap_host":
        if not isinstance(v, str) or not _HOST.match(v):
            raise RequestValidationError(field, f"must be a host name or IP address, got {_show(v)}")
    elif field == "bootstrap_port":
        if not _is_int(v) or not 1 <= v <= 65535:
            raise RequestValidationError(field, f"must be an integer in [1, 65535], got {_show(v)}")
    elif not _is_int(v) or not 0 <= v <= MAX_ROOM:
        raise RequestValidationError(field, f"must be an integer in [0, 2**64-1], got {_show(v)}")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _batch_size(req: Mapping[str, Any]) -> int | None:
    for key in ("text", "input_ids"):
        v = req.get(key)
        if isinstance(v, list) and v and (key == "text" or isinstance(v[0], list)):
            return len(v)
        if v is not None:
            return None  # a single prompt
    return None


def validate_bootstrap_fields(req: Mapping[str, Any], *, required: bool = False) -> None:
    """Raise RequestValidationError naming the first malformed bootstrap field of ``req``."""
    batch = _batch_size(req)
    for field in FIELDS:
        v = req.get(field)
        if isinstance(v, list):
            if batch is not None and len(v) != batch:
                raise RequestValidationError(field, f"a list must have one value per prompt ({batch}), got {len(v)}")
            if batch is None and len(v) != 1:
                raise RequestValidationError(field, f"a list must have one value for a single prompt, got {len(v)}")
            for i, item in enumerate(v):
                _check_item(field, i, item)
        else:
            _check_one(field, v)
        if required and field != "bootstrap_port":
            values = v if isinstance(v, list) else [v]
            if any(x is None for x in values):
                raise RequestValidationError(
                    field, "required on a PD server (sglang-router fills it; send requests to the router)"
                )


def _check_item(field: str, i: int, item: Any) -> None:
    try:
        _check_one(field, item)
    except RequestValidationError as e:
        raise RequestValidationError(f"{field}[{i}]", e.problem) from None
