"""Shared pieces of the serving benchmarks (decode_latency, memory_scaling, offline_throughput, goodput).

Contracts:
* ``server_flags`` gives stock SGLang and mux the same SGLang flags; ``start_server`` starts one of them with
  ``ServerProcess`` (one thread for torch) on a port from ``free_port`` and stops it on exit.
* ``prompt_ids`` is deterministic for a seed, so stock and mux get the very same prompts.
* ``stream_generate`` posts one streaming ``/generate`` and returns the client-side arrival time of every chunk
  with the number of output tokens it completes; ``decode_time_per_token`` turns that into time per output token.
* ``kv_bytes_per_token`` is computed from the model's config (K and V, every layer, every KV head).
* ``machine_info`` describes the machine a result was measured on; ``write_result`` writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))

from sglang_mux.platform import has_cuda_gpu  # noqa: E402
from sglang_mux.server_process import ServerProcess, free_port  # noqa: E402

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "half": 2, "float": 4}
PROMPT_TOKEN_RANGE = (10, 500)  # token ids used for synthetic prompts (all plain BPE pieces of the bundled model)
MUX_MODES = ("keep", "drop", "tier")


# ------------------------------------------------------------------------------------------- argument helpers
def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, with K suffix allowed (``1K,2K,4096``)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        mult = 1
        if part[-1] in "kK":
            part, mult = part[:-1], 1024
        try:
            val = int(part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 1K,2K,4096), got {text!r}") from None
        if val <= 0:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
        out.append(val)
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one positive integer, got {text!r}")
    return out


def _positive(convert, what: str):
    """argparse type: ``convert(text)``, which must be > 0."""
    def parse(text: str):
        try:
            val = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not val > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return val

    parse.__name__ = f"positive_{convert.__name__}"
    return parse


positive_int = _positive(int, "a positive integer")
positive_float = _positive(float, "a positive number")


def add_run_args(p: argparse.ArgumentParser, name: str, *, default_mode: str) -> None:
    """The flags every server benchmark shares: ``--seed``, ``--out`` (default ``benchmark/out/NAME``),
    ``--no-plot``, and the servers' (``add_server_args``)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmark/out") / name)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_server_args(p, default_mode=default_mode)


def add_server_args(p: argparse.ArgumentParser, *, default_mode: str, default_budget: int = 1024) -> None:
    """Flags every server-starting benchmark shares."""
    g = p.add_argument_group("servers")
    g.add_argument("--systems", default="stock,mux", type=_systems,
                   help="which servers to run, comma-separated from: stock, mux (default: stock,mux)")
    g.add_argument("--mux-budget", type=positive_int, default=default_budget, help="mux token budget per request")
    g.add_argument("--mux-page-size", type=positive_int, default=16, help="mux page size (tokens)")
    g.add_argument("--mux-mode", choices=MUX_MODES, default=default_mode,
                   help="keep: exact KV stays on the device, reads are bounded; drop: --mux-drop-cold (cold pages "
                        "freed); tier: --mux-host-bytes (cold pages move to the host-DRAM tier)")
    g.add_argument("--mux-host-bytes", type=positive_int, default=4 << 30,
                   help="host tier capacity for --mux-mode tier (default 4 GiB)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES), help="model dtype for both servers")
    g.add_argument("--model-path", default=None, help="model: a folder or a short name, smollm2 or tiny (default: smollm2, the served default)")
    g.add_argument("--server-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="extra SGLang flag for both servers, e.g. --server-arg=--max-total-tokens=65536 (repeatable)")
    g.add_argument("--mux-arg", action="append", default=[], metavar="--mux-FLAG=VALUE", type=_mux_arg,
                   help="extra flag for the mux server only, e.g. --mux-arg=--mux-retrieval-group-pages=1 (repeatable)")
    g.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here")


def _systems(text: str) -> list[str]:
    vals = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in vals if s not in ("stock", "mux")]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"allowed values: stock, mux (comma-separated); got {text!r}")
    return list(dict.fromkeys(vals))


def _mux_arg(text: str) -> str:
    if not text.startswith("--mux-"):
        raise argparse.ArgumentTypeError(f"expected --mux-FLAG or --mux-FLAG=VALUE (a mux flag), got {text!r}")
    return text


def extra_flags(items: list[str], *, mux: bool = False) -> list[str]:
    """``--FLAG=VALUE`` items as argv: those of ``--server-arg`` (SGLang flags both servers get, never mux
    ones) or, with ``mux``, those of ``--mux-arg`` (checked by its argparse type)."""
    out = []
    for it in items:
        if not mux and not it.startswith("--"):
            raise SystemExit(f"error: --server-arg: expected --FLAG or --FLAG=VALUE, got {it!r}")
        if not mux and it.startswith("--mux-"):
            raise SystemExit(f"error: --server-arg: {it!r} is a mux flag; use --mux-arg or this script's --mux-* options")
        flag, sep, val = it.partition("=")
        out += [flag, val] if sep else [flag]
    return out


