"""``python -m sglang_mux.offline_throughput``: SGLang's offline throughput benchmark with the mux plugin loaded.

SGLang's ``python -m sglang.benchmark.offline_throughput`` parses its flags before any plugin is loaded, so
``--attention-backend mux`` is not yet a valid choice there. This entry point loads the plugins first, takes our
``--mux-*`` flags off the command line (exported to the Engine's scheduler processes), and then runs SGLang's
benchmark module unchanged with the rest:

    python -m sglang_mux.offline_throughput --model-path M --dataset-path data.json \\
        --radix-cache-backend mux --attention-backend mux --mux-budget 1024 [SGLang benchmark flags]
"""

from __future__ import annotations

import os
import runpy
import sys

from sglang_mux.config import MuxConfigError, split_mux_args
from sglang_mux.launch_server import _has_flag
from sglang_mux.platform import has_cuda_gpu


def main() -> None:
    try:
        cfg, rest = split_mux_args(sys.argv[1:])
    except MuxConfigError as e:
        print(f"sglang-mux: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    cfg.export()
    if not has_cuda_gpu():
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from sglang.srt.plugins import load_plugins

    from sglang_mux.plugin import register

    load_plugins()
    register()
    if _has_flag(rest, "--radix-cache-backend") and not _has_flag(rest, "--page-size"):
        rest += ["--page-size", str(cfg.page_size)]  # mux pages are KV-pool pages
    sys.argv = [sys.argv[0], *rest]
    runpy.run_module("sglang.benchmark.offline_throughput", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
