"""The Triton kernels against their torch references (cases in `triton_cases.py`).

With CUDA: compiled, in this process. Without CUDA: Triton's CPU interpreter, which only works when
`triton.language` is first imported with it on. If this process can still do that, the kernels are loaded
here (`load_kernels(interpret=True)`, leaving TRITON_INTERPRET unset for everything else) and the cases run
in-process; if some earlier import already loaded Triton compiled, this file reruns in a fresh process with
TRITON_INTERPRET=1 and the cases' result is asserted from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from mux_kernels.triton_support import interpreter_loadable, load_kernels

HAS_CUDA = torch.cuda.is_available()
IN_PROCESS = HAS_CUDA or interpreter_loadable()
ENV_BEFORE = os.environ.get("TRITON_INTERPRET")

if IN_PROCESS:
    load_kernels(interpret=not HAS_CUDA)
    from triton_cases import *  # noqa: F401,F403,E402 - the cases become tests of this module

    def test_load_kernels_leaves_the_environment_alone():
        assert os.environ.get("TRITON_INTERPRET") == ENV_BEFORE

else:

    def test_triton_cases_in_a_fresh_interpreter_process():
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
            env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2],
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and "failed" not in proc.stdout
