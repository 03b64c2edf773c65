"""``python -m sglang_mux.launch_pd``: prefill + decode + sglang-router, with the mux memory on in both roles.

    python -m sglang_mux.launch_pd --router-port 30000 --mux-budget 1024 --dtype float32
    python -m sglang_mux.launch_pd --stock ...                  # stock SGLang PD with the same settings
    python -m sglang_mux.launch_pd --prefill-args "--chunked-prefill-size 4096" --decode-args "--max-running-requests 64"

Every flag this module does not know goes to both servers (SGLang flags and ``--mux-*`` flags alike, as
``python -m sglang_mux.launch_server`` takes them). Without a GPU the CPU PD settings are added
(``sglang_mux/platform/cpu_pd.py``) and KV moves over ``mooncake_tcp``. Ports not given are free ones. Prints
the three addresses, serves until Ctrl-C / SIGTERM, then stops everything it started. The equivalent
commands, for starting the three processes by hand, are in docs/pd.md.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m sglang_mux.launch_pd", description=__doc__.split("\n\n")[0])
    p.add_argument("--stock", action="store_true", help="stock SGLang PD (no mux) with the same settings")
    for role in ("prefill", "decode", "router", "bootstrap"):
        p.add_argument(f"--{role}-port", type=int, default=None, help=f"{role} port (default: a free one)")
    p.add_argument("--prefill-args", default="", help="extra flags for the prefill server only (one string)")
    p.add_argument("--decode-args", default="", help="extra flags for the decode server only (one string)")
    p.add_argument("--router-args", default="", help="extra flags for sglang-router (one string)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each server may take to start")
    args, common = p.parse_known_args(argv)
    for role in ("prefill", "decode", "router", "bootstrap"):
        port = getattr(args, f"{role}_port")
        if port is not None and not 1 <= port <= 65535:
            p.error(f"--{role}-port: must be in [1, 65535], got {port}")
    return args, common


def main(argv: list[str] | None = None) -> int:
    args, common = parse_args(list(sys.argv[1:] if argv is None else argv))
    from sglang_mux.config import MuxConfigError, split_mux_args
    from sglang_mux.disagg.cluster import PDCluster, mooncake_unavailable_reason

    try:
        # validate --mux-* flags once, before anything starts (role-only flags too)
        for role_args in ([], shlex.split(args.prefill_args), shlex.split(args.decode_args)):
            cfg, _ = split_mux_args(common + role_args)
            if cfg.slo_policy != "off":  # admission acts where prefill and decode share a batch (docs/pd.md)
                raise MuxConfigError(f"--mux-slo-policy: PD servers admit through SGLang's transfer queues, only "
                                     f"'off' is allowed here (SLO admission is for aggregated servers); got {cfg.slo_policy!r}")
    except MuxConfigError as e:
        print(f"sglang-mux: error: {e}", file=sys.stderr)
        return 2
    why = mooncake_unavailable_reason()
    if why:
        print(f"sglang-mux: error: PD needs mooncake and sglang-router: {why}", file=sys.stderr)
        return 2
    ports = {r: getattr(args, f"{r}_port") for r in ("prefill", "decode", "router", "bootstrap")}
    cluster = PDCluster(
        common, stock=args.stock, prefill_args=shlex.split(args.prefill_args), decode_args=shlex.split(args.decode_args),
        router_args=shlex.split(args.router_args), timeout=args.timeout, ports={k: v for k, v in ports.items() if v},
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start()
        print(f"prefill {cluster.prefill.url} (bootstrap port {cluster.bootstrap_port}, log {cluster.prefill.log_path})")
        print(f"decode  {cluster.decode.url} (log {cluster.decode.log_path})")
        print(f"router  {cluster.url}  <- send requests here", flush=True)
        while not stop.wait(1.0):
            for name, proc in (("prefill", cluster.prefill), ("decode", cluster.decode)):
                if not proc.alive():
                    print(f"sglang-mux: {name} server exited; stopping", file=sys.stderr)
                    return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:
        print(f"sglang-mux: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