CPU_MEM_FRACTION = "0.3"


def server_flags(args: argparse.Namespace, *, context_length: int, max_running: int,
                 chunked_prefill: int = 16384) -> list[str]:
    """SGLang flags both systems get (mux flags are added by ``start_server``)."""
    flags = ["--dtype", args.dtype, "--context-length", str(context_length),
             "--max-running-requests", str(max_running), "--chunked-prefill-size", str(chunked_prefill),
             "--max-prefill-tokens", str(chunked_prefill)]
    if args.model_path:
        flags += ["--model-path", args.model_path]
    extra = extra_flags(args.server_arg)
    if "--mem-fraction-static" not in extra and not has_cuda_gpu():
        # The launcher's CPU default (0.05) leaves the default model about 9K tokens of KV; long-context runs need
        # several requests of up to 8K. Both systems get the same value.
        flags += ["--mem-fraction-static", CPU_MEM_FRACTION]
    return flags + extra


def mux_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--mux-budget", str(args.mux_budget), "--mux-page-size", str(args.mux_page_size)]
    if args.mux_mode == "drop":
        flags.append("--mux-drop-cold")
    elif args.mux_mode == "tier":
        flags += ["--mux-host-bytes", str(args.mux_host_bytes)]
    return flags + extra_flags(getattr(args, "mux_arg", []), mux=True)


def start_server(system: str, flags: list[str], args: argparse.Namespace) -> ServerProcess:
    """Start stock SGLang (torch_native) or mux on a free port; caller uses it as a context manager."""
    port = free_port()
    log = None
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        log = str(args.log_dir / f"{system}-{port}.log")
    full = flags + (mux_flags(args) if system == "mux" else [])
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    progress(f"starting {system} server on port {port}: {' '.join(full)}")
    return ServerProcess(full, stock=(system == "stock"), port=port, env=env, timeout=600, log_path=log)


