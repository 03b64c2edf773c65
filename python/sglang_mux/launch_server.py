"""``python -m sglang_mux.launch_server``: SGLang's server with the mux memory turned on.

Accepts every SGLang flag plus our ``--mux-*`` flags (docs/cli.md). What it adds to SGLang's command line:

* ``--radix-cache-backend mux --attention-backend mux`` unless ``--mux-disable`` (a user-given
  ``--attention-backend X`` becomes the backend that mux wraps);
* ``--model-path <the default model>`` when no model is given (SmolLM2-135M-Instruct, or ``$MUX_DEFAULT_MODEL``),
  and a short model name (``smollm2``, ``tiny``; :mod:`sglang_mux.models`) turned into its folder;
* on a machine without a GPU: ``SGLANG_USE_CPU_ENGINE=1``, ``--device cpu`` and the CPU settings that work
  (docs/install.md), each only where the user did not give that flag.
"""

from __future__ import annotations

import os
import sys

from sglang_mux.config import ENV_VAR, MuxConfig, MuxConfigError, split_mux_args
from sglang_mux.platform import has_cuda_gpu

# SGLang flags we set on CPU when the user did not: the recipe that works without a GPU.
CPU_DEFAULTS = (
    ("--device", "cpu"),
    ("--mem-fraction-static", "0.05"),
    ("--disable-cuda-graph", None),
    # SGLang's scheduler polls in a busy loop while idle (one core at 100% per server); on a CPU machine that
    # core is the one the other servers and the model need. Sleeping on idle wakes on the next request message
    # (zmq poll) and is skipped while PD transfers are pending, so only fully idle servers sleep.
    ("--sleep-on-idle", None),
)


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


# SGLang's parallelism flags (every spelling SGLang 0.5.23 accepts, abbreviations through its own parser).
PARALLEL_FLAGS = ("--tp-size", "--tensor-parallel-size", "--pp-size", "--pipeline-parallel-size",
                  "--dp-size", "--data-parallel-size")


def _parallel_sizes(args: list[str]) -> tuple[int, int, int]:
    """(tp, pp, dp) as SGLang will read them from ``args``; (1, 1, 1) without any of those flags or ``--config``.

    Parsed by SGLang's own argument parser (aliases, abbreviations such as ``--tp``, ``--config`` files), imported
    only when one of those flags may be present; a command line it cannot parse is left to SGLang to report.
    """
    given = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    if "--config" not in given and not any(
        len(f) >= 4 and any(s.startswith(f) for s in PARALLEL_FLAGS) for f in given
    ):
        return 1, 1, 1
    import argparse
    import contextlib
    import io

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            if "--config" in given:
                from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger

                args = ConfigArgumentMerger(parser).merge_config_with_args(list(args))
            ns, _ = parser.parse_known_args(["--model-path", "unused", *args])  # the user's own path wins
    except (SystemExit, ValueError, OSError):  # argparse / config-file errors: SGLang reports them at its own parse
        return 1, 1, 1
    return int(ns.tp_size), int(ns.pp_size), int(ns.dp_size)


def check_parallelism(args: list[str], cfg: MuxConfig) -> None:
    """Refuse the layouts where mux would be wrong (MuxConfigError, one line).

    * tp > 1 / pp > 1: every rank runs its own scheduler in lockstep with the others, and mux takes its route /
      drop / demote decisions in each one from what that rank sees (page scores from its own heads or layers, its
      own tier capacity). Ranks could free different KV slots, admit different requests and hang or diverge.
    * dp > 1 is served: replicas are independent schedulers (nothing they decide has to agree), but with
      ``--mux-disk-path`` they would share one folder of page files, named alike for the same prefix pages.
    """
    if cfg.disable:
        return
    tp, pp, dp = _parallel_sizes(args)
    for flag, size, what in (("--tp-size", tp, "tensor"), ("--pp-size", pp, "pipeline")):
        if size > 1:
            raise MuxConfigError(
                f"{flag} {size}: mux takes its route/drop decisions in each {what}-parallel rank separately, so "
                f"ranks could diverge; mux serves {flag} 1 only (--mux-disable serves stock {what} parallelism)"
            )
    if dp > 1 and cfg.disk_path:
        raise MuxConfigError(
            f"--dp-size {dp} with --mux-disk-path: the {dp} replicas would share one folder of page files; "
            f"run one replica per server, or no disk tier (--mux-disable serves stock data parallelism)"
        )


def build_sglang_argv(argv: list[str], env: dict | None = None) -> tuple[MuxConfig, list[str]]:
    """Turn our command line into (MuxConfig, SGLang's argv); sets the process env the children inherit.

    Pure apart from ``env`` (defaults to ``os.environ``), so it is tested without starting anything.
    """
    env = os.environ if env is None else env
    cfg, args = split_mux_args(argv)
    gpu = has_cuda_gpu()
    if not gpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        for flag, value in CPU_DEFAULTS:
            if not _has_flag(args, flag):
                args += [flag] if value is None else [flag, value]
    from sglang_mux.models import SHORT_NAMES, default_model_path, resolve_model_path

    if not _has_flag(args, "--model-path") and not _has_flag(args, "--model"):
        args += ["--model-path", default_model_path()]
    for flag in ("--model-path", "--model", "--tokenizer-path"):
        given = _flag_value(args, flag)
        if given in SHORT_NAMES:
            args = _drop_flag(args, flag) + [flag, resolve_model_path(given)]
    check_parallelism(args, cfg)
    if not cfg.disable:
        given = _flag_value(args, "--radix-cache-backend")
        if given not in (None, "mux"):
            raise MuxConfigError(
                f"--radix-cache-backend: mux is on, so it must be 'mux' (got {given!r}); pass --mux-disable to use {given!r}"
            )
        args = _drop_flag(args, "--radix-cache-backend") + ["--radix-cache-backend", "mux"]
        # Mux pages are KV-pool pages: SGLang's page size follows --mux-page-size.
        page = _flag_value(args, "--page-size")
        if page is not None and page != str(cfg.page_size):
            raise MuxConfigError(
                f"--page-size: must equal --mux-page-size ({cfg.page_size}) when mux is on, got {page}; omit it"
            )
        args = _drop_flag(args, "--page-size") + ["--page-size", str(cfg.page_size)]
        inner = _flag_value(args, "--attention-backend")
        if inner not in (None, "mux"):
            cfg = cfg.replace(inner_backend=inner)
        args = _drop_flag(args, "--attention-backend") + ["--attention-backend", "mux"]
    elif not gpu and not _has_flag(args, "--attention-backend"):
        args += ["--attention-backend", "torch_native"]
    if cfg.disk_path and not cfg.disable:
        from sglang_mux.memory.tiers import DiskTier, TierConfigError

        try:
            DiskTier.check_startup(cfg.disk_path, cfg.disk_bytes)
        except TierConfigError as e:
            raise MuxConfigError(str(e)) from None
    env[ENV_VAR] = cfg.to_env()
    return cfg, args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _, sglang_argv = build_sglang_argv(argv)
    except (MuxConfigError, FileNotFoundError) as e:
        print(f"sglang-mux: error: {e}", file=sys.stderr)
        raise SystemExit(2)

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    from sglang_mux.plugin import register

    register()  # in case SGLANG_PLUGINS excludes us: the launcher itself always needs the backends
    server_args = prepare_server_args(sglang_argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
