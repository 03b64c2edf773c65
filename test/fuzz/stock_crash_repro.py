"""Reproduce the request classes that take stock SGLang 0.5.23 down, and show what our server answers.

    python test/fuzz/stock_crash_repro.py            # stock SGLang (no plugin), then sglang-mux
    python test/fuzz/stock_crash_repro.py --only stock

For each class: send the body to a server, then a fixed greedy request. Reported per class: the HTTP
status (or the connection error), and whether the server still answered the greedy request with the
tokens it gave at start ("serving"), answered nothing within 30 s ("hung"), or had exited ("exited").
A dead or hung server is replaced by a fresh one before the next class, so the script takes a few
minutes (one server start per crash). Not part of the test suite for that reason; docs/validation.md
quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.malformed_requests import CHAT, COMPLETIONS, GENERATE, VOCAB  # noqa: E402

CLASSES = [
    ("token id = vocab size", GENERATE, {"input_ids": [1, 2, VOCAB], "sampling_params": {"max_new_tokens": 2}}),
    ("token id > vocab size", GENERATE, {"input_ids": [1, 10**9], "sampling_params": {"max_new_tokens": 2}}),
    ("negative token id", GENERATE, {"input_ids": [-1, 2, 3], "sampling_params": {"max_new_tokens": 2}}),
    ("bad id inside a batch", GENERATE, {"input_ids": [[1, 2, 3], [4, VOCAB + 7]], "sampling_params": {"max_new_tokens": 2}}),
    ("bad id, streamed", GENERATE, {"input_ids": [1, VOCAB], "stream": True, "sampling_params": {"max_new_tokens": 2}}),
    ("logprob_start_len = -2, 5-token prompt", GENERATE, {"input_ids": [1, 2, 3, 4, 5], "return_logprob": True,
                                                          "logprob_start_len": -2, "sampling_params": {"max_new_tokens": 2}}),
    ("top_logprobs_num = 100000", GENERATE, {"text": "hello", "return_logprob": True, "top_logprobs_num": 100000,
                                             "sampling_params": {"max_new_tokens": 2}}),
    ("text + list of sampling_params", GENERATE, {"text": "hello", "sampling_params": [{"max_new_tokens": 2}] * 2}),
    ("empty text (0-token prompt)", GENERATE, {"text": "", "sampling_params": {"max_new_tokens": 2}}),
    ("n = 100000", GENERATE, {"text": "hello", "sampling_params": {"max_new_tokens": 2, "n": 100000}}),
    ("stop_token_ids > vocab with min_new_tokens", GENERATE,
     {"text": "hello", "sampling_params": {"max_new_tokens": 3, "min_new_tokens": 2, "stop_token_ids": [VOCAB + 3]}}),
    ("stream_interval = 0", GENERATE, {"text": "hello", "stream": True,
                                       "sampling_params": {"max_new_tokens": 2, "stream_interval": 0}}),
    ("/v1/completions prompt id = vocab", COMPLETIONS, {"model": "m", "prompt": [1, 2, VOCAB], "max_tokens": 2}),
    ("/v1/chat/completions top_logprobs = 100000", CHAT,
     {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
      "top_logprobs": 100000}),
]
GREEDY = {"input_ids": [1, 5, 9, 33, 70, 101], "sampling_params": {"max_new_tokens": 12, "temperature": 0}}


def run(stock: bool, classes: list) -> list[tuple[str, str, str]]:
    from sglang_mux.server_process import ServerProcess

    args = ["--dtype", "float32", "--log-level", "warning"]
    rows = []
    srv = ServerProcess(args, stock=stock).start()
    reference = requests.post(srv.url + "/generate", json=GREEDY, timeout=60).json()["output_ids"]
    try:
        for k, (name, endpoint, body) in enumerate(classes):
            try:
                r = requests.post(srv.url + endpoint, json=body, timeout=30)
                answer = f"HTTP {r.status_code}"
                if r.status_code == 200 and '"error"' in r.text[:3000]:
                    answer += " + error event"
            except requests.RequestException as e:
                answer = type(e).__name__
            time.sleep(2)
            if not srv.alive():
                state = "exited"
            else:
                try:
                    got = requests.post(srv.url + "/generate", json=GREEDY, timeout=30).json().get("output_ids")
                    state = "serving" if got == reference else f"serving, greedy output changed: {got}"
                except (requests.RequestException, ValueError):
                    state = "exited" if not srv.alive() else "hung"
            rows.append((name, answer, state))
            print(f"{'stock' if stock else 'mux'} | {name} | {answer} | {state}", flush=True)
            if state != "serving" and k + 1 < len(classes):
                srv.stop()
                srv = ServerProcess(args, stock=stock).start()
    finally:
        srv.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["stock", "mux"])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--match", default="", help="only the classes whose name contains this text")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    classes = [c for c in CLASSES if a.match in c[0]]
    out = {}
    for kind in ("stock", "mux"):
        if a.only in (None, kind):
            out[kind] = run(stock=kind == "stock", classes=classes)
    print("\n| request | " + " | ".join(f"{k}: answer | {k}: after" for k in out) + " |")
    print("|---|" + "---|---|" * len(out))
    for i, (name, _, _) in enumerate(classes):
        print(f"| {name} | " + " | ".join(f"{out[k][i][1]} | {out[k][i][2]}" for k in out) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