def stop_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``with start_server(...)`` blocks stop their server on the way out."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- prompts
def stable_seed(*parts) -> int:
    """A seed from its parts that is the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(repr(parts).encode())


def prompt_ids(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lo, hi = PROMPT_TOKEN_RANGE
    return [rng.randint(lo, hi) for _ in range(length)]


# ------------------------------------------------------------------------------------------------ client
@dataclass
class StreamResult:
    sent: float
    times: list[float] = field(default_factory=list)  # arrival time of each chunk
    tokens: list[int] = field(default_factory=list)  # output tokens completed at that chunk
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def end(self) -> float:
        return self.times[-1]


def stream_generate(url: str, input_ids: list[int], max_new_tokens: int, *, custom_params: dict | None = None,
                    timeout: float = 3600.0) -> StreamResult:
    sp = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    if custom_params:
        sp["custom_params"] = custom_params
    res = StreamResult(sent=time.perf_counter())
    try:
        with requests.post(url + "/generate", json={"input_ids": input_ids, "sampling_params": sp, "stream": True},
                           stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {r.text[:300]}"
                return res
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:300]
                    return res
                meta = msg.get("meta_info", {})
                n = int(meta.get("completion_tokens", len(msg.get("output_ids", []))))
                if res.tokens and n <= res.tokens[-1]:
                    continue
                res.times.append(now)
                res.tokens.append(n)
                res.meta = meta
    except requests.RequestException as e:
        res.error = f"{type(e).__name__}: {e}"
    if not res.error and (not res.tokens or res.tokens[-1] < max_new_tokens):
        res.error = f"stream ended after {res.tokens[-1] if res.tokens else 0} of {max_new_tokens} tokens"
    return res


def concurrent_streams(url: str, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[StreamResult]:
    """Send every prompt at once (one thread each) and wait for all of them."""
    out: list[StreamResult | None] = [None] * len(prompts)

    def run(i: int) -> None:
        out[i] = stream_generate(url, prompts[i], max_new_tokens, **kw)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]


def at_arrivals(arrivals: list[float], run) -> float:
    """Replay a trace in real time: ``run(i)`` in a thread of its own at ``arrivals[i]`` seconds from now (sorted);
    waits for all of them and returns the seconds from the start to the last one's end."""
    t0 = time.perf_counter()
    threads = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=run, args=(i,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return time.perf_counter() - t0


def decode_time_per_token(results: list[StreamResult]) -> tuple[float, int]:
    """Seconds per decode step while every request of the batch is decoding, and the steps that covers.

    The window runs from the latest first token to the earliest last token (so no prefill of a batch member
    falls inside it); each request's rate is (tokens in window) / (time in window); the step time is the median
    over requests. For one request this is the usual TPOT: (last token time - first token time) / (tokens - 1).
    """
    w0 = max(r.times[0] for r in results)
    w1 = min(r.end for r in results)
    per_req, steps = [], []
    for r in results:
        idx = [i for i, t in enumerate(r.times) if w0 <= t <= w1]
        if len(idx) < 2:
            continue
        dt = r.times[idx[-1]] - r.times[idx[0]]
        dn = r.tokens[idx[-1]] - r.tokens[idx[0]]
        if dn > 0 and dt > 0:
            per_req.append(dt / dn)
            steps.append(dn)
    if not per_req:
        raise RuntimeError("no decode window shared by every request of the batch; ask for more output tokens")
    return statistics.median(per_req), min(steps)


def get_json(url: str, path: str, timeout: float = 60.0) -> dict:
    r = requests.get(url + path, timeout=timeout)
    r.raise_for_status()
    return r.json()


def flush_cache(url: str) -> None:
    requests.post(url + "/flush_cache", timeout=60)


def used_tokens(url: str) -> int:
    """KV tokens the allocator holds for running requests: capacity - (free + evictable radix cache)."""
    loads = get_json(url, "/v1/loads?include=core")
    return int(sum(l["num_used_tokens"] for l in loads["loads"]))


# ------------------------------------------------------------------------------------------------- model
def model_dir(args: argparse.Namespace) -> Path:
    from sglang_mux.models import default_model_path, resolve_model_path

    return Path(resolve_model_path(args.model_path) if args.model_path else default_model_path())


def kv_bytes_per_token(args: argparse.Namespace) -> int:
    cfg = json.loads((model_dir(args) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[args.dtype]


# ----------------------------------------------------------------------------------------------- results
def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = subprocess.run(["free", "-h"], capture_output=True, text=True, timeout=10).stdout.splitlines()[1]
        mem = " ".join(mem.split()[:2]).replace("Mem: ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import torch

    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_total": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_result(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    progress(f"wrote {path}")
    return path


def figure(*args, **kw):
    """``plt.subplots`` on matplotlib's Agg backend (no display needed): the first step of every plot here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def finish_axes(ax, xlabel: str, ylabel: str, *, title: str | None = None, y_from_zero: bool = True,
                legend_size=None) -> None:
    """Axis labels, the title, y from 0, a light grid and the legend: how the line plots here end."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if y_from_zero:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def k_label(n: int) -> str:
    """A token count as a tick label: ``4K`` for multiples of 1024, else the number."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def save_figure(fig, path: Path) -> None:
    """Lay out, write (PNG, 110 dpi), close, and say so: the last step of every plot here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    progress(f"wrote {path}")


def median(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}x"


def print_table(columns: list, rows) -> None:
    """A right-aligned text table on stdout: ``columns`` is a list of ``(header, width, cell)``, ``cell(row)`` the
    text (or number) of one row's entry."""
    print(" ".join(f"{head:>{width}}" for head, width, _ in columns))
    for row in rows:
        print(" ".join(f"{cell(row):>{width}}" for _, width, cell in columns))


def mux_over_stock_column(systems) -> list:
    """The ``mux/stock`` column of a table whose rows carry ``mux_over_stock``, when both systems ran."""
    return [("mux/stock", 10, lambda r: f"{r['mux_over_stock']:.2f}x")] if len(systems) == 2 else []


# ----------------------------------------------------------------------------------------------- datasets
def word_prompt(tokenizer, target_tokens: int, rng: random.Random) -> tuple[str, int]:
    """Text of random vocabulary words whose token count is ``target_tokens`` (within a word) for ``tokenizer``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_default_model import WORDS

    words: list[str] = []
    n = 0
    while n < target_tokens:
        more = max(1, int((target_tokens - n) / 2.2))
        words += [rng.choice(WORDS) for _ in range(more)]
        n = len(tokenizer.encode(" ".join(words), add_special_tokens=False))
    while n > target_tokens and len(words) > 1:  # trim a word at a time near the target
        cut = max(1, int((n - target_tokens) / 2.5))
        trial = words[:-cut]
        m = len(tokenizer.encode(" ".join(trial), add_special_tokens=False))
        if m < target_tokens:
            break
        words, n = trial, m
    return " ".join(words), n


def write_long_dataset(path: Path, *, num: int, min_tokens: int, max_tokens: int, output_tokens: int, seed: int,
                       model_path: str | Path) -> list[int]:
    """Write a ShareGPT-format file (what ``--dataset-name sharegpt`` reads) of ``num`` prompts whose lengths are
    spread evenly over [min_tokens, max_tokens] tokens; returns the prompt token counts. Deterministic."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    rng = random.Random(seed)
    records, lengths = [], []
    for i in range(num):
        target = min_tokens if num == 1 else min_tokens + (max_tokens - min_tokens) * i // (num - 1)
        text, n = word_prompt(tok, target, rng)
        answer = " ".join(["ok"] * output_tokens)
        records.append({"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]})
        lengths.append(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return lengths


def has_gpu() -> bool:
    from sglang_mux.platform import has_cuda_gpu

    return has_cuda_gpu()
