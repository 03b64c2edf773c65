"""Shared fixtures: one mux server and one stock SGLang server for the whole session (they are slow to start)."""

from __future__ import annotations

import os

import pytest

# Tests share 2 cores with servers they start: keep torch in this process to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Servers the tests start (directly, through benchmarks or in a PD cluster) serve the bundled tiny model unless a
# test names another: milliseconds per request. The real default model is tested by the tests that ask for it.
os.environ["MUX_DEFAULT_MODEL"] = "tiny"

from mux_test_support import SERVER_COMMON  # noqa: E402


@pytest.fixture(scope="session")
def mux_server():
    from sglang_mux.server_process import ServerProcess

    with ServerProcess(SERVER_COMMON) as srv:
        yield srv


@pytest.fixture(scope="session")
def stock_server():
    from sglang_mux.server_process import ServerProcess

    with ServerProcess(SERVER_COMMON, stock=True) as srv:
        yield srv


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from sglang_mux.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())
