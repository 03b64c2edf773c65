"""A small client of an SGLang server (stock or mux): ``/generate`` with greedy decoding, and server info."""

from __future__ import annotations

import requests


class ServerError(RuntimeError):
    """The server could not be reached or answered with an error; the message says which and why."""


def model_path(url: str, timeout: float = 10.0) -> str:
    """The model path the server serves (from ``/model_info``), used to load the matching tokenizer."""
    try:
        r = requests.get(f"{url}/model_info", timeout=timeout)
        r.raise_for_status()
    except requests.RequestException as e:
        raise ServerError(f"--url: no SGLang server answers at {url} ({type(e).__name__})") from None
    return r.json()["model_path"]


def generate(url: str, prompt: str, max_new_tokens: int, custom_params: dict | None, timeout: float = 600.0) -> str:
    """Greedy completion of ``prompt``; raises :class:`ServerError` with the server's message on HTTP errors."""
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    if custom_params:
        sampling["custom_params"] = custom_params
    try:
        r = requests.post(f"{url}/generate", json={"text": prompt, "sampling_params": sampling}, timeout=timeout)
    except requests.RequestException as e:
        raise ServerError(f"--url: request to {url}/generate failed ({type(e).__name__})") from None
    if r.status_code != 200:
        raise ServerError(f"server answered HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["text"]
