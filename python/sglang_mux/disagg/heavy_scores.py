"""Heavy-hitter page scores from the prefill side to the decode side, in SGLang's own PD metadata transfer.

The heavy leaf's scores come from the prefill's observation window (the attention of the last prompt
queries, SnapKV-style). The decode side cannot rebuild them from the received KV: it has the keys but not the
window's queries (recomputing those is a forward pass of the window over the whole prompt). They are small:
one float per page per layer, against ``2 * H_kv * D * P`` KV values per page per layer (1/8192 of the KV
bytes for the bundled probe at P = 16), so they are shipped.

How: SGLang's PD sends per-request metadata (first token, logprobs, ...) from a slot of ``MetadataBuffers``
on the prefill side to a slot on the decode side, for every buffer the two sides register with the transfer
engine (``get_buf_infos``). One more buffer rides along, appended last (SGLang pairs the buffers by position,
and an engine with one buffer fewer still receives the leading ones). Its slot holds, per layer, the
``SHIPPED_PAGES`` best pages of the request as ``(page index, score)`` (index -1: empty); the decode side
copies them into the request's score table when it commits the transfer, before the slot is reused.

Four named patches of SGLang behaviour (rows of the hook table in ``sglang_hooks.py``, group ``pd-heavy-scores``,
registered by ``disagg/hooks.py`` in every scheduler process; no-ops
unless the process built a mux attention backend, which calls :func:`register_local_layout`):

* ``add_heavy_score_buffer``  AFTER ``MetadataBuffers.__init__``: allocate the buffer.
* ``register_heavy_score_buffer``  AFTER ``MetadataBuffers.get_buf_infos``: append it to the registered buffers.
* ``write_heavy_scores``  AFTER ``MetadataBuffers.set_buf`` (prefill): fill the request's slot.
* ``read_heavy_scores``  BEFORE ``DecodeTransferQueue._commit_transfer_to_req`` (decode): copy the slot out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from sglang_mux.metrics import STATS
from sglang_mux.memory.requests import REGISTRY, RequestRegistry

logger = logging.getLogger(__name__)

# Pages per layer whose scores cross. A constant, not a flag: both sides must register the same slot size
# (the sender writes its own item length at the receiver's address), and the model fixes the rest. 256 pages
# are the whole prompt up to 4K tokens at P = 16; beyond, the best 256 per layer, far more than a heavy
# share of any budget keeps (the decode side's other pages start at 0 and gain decode attention as usual).
SHIPPED_PAGES = 256


@dataclass(frozen=True)
class _Layout:
    num_layers: int
    device: torch.device


_layout: Optional[_Layout] = None


def register_local_layout(num_layers: int, device) -> None:
    """Called by the mux attention backend of this process: turns the transfer of heavy scores on."""
    global _layout
    _layout = _Layout(int(num_layers), torch.device(device))


def encode_scores(table: Optional[torch.Tensor], num_layers: int, k: int = SHIPPED_PAGES) -> torch.Tensor:
    """A request's score table ``[num_layers, capacity]`` -> one slot ``[num_layers, 2, k]`` (float32, CPU):
    per layer the ``k`` best pages, row 0 their indices, row 1 their scores; -1 / 0 where empty."""
    slot = torch.full((num_layers, 2, k), -1.0, dtype=torch.float32)
    slot[:, 1] = 0.0
    if table is None or table.numel() == 0:
        return slot
    t = table[:num_layers].detach().float().cpu()
    n = min(k, t.shape[1])
    vals, idx = torch.topk(t, n, dim=1)
    keep = vals > 0  # a page never attended to carries nothing: leave it empty (it starts at 0 either way)
    slot[:, 0, :n] = torch.where(keep, idx.float(), torch.full_like(vals, -1.0))
    slot[:, 1, :n] = torch.where(keep, vals, torch.zeros_like(vals))
    return slot


def decode_scores(slot: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """A slot -> ``(layer index, page index, score)`` flattened tensors and the number of pages they need, or
    None when the slot carries no page."""
    idx, vals = slot[:, 0], slot[:, 1]
    present = idx >= 0
    if not bool(present.any()):
        return None
    layers = torch.arange(slot.shape[0]).view(-1, 1).expand_as(idx)[present]
    pages = idx[present].long()
    return layers, pages, vals[present], int(pages.max()) + 1


def restore_into(registry: RequestRegistry, rid: str, slot: torch.Tensor, num_layers: int, device) -> bool:
    """Put a received slot into the request's score table (grown as needed). True when it carried scores."""
    decoded = decode_scores(slot)
    if decoded is None:
        return False
    layers, pages, vals, need = decoded
    table = registry.get(rid).scores(num_layers, need, device)
    table[layers.to(table.device), pages.to(table.device)] = vals.to(table.device, table.dtype)
    return True


# ---------------------------------------------------------------------------- the SGLang patches
def add_heavy_score_buffer(result, self, *args, **kwargs):
    layout = _layout
    self.mux_heavy_scores = None
    if layout is None:
        return result
    size = self.output_ids.shape[0]
    self.mux_heavy_scores = torch.full(
        (size, layout.num_layers, 2, SHIPPED_PAGES), -1.0, dtype=torch.float32, device=self.output_ids.device
    )
    return result


def register_heavy_score_buffer(result, self, *args, **kwargs):
    buf = getattr(self, "mux_heavy_scores", None)
    if buf is None:
        return result
    ptrs, data_lens, item_lens = result
    return ptrs + [buf.data_ptr()], data_lens + [buf.nbytes], item_lens + [buf[0].nbytes]


def write_heavy_scores(result, self, req, *args, **kwargs):
    buf = getattr(self, "mux_heavy_scores", None)
    if buf is None:
        return result
    st = REGISTRY.peek(req.rid)
    table = st.heavy_scores if st is not None else None
    buf[req.metadata_buffer_index] = encode_scores(table, buf.shape[1]).to(buf.device)
    STATS.pd_heavy_scores_sent += table is not None
    return result


def read_heavy_scores(self, decode_req, *args, **kwargs):
    buf = getattr(self.metadata_buffers, "mux_heavy_scores", None)
    layout = _layout
    if buf is None or layout is None:
        return None
    idx = decode_req.metadata_buffer_index
    if idx is None or idx < 0:
        return None
    try:
        if restore_into(REGISTRY, decode_req.req.rid, buf[idx].clone(), layout.num_layers, layout.device):
            STATS.pd_heavy_scores_received += 1
    except Exception:  # the scores only steer the heavy leaf: serve without them rather than fail the request
        logger.exception("request %s: could not read its heavy-hitter scores", decode_req.req.rid)
    return None
