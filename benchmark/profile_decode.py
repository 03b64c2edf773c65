"""Profile mux's decode step with py-spy: where the time of a batch of long-context requests goes.

    .venv/bin/python benchmark/profile_decode.py --context 8K --batch 8 --out benchmark/out/profile_decode

Starts a mux server with decode_latency.py's flags, prefills one ``--context``-token prefix, starts ``--batch``
requests of that prefix plus 32 own tokens, waits until SGLang logs a decode batch of all of them, then records
the scheduler process with py-spy (raw stack counts) for ``--seconds``. Prints the functions with the largest
share of busy samples (self and inclusive; "busy" = stacks inside a forward pass) and writes the raw profile
and a JSON summary under --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

PY_SPY = Path(sys.executable).with_name("py-spy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=C.positive_ints, default=[8192], help="context tokens per request")
    p.add_argument("--batch", type=C.positive_int, default=8)
    p.add_argument("--seconds", type=C.positive_int, default=15, help="py-spy recording time")
    p.add_argument("--output-tokens", type=C.positive_int, default=600, help="long enough to outlast the recording")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmark/out/profile_decode"))
    C.add_server_args(p, default_mode="keep")
    a = p.parse_args(argv)
    a.context = a.context[0]
    if a.context <= 32:
        p.error(f"--context: must be > 32 tokens, got {a.context}")
    if not PY_SPY.exists() and shutil.which("py-spy") is None:
        p.error("py-spy is not installed in this environment (pip install py-spy)")
    return a


def summarize(raw: Path, top: int = 15) -> dict:
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if not any("forward" in f or "run_batch" in f for f in frames):
            continue
        busy += int(n)
        self_c[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    share = lambda c: [{"frame": f, "share": n / busy} for f, n in c.most_common(top)] if busy else []  # noqa: E731
    mux_incl = collections.Counter({f: n for f, n in incl.items() if "sglang_mux" in f})
    return {"busy_samples": busy, "self": share(self_c), "inclusive_mux": share(mux_incl)}


def main(argv=None) -> int:
    a = parse_args(argv)
    C.stop_cleanly_on_sigterm()
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / "py-spy.txt"
    flags = C.server_flags(a, context_length=a.context + a.output_tokens + 64, max_running=a.batch,
                           chunked_prefill=a.context + 256)
    with C.start_server("mux", flags, a) as srv:
        prefix = C.prompt_ids(a.context - 32, C.stable_seed(a.seed, "profile"))
        C.stream_generate(srv.url, prefix, 1)
        prompts = [prefix + C.prompt_ids(32, C.stable_seed(a.seed, "profile", i)) for i in range(a.batch)]
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(r=C.concurrent_streams(srv.url, prompts, a.output_tokens)),
                              daemon=True)
        th.start()
        marker = f"Decode batch, #running-req: {a.batch}"
        while marker not in Path(srv.log_path).read_text(errors="replace"):
            if not th.is_alive():
                raise SystemExit("error: the batch finished before all requests decoded together; raise --output-tokens")
            time.sleep(1)
        pids = subprocess.run(["pgrep", "-g", str(srv.proc.pid), "-f", "sglang::scheduler"], capture_output=True,
                              text=True).stdout.split()
        if not pids:
            raise SystemExit("error: no scheduler process found under the server")
        C.progress(f"recording scheduler {pids[0]} for {a.seconds}s")
        spy = str(PY_SPY) if PY_SPY.exists() else "py-spy"
        subprocess.run([spy, "record", "--pid", pids[0], "--duration", str(a.seconds), "--rate", "100",
                        "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
        th.join()
    res = box.get("r") or []
    summary = {"benchmark": "profile_decode", "machine": C.machine_info(), "context": a.context, "batch": a.batch,
               **summarize(raw)}
    if res and not any(r.error for r in res):
        summary["tpot_s"] = C.decode_time_per_token(res)[0]
    C.write_result(a.out, "profile_decode", summary)
    for kind in ("self", "inclusive_mux"):
        print(f"-- {kind} (share of {summary['busy_samples']} busy samples)")
        for row in summary[kind]:
            print(f"{row['share']:6.1%}  {row['frame']}")
    print(f"SUMMARY profile_decode | context {a.context} batch {a.batch}: {summary['busy_samples']} busy samples; "
          f"top mux frame: {summary['inclusive_mux'][0]['frame'] if summary['inclusive_mux'] else 'n/a'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
