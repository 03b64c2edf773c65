"""Regenerate docs/cli.md from MuxConfig (the single source of every --mux-* flag).

    .venv/bin/python scripts/gen_cli_doc.py          # rewrite docs/cli.md
    .venv/bin/python scripts/gen_cli_doc.py --check  # exit 1 if docs/cli.md is stale (the test suite runs this)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from sglang_mux.config import MuxConfig, _flag

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

HEADER = """# Command line: the `--mux-*` flags

`python -m sglang_mux.launch_server [SGLang flags] [--mux-* flags]` accepts every SGLang 0.5.23 flag unchanged
plus the flags below (generated from `sglang_mux.config.MuxConfig` by `scripts/gen_cli_doc.py`; do not edit the
table by hand). Bad values stop the launcher at once with one line naming the flag and what is allowed, e.g.
`sglang-mux: error: --mux-page-size: must be a power of two in [1, 1024], got 24`.

Boolean flags are switches (`--mux-drop-cold`) that also take a value (`--mux-drop-cold false`).
What the launcher adds to SGLang's flags: `--radix-cache-backend mux --attention-backend mux --page-size
<--mux-page-size>` (unless `--mux-disable`), `--model-path <the default model, SmolLM2-135M-Instruct>` when none is given (short names: `smollm2`, `tiny`), and on a machine
without a GPU `--device cpu --mem-fraction-static 0.05 --disable-cuda-graph`. An `--attention-backend X` you give
becomes the backend mux wraps (`--mux-inner-backend`).

| flag | default | what it does |
|---|---|---|
"""

EXAMPLES = """
## Examples

```bash
# long-context serving with a 1024-token device-KV budget per request, 16-token pages
python -m sglang_mux.launch_server --model-path /models/llama --mux-budget 1024 --mux-page-size 16

# a fixed split across leaves: StreamingLLM-like (sinks + window only)
python -m sglang_mux.launch_server --mux-budget 1024 --mux-leaves "sink=64,recent=rest"

# really free cold KV of long requests (their own tail only)
python -m sglang_mux.launch_server --mux-budget 2048 --mux-drop-cold

# prompts of 8K tokens or more prefilled with block-sparse attention (exact below; changes prompt logprobs)
python -m sglang_mux.launch_server --mux-sparse-prefill-min-tokens 8192

# stock SGLang memory and attention, same launcher
python -m sglang_mux.launch_server --mux-disable
```

Per request, in `/generate`'s `sampling_params.custom_params` (validated; HTTP 400 naming the field when malformed):

| field | type | meaning |
|---|---|---|
| `mux_budget` | int in [1, 2^24] | this request's device-KV budget in tokens |
| `mux_leaves` | string | leaf split spec, as `--mux-leaves` |
| `mux_exact` | bool | exact full attention for this request |
| `mux_retrieval_score` | `"mass"` or `"bound"` | how the retrieval leaf ranks pages, as `--mux-retrieval-score` |
| `mux_sparse_prefill` | bool | `true`: block-sparse prefill for this prompt if it has at least `--mux-sparse-prefill-min-tokens` tokens (any length when that is 0); `false`: exact prefill |
| `mux_cold_bits` | 16, 8, 4 or 2 | precision of this request's cold pages, as `--mux-cold-bits` |
| `mux_layer_budget` | `"uniform"`, `"pyramid"` or `"adaptive"` | how its pages spread over the layers, as `--mux-layer-budget` |
| `mux_chunk_score` | `"heavy"` or `"quest"` | what ranks the chunk leaf's chunks, as `--mux-chunk-score` |
"""


def render() -> str:
    d = MuxConfig()
    rows = []
    for f in fields(MuxConfig):
        default = getattr(d, f.name)
        shown = "`''`" if default == "" else f"`{default}`"
        rows.append(f"| `{_flag(f.name)}` | {shown} | {f.metadata['help']} |")
    return HEADER + "\n".join(rows) + "\n" + EXAMPLES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run .venv/bin/python scripts/gen_cli_doc.py", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
