"""PD disaggregation without a GPU: every workaround in one place, each active only when there is no CUDA GPU.

SGLang's PD path assumes a GPU in three spots (verified on SGLang 0.5.23, docs/pd.md):

* the prefill side's overlap scheduler        -> ``--disable-overlap-schedule`` on the prefill server;
* the decode side's retraction backup         -> ``--disaggregation-decode-retraction-backup cpu_tensor``;
* Mooncake's "host tensor indices" fast path  -> the prefill side copies page indices into pinned memory and
  records a CUDA event; :func:`disable_mooncake_host_tensor_indices` turns it off (plain numpy page indices,
  which every other transfer backend uses anyway).

The first two are command-line flags (:func:`cpu_pd_flags`, used by ``sglang_mux.launch_pd``); the third is a
patch of SGLang behaviour: ``_before_init_disaggregation``, a hook in the table of ``sglang_hooks.py`` (groups
``pd-cpu`` and ``pd-cpu-runtime``), registered by ``disagg/hooks.py`` only without a GPU and applied inside a
scheduler process only when it is a PD prefill.
"""

from __future__ import annotations

import logging

from sglang_mux.platform import has_cuda_gpu

logger = logging.getLogger(__name__)

# The transfer backend that moves real KV bytes over TCP and needs no RDMA device or GPU.
CPU_TRANSFER_BACKEND = "mooncake_tcp"


def cpu_pd_flags(mode: str) -> list[str]:
    """SGLang flags a PD server of role ``mode`` ('prefill' or 'decode') needs on a machine without a GPU.

    Empty on a GPU machine. Raises ValueError for another mode.
    """
    if mode not in ("prefill", "decode"):
        raise ValueError(f"--disaggregation-mode: expected 'prefill' or 'decode', got {mode!r}")
    if has_cuda_gpu():
        return []
    if mode == "prefill":
        return ["--disable-overlap-schedule"]
    return ["--disaggregation-decode-retraction-backup", "cpu_tensor"]


def disable_mooncake_host_tensor_indices() -> bool:
    """Make the Mooncake sender take numpy page indices instead of pinned tensors + a CUDA event.

    Returns True when the patch was applied (False when mooncake is not importable).
    """
    try:
        from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender
    except ImportError:
        return False
    MooncakeKVSender.supports_host_tensor_indices = False
    return True


def _before_init_disaggregation(scheduler, *args, **kwargs):
    mode = getattr(getattr(scheduler, "server_args", None), "disaggregation_mode", None)
    if mode == "prefill" and not has_cuda_gpu():
        if disable_mooncake_host_tensor_indices():
            logger.info("sglang-mux: CPU PD prefill: Mooncake host-tensor indices off")
    return None  # arguments unchanged
