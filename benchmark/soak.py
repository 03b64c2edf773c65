"""Soak: a bounded mixed load against a tiered mux server, then a check that everything came back to idle.

    python benchmark/soak.py --minutes 3                 # starts its own server (tiny model under the tests)
    python benchmark/soak.py --minutes 60 --concurrency 6 --out benchmark/out/soak-60m
    python benchmark/soak.py --url http://127.0.0.1:30000 --server-pid PID --disk-path DIR --minutes 10

Load (loopback only; bounded by ``--minutes`` and ``--max-requests``, whichever comes first; it stops itself):
``--concurrency`` workers send a seeded mix of short and long prompts (long ones past the budget, so they are
routed and their cold pages demoted to host and disk), some sharing one of a few long prefixes, some repeating one
of a few whole long prompts (their demoted pages become prefix copies in the tiers, then are matched and loaded
back), streaming or not,
some streams cancelled mid-way by closing the connection, some carrying per-request mux fields
(``sampling_params.custom_params``: mux_budget, mux_leaves, mux_exact). Every answer is checked: HTTP 200, no
abort, exactly ``max_new_tokens`` tokens (``ignore_eos``); only the cancelled requests may end early.

Sampled every ``--sample-every`` seconds from ``/mux/stats`` and the OS: the pool's free tokens, tier bytes (all,
and those of running requests), staging bytes, requests tracked, page files in the disk folder (all, and those of
requests rather than prefix copies), the server's RSS (its process tree, psutil).

At the end, after the load drained, every counter must be back at its idle value (measured before the load):
requests tracked 0, device KV held by no request, staging bytes 0, tier bytes of requests 0 in every tier, no
request page file on disk, ``/flush_cache`` succeeds (nothing left running or queued) and the pool's free tokens
then equal the idle value; the server is alive, and no request failed except those it cancelled. Allocator leaks
hidden by that flush are caught inside the server: a launched server runs with ``--mux-debug-invariants`` (the pool
balanced after every step) and SGLang's strict idle leak check, either of which stops it (a failure here).

Writes ``soak.json`` and ``soak_memory.png`` (memory over time) to ``--out``, prints one verdict line; exit code
0 when clean, 1 on a leak or an unexpected failure, 2 on a usage or start-up error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))

PROMPT_TOKENS = (10, 500)  # plain BPE pieces of the bundled models
BUDGET = 256
LAUNCH_DEFAULTS = [
    "--dtype", "float32", "--max-running-requests", "16", "--max-total-tokens", "131072", "--log-level", "warning",
    "--mux-budget", str(BUDGET), "--mux-staging-pages", "4", "--mux-host-bytes", str(8 << 20),
    "--mux-disk-bytes", str(1 << 30), "--mux-debug-invariants",
]
MUX_FIELDS = [{"mux_budget": 128}, {"mux_budget": 1024}, {"mux_exact": True},
              {"mux_leaves": "sink=32,recent=64,heavy=32,retrieval=rest"}]


class SoakError(Exception):
    """A usage or start-up error (exit code 2)."""


# ------------------------------------------------------------------ the request mix
@dataclass
class Plan:
    idx: int
    kind: str  # short | long | shared | repeat
    input_ids: list
    max_new_tokens: int
    stream: bool
    cancel_after: int  # streaming only: close the connection after this many chunks (0: read to the end)
    custom: dict
    temperature: float

    def body(self) -> dict:
        sp = {"max_new_tokens": self.max_new_tokens, "ignore_eos": True, "temperature": self.temperature}
        if self.custom:
            sp["custom_params"] = dict(self.custom)
        return {"input_ids": self.input_ids, "sampling_params": sp, "stream": self.stream}


def shared_prefixes(seed: int, n: int = 4, length: int = 768) -> list[list[int]]:
    rng = random.Random(seed * 7919 + 1)
    return [[rng.randint(*PROMPT_TOKENS) for _ in range(length)] for _ in range(n)]


def repeated_prompts(seed: int, long_tokens: tuple[int, int], n: int = 3) -> list[list[int]]:
    rng = random.Random(seed * 104_729 + 3)
    return [[rng.randint(*PROMPT_TOKENS) for _ in range(rng.randint(*long_tokens))] for _ in range(n)]


def make_plan(idx: int, seed: int, prefixes, long_tokens: tuple[int, int], cancel_share: float,
              repeats=()) -> Plan:
    rng = random.Random(seed * 1_000_003 + idx)
    r = rng.random()
    if r < 0.3:
        kind, ids = "short", [rng.randint(*PROMPT_TOKENS) for _ in range(rng.randint(20, 200))]
        new = rng.randint(4, 24)
    elif r < 0.45 and repeats:
        kind, ids = "repeat", list(rng.choice(repeats))
        new = rng.randint(16, 48)
    elif r < 0.7:
        kind = "long"
        ids = [rng.randint(*PROMPT_TOKENS) for _ in range(rng.randint(*long_tokens))]
        new = rng.randint(16, 48)
    else:
        kind = "shared"
        suffix = rng.randint(max(16, long_tokens[0] // 4), max(32, long_tokens[1] // 2))
        ids = list(rng.choice(prefixes)) + [rng.randint(*PROMPT_TOKENS) for _ in range(suffix)]
        new = rng.randint(16, 48)
    stream = rng.random() < 0.5
    cancel = rng.randint(1, max(1, new // 2)) if stream and rng.random() < cancel_share else 0
    custom = rng.choice(MUX_FIELDS) if rng.random() < 0.3 else {}
    return Plan(idx, kind, ids, new, stream, cancel, custom, rng.choice([0.0, 0.7]))


@dataclass
class Outcome:
    idx: int
    kind: str
    stream: bool
    custom: dict
    status: str  # ok | cancelled | failed
    seconds: float
    tokens: int = 0
    error: str = ""


def send(url: str, plan: Plan, timeout: float) -> Outcome:
    t0 = time.monotonic()
    out = Outcome(plan.idx, plan.kind, plan.stream, plan.custom, "failed", 0.0)
    try:
        r = requests.post(url + "/generate", json=plan.body(), stream=plan.stream, timeout=(10, timeout))
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {r.text[:300]}"
        elif not plan.stream:
            out.tokens, out.error = _check_final(r.json(), plan)
        else:
            chunks, last = 0, None
            for line in r.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                last = json.loads(data)
                if "error" in last:
                    break
                chunks += 1
                if plan.cancel_after and chunks >= plan.cancel_after:
                    r.close()  # the client goes away mid-stream
                    out.status, out.tokens = "cancelled", chunks
                    out.seconds = time.monotonic() - t0
                    return out
            if last is None:
                out.error = "stream ended without data"
            else:
                out.tokens, out.error = _check_final(last, plan)
        if not out.error:
            out.status = "ok"
    except (requests.RequestException, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.seconds = time.monotonic() - t0
    return out


def _check_final(j: dict, plan: Plan) -> tuple[int, str]:
    if "error" in j:
        return 0, f"error: {str(j['error'])[:300]}"
    meta = j.get("meta_info", {})
    fin = meta.get("finish_reason") or {}
    n = int(meta.get("completion_tokens", len(j.get("output_ids", []))))
    if isinstance(fin, dict) and fin.get("type") == "abort":
        return n, f"aborted: {str(fin.get('message'))[:300]}"
    if n != plan.max_new_tokens:
        return n, f"{n} tokens, expected {plan.max_new_tokens}"
    return n, ""


# ------------------------------------------------------------------ sampling
def server_processes(pid: int | None):
    if not pid:
        return []
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_bytes(pid: int | None) -> tuple[int, int]:
    """(RSS of the whole process tree, of its largest process)."""
    import psutil

    sizes = []
    for p in server_processes(pid):
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def disk_files(path: str | None) -> tuple[int, int]:
    """(page files in the disk folder, those holding requests' pages rather than prefix copies)."""
    if not path or not os.path.isdir(path):
        return 0, 0
    names = [n for n in os.listdir(path) if n.startswith("page-") and n.endswith(".kv")]
    return len(names), sum(1 for n in names if "-prefix-" not in n)


def mux_stats(url: str) -> dict:
    r = requests.get(url + "/mux/stats", timeout=30)
    r.raise_for_status()
    return r.json()["mux"]


def sample(url: str, pid: int | None, disk: str | None, t0: float) -> dict:
    st = mux_stats(url)
    rss, rss_max = rss_bytes(pid)
    files, req_files = disk_files(disk)
    return {
        "t": round(time.monotonic() - t0, 2),
        "pool_free_tokens": st.get("pool_free_tokens", 0),
        "tier_bytes": dict(st.get("tier_bytes", {})),
        "tier_request_bytes": dict(st.get("tier_request_bytes", {})),
        "staging_bytes": st.get("staging_bytes", 0),
        "requests_tracked": st.get("running_requests_tracked", 0),
        "device_kv_tokens_held": sum(st.get("device_kv_tokens_held", {}).values()),
        "demoted_pages": st.get("demoted_pages", 0),
        "checksum_failures": st.get("checksum_failures", 0),
        "disk_write_failures": st.get("disk_write_failures", 0),
        "integrity_checks": st.get("integrity_checks", 0),
        "disk_files": files,
        "disk_request_files": req_files,
        "rss_bytes": rss,
        "rss_max_process_bytes": rss_max,
    }


# ------------------------------------------------------------------ the run
@dataclass
class Result:
    command: str
    url: str
    launched: bool
    minutes: float
    concurrency: int
    seed: int
    wall_seconds: float = 0.0
    load_seconds: float = 0.0
    counts: dict = field(default_factory=dict)
    by_kind: dict = field(default_factory=dict)
    idle: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    leaks: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    max_rss_bytes: int = 0
    samples: list = field(default_factory=list)
    verdict: str = ""
    ok: bool = False


def flush(url: str, deadline_s: float = 60.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if requests.post(url + "/flush_cache", timeout=30).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(1.0)
    return False


def run_load(args, url: str, pid: int | None, disk: str | None, res: Result) -> None:
    from tqdm import tqdm

    prefixes = shared_prefixes(args.seed)
    long_tokens = tuple(args.long_tokens)
    repeats = repeated_prompts(args.seed, long_tokens)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    lock = threading.Lock()
    next_idx = [0]
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def take() -> int | None:
        with lock:
            if time.monotonic() >= deadline or next_idx[0] >= args.max_requests:
                return None
            next_idx[0] += 1
            return next_idx[0] - 1

    def worker():
        while not stop.is_set():
            i = take()
            if i is None:
                return
            plan = make_plan(i, args.seed, prefixes, long_tokens, args.cancel_share, repeats)
            o = send(url, plan, args.request_timeout)
            with lock:
                outcomes.append(o)

    def sampler():
        while not stop.wait(args.sample_every):
            try:
                res.samples.append(sample(url, pid, disk, t0))
            except requests.RequestException as e:
                res.samples.append({"t": round(time.monotonic() - t0, 2), "error": str(e)[:200]})

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    samp = threading.Thread(target=sampler, daemon=True)
    for th in threads + [samp]:
        th.start()
    total = int(args.minutes * 60)
    with tqdm(total=total, unit="s", desc="soak", disable=args.quiet) as bar:
        while any(th.is_alive() for th in threads):
            time.sleep(1.0)
            bar.n = min(total, int(time.monotonic() - t0))
            with lock:
                c = Counter(o.status for o in outcomes)
            bar.set_postfix(ok=c["ok"], cancelled=c["cancelled"], failed=c["failed"], refresh=False)
            bar.refresh()
            if time.monotonic() > deadline + args.request_timeout + 60:
                break  # a worker stuck past its own timeout: counted below
    stop.set()
    hung = sum(th.is_alive() for th in threads)
    res.load_seconds = round(time.monotonic() - t0, 1)
    c = Counter(o.status for o in outcomes)
    res.counts = {"sent": next_idx[0], "ok": c["ok"], "cancelled": c["cancelled"], "failed": c["failed"],
                  "hung_workers": hung, "output_tokens": sum(o.tokens for o in outcomes if o.status == "ok")}
    kinds = Counter((o.kind, o.status) for o in outcomes)
    res.by_kind = {f"{k}/{s}": n for (k, s), n in sorted(kinds.items())}
    res.counts["streamed"] = sum(o.stream for o in outcomes)
    res.counts["with_mux_fields"] = sum(bool(o.custom) for o in outcomes)
    res.failures = [asdict(o) for o in outcomes if o.status == "failed"][:50]
    if hung:
        res.failures.append({"error": f"{hung} workers still waiting on a request after the drain deadline"})


def drain_and_check(args, url: str, pid: int | None, disk: str | None, res: Result, t0: float) -> None:
    end = time.monotonic() + args.drain_timeout
    last = None
    while time.monotonic() < end:
        try:
            last = sample(url, pid, disk, t0)
        except requests.RequestException as e:
            res.leaks.append(f"server unreachable after the load: {e}")
            return
        if last["requests_tracked"] == 0 and last["device_kv_tokens_held"] == 0 and last["staging_bytes"] == 0:
            break
        time.sleep(1.0)
    res.samples.append(last)
    idle = res.idle
    checks = [
        ("requests tracked", last["requests_tracked"], idle["requests_tracked"]),
        ("device KV tokens held by requests", last["device_kv_tokens_held"], idle["device_kv_tokens_held"]),
        ("staging bytes", last["staging_bytes"], idle["staging_bytes"]),
        ("request page files on disk", last["disk_request_files"], idle["disk_request_files"]),
    ]
    for tier in sorted(set(last["tier_request_bytes"]) | set(idle["tier_request_bytes"])):
        checks.append((f"{tier} tier bytes of requests", last["tier_request_bytes"].get(tier, 0),
                       idle["tier_request_bytes"].get(tier, 0)))
    for name, got, want in checks:
        if got != want:
            res.leaks.append(f"{name}: {got} after the load, {want} idle")
    if not flush(url):
        res.leaks.append("/flush_cache refused after the load: requests still running or queued")
    try:
        res.final = sample(url, pid, disk, t0)
    except requests.RequestException as e:
        res.leaks.append(f"server unreachable after the flush: {e}")
        return
    if res.final["pool_free_tokens"] != idle["pool_free_tokens"]:
        res.leaks.append(f"pool free tokens: {res.final['pool_free_tokens']} after the load and a flush, "
                         f"{idle['pool_free_tokens']} idle")
    if res.final["checksum_failures"]:
        res.leaks.append(f"{res.final['checksum_failures']} disk pages failed their checksum")


def plot(res: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [x for x in res.samples if x and "error" not in x]
    if not s:
        return
    t = [x["t"] / 60 for x in s]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    mib = 1 / (1 << 20)
    axes[0].plot(t, [x["rss_bytes"] * mib for x in s], label="server RSS (process tree)")
    axes[0].plot(t, [x["rss_max_process_bytes"] * mib for x in s], label="largest process")
    axes[0].set_ylabel("MiB")
    axes[1].plot(t, [x["pool_free_tokens"] for x in s], label="device pool free tokens")
    axes[1].plot(t, [x["device_kv_tokens_held"] for x in s], label="device KV tokens held by requests")
    axes[1].set_ylabel("tokens")
    for tier in sorted({k for x in s for k in x["tier_bytes"]}):
        axes[2].plot(t, [x["tier_bytes"].get(tier, 0) * mib for x in s], label=f"{tier} tier (all)")
        axes[2].plot(t, [x["tier_request_bytes"].get(tier, 0) * mib for x in s], "--",
                     label=f"{tier} tier (running requests)")
    axes[2].plot(t, [x["staging_bytes"] * mib for x in s], label="staging")
    axes[2].set_ylabel("MiB")
    axes[3].plot(t, [x["disk_files"] for x in s], label="page files on disk")
    axes[3].plot(t, [x["disk_request_files"] for x in s], label="of running requests")
    axes[3].plot(t, [x["requests_tracked"] for x in s], label="requests tracked")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    c = res.counts
    fig.suptitle(f"soak: {c.get('ok', 0)} served, {c.get('cancelled', 0)} cancelled, {c.get('failed', 0)} failed "
                 f"in {res.load_seconds / 60:.1f} min; {'clean' if res.ok else 'NOT clean'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="duration of the load (default 3)")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests too")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-tokens", type=int, nargs=2, default=[600, 2000], metavar=("MIN", "MAX"),
                    help="prompt length range of the long requests (default 600 2000; the budget is 256)")
    ap.add_argument("--cancel-share", type=float, default=0.2, help="share of streams cancelled mid-way (0.2)")
    ap.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples (default 2)")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="seconds to wait after the load for the server to be idle again")
    ap.add_argument("--url", help="soak a running server instead of starting one")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid (RSS of its process tree)")
    ap.add_argument("--disk-path", help="with --url: its --mux-disk-path (page files are counted)")
    ap.add_argument("--server-args", default="", help="extra flags for the started server (quoted)")
    ap.add_argument("--out", default="benchmark/out/soak", help="output folder (soak.json, soak_memory.png)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # kill PID stops the server it started, too
    out = Path(args.out)
    command = "python benchmark/soak.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    res = Result(command=command, url=args.url or "", launched=args.url is None, minutes=args.minutes,
                 concurrency=args.concurrency, seed=args.seed)
    t_start = time.monotonic()
    server = None
    try:
        if args.minutes <= 0 or args.concurrency < 1 or args.max_requests < 1:
            raise SoakError("--minutes, --concurrency and --max-requests must be positive")
        if not (0 <= args.cancel_share <= 1) or args.long_tokens[0] < 1 or args.long_tokens[0] > args.long_tokens[1]:
            raise SoakError("--cancel-share must be in [0, 1] and --long-tokens MIN MAX with 1 <= MIN <= MAX")
        out.mkdir(parents=True, exist_ok=True)
        disk, pid = args.disk_path, args.server_pid
        if args.url is None:
            from sglang_mux.server_process import ServerProcess

            disk = str((out / "disk").resolve())
            extra = shlex.split(args.server_args)
            try:
                server = ServerProcess(LAUNCH_DEFAULTS + ["--mux-disk-path", disk] + extra,
                                       env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", "OMP_NUM_THREADS":
                                            os.environ.get("OMP_NUM_THREADS", "1")},
                                       log_path=str(out / "server.log"), timeout=600)
                server.start()
            except (ValueError, RuntimeError, TimeoutError) as e:
                raise SoakError(f"the server did not start: {e}") from None
            res.url, pid = server.url, server.proc.pid
            res.command += f"  # server flags: {' '.join(LAUNCH_DEFAULTS + ['--mux-disk-path', disk] + extra)}"
        url = res.url
        t0 = time.monotonic()
        if not flush(url):
            raise SoakError(f"{url}: /flush_cache refused before the load (is the server idle?)")
        try:
            res.idle = sample(url, pid, disk, t0)
        except requests.RequestException as e:
            raise SoakError(f"{url}/mux/stats: {e}") from None
        run_load(args, url, pid, disk, res)
        if server is not None and not server.alive():
            res.leaks.append(f"the server died during the load; log tail:\n{server.log_tail(20)}")
        else:
            drain_and_check(args, url, pid, disk, res, t0)
            if server is not None and not server.alive():
                res.leaks.append(f"the server died; log tail:\n{server.log_tail(20)}")
    except SoakError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
    res.wall_seconds = round(time.monotonic() - t_start, 1)
    res.max_rss_bytes = max((x.get("rss_bytes", 0) for x in res.samples if x), default=0)
    unexpected = res.counts.get("failed", 0)
    res.ok = not res.leaks and unexpected == 0 and res.counts.get("ok", 0) > 0
    c = res.counts
    res.verdict = (
        f"soak {'PASS' if res.ok else 'FAIL'}: {c.get('ok', 0)} served, {c.get('cancelled', 0)} cancelled, "
        f"{unexpected} unexpected failures, {len(res.leaks)} leaks in {res.load_seconds / 60:.1f} min; "
        f"max RSS {res.max_rss_bytes / (1 << 20):.0f} MiB"
        + ("" if not res.leaks else "; " + " | ".join(l.splitlines()[0] for l in res.leaks))
        + ("" if not res.failures else f"; first failure: {res.failures[0].get('error', '')[:200]}")
    )
    (out / "soak.json").write_text(json.dumps(asdict(res), indent=1))
    plot(res, out / "soak_memory.png")
    print(res.verdict)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
