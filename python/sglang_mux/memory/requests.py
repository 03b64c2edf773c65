"""RequestRegistry: per-request mux memory state inside one scheduler process (a RequestMemory per request id).

Filled when the scheduler accepts a request (its ``custom_params`` mux fields), read by the attention
backend at forward time (``ForwardBatch.rids``), dropped when the cache releases the request. Holds the
request's heavy-hitter page scores per layer and the positions it dropped (``--mux-drop-cold``).

Retraction: SGLang releases a retracted request's KV through the cache (which drops its state here, freeing its
tier pages and staging like a finished request's) and queues it again; :meth:`RequestRegistry.readmit` then
records its options anew, so it is prefilled and decoded again under its own budget and leaves. What belonged to
its KV (scores, summaries, dropped / demoted pages, row) is rebuilt by its new prefill.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from sglang_mux.memory.chunks import delimiter_mask, delimiter_table, page_spans_for
from sglang_mux.metrics import STATS
from sglang_mux.request_options import MuxRequestError, MuxRequestOptions, parse_request_options

logger = logging.getLogger(__name__)


@dataclass
class RequestMemory:
    options: MuxRequestOptions = field(default_factory=MuxRequestOptions)
    # [num_layers, capacity_pages] float32 page importances (SnapKV at prefill + H2O during decode)
    heavy_scores: Optional[torch.Tensor] = None
    # logical pages whose device KV was freed (drop mode); never read again
    dropped_pages: set = field(default_factory=set)
    # positions [0, protected_len) belong to the radix tree (shared), known after the cache's checkpoint;
    # drop mode never touches them (None: not known yet, drop nothing)
    protected_len: Optional[int] = None
    row: Optional[int] = None
    # False for a request whose KV arrived without an extend here (PD decode side): its summaries are
    # rebuilt from the KV at its first decode step
    summarized: bool = False
    # tiered mode: logical page -> key in the TierManager (its exact copy left the device), the page summaries
    # of those pages ([num_layers, capacity, H_kv, D], kept on the device), and the staging area
    demoted: dict = field(default_factory=dict)
    cold_kmin: Optional[torch.Tensor] = None
    cold_kmax: Optional[torch.Tensor] = None
    staging: Optional[object] = None
    # --mux-cold-bits < 16: device-resident quantized copies of demoted pages (logical page -> QuantizedPage,
    # memory/quantized_pages.py), read instead of fetching the exact copy; freed with the request
    quantized_pages: dict = field(default_factory=dict)
    quantized_bytes: int = 0  # the bytes of those copies (kept by memory/cold_pages.py as it adds and drops them)
    # keep mode: the request's completed pages' summaries, contiguous (memory/page_summaries.py
    # RequestSummaryCache); dropped on a new extend
    summary_cache: Optional[object] = None
    # set when the request cannot continue (e.g. a lower-tier page failed its checksum); the scheduler aborts it
    error: Optional[str] = None
    # ``token_delims`` (the property below) and, until its first read, how to compute it from the admitted prompt
    _token_delims: Optional[torch.Tensor] = None
    _delims_from: Optional[Callable[[], torch.Tensor]] = field(default=None, repr=False, compare=False)
    _chunk_spans: Optional[tuple] = None  # (seq_len, max_tokens, page_size, spans): one computation per step

    # --mux-layer-budget: the per-layer factors (fixed at the first routed step: for 'adaptive' they come from
    # the prefill's heavy scores) and the last step's per-layer grants
    layer_factors: Optional[list] = None
    _layer_grants: Optional[tuple] = None
    # the router policy's own per-request state (router/policies.py: signals, the current split); the memory never
    # reads it, it only lives and dies with the request
    router_state: Optional[object] = None

    def layer_grants(self, grant, factors) -> list:
        """The per-layer grants of ``grant`` (``router/layer_budget.py``); ``factors()`` is called once per
        request, the grants once per distinct grant (every layer of a step asks)."""
        if self._layer_grants is None or self._layer_grants[0] != grant:
            from sglang_mux.router.layer_budget import layer_grants

            if self.layer_factors is None:
                self.layer_factors = list(factors())
            self._layer_grants = (grant, layer_grants(grant, self.layer_factors))
        return self._layer_grants[1]

    @property
    def token_delims(self) -> Optional[torch.Tensor]:
        """Which of the tokens known at admission end a chunk (bool [prompt tokens]; memory/chunks.py), None when
        the request's tokens were not seen (PD transfer, no tokenizer): its chunks are then fixed-length. Computed
        at the first read (the chunk leaf's first step), so a request whose split has no chunk leaf never pays
        for the tokenizer's delimiter table or its prompt's mask."""
        make, self._delims_from = self._delims_from, None
        if make is not None:
            try:
                self._token_delims = make()
            except Exception:  # chunks are an optimisation: without them the chunk leaf uses fixed-length chunks
                logger.exception("mux: finding the chunks of a request failed")
        return self._token_delims

    @token_delims.setter
    def token_delims(self, delims: Optional[torch.Tensor]) -> None:
        self._delims_from, self._token_delims = None, delims

    def chunk_spans(self, seq_len: int, page_size: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's chunks as ``(first_page, last_page)`` at ``seq_len`` tokens (cached for the step: every
        layer asks)."""
        key = (seq_len, max_tokens, page_size)
        if self._chunk_spans is None or self._chunk_spans[0] != key:
            self._chunk_spans = (key, page_spans_for(self.token_delims, seq_len, page_size, max_tokens))
        return self._chunk_spans[1]

    def off_device_pages(self) -> set:
        """Pages whose device slots were given back (dropped or demoted)."""
        return self.dropped_pages | set(self.demoted)

    def scores(self, num_layers: int, num_pages: int, device) -> torch.Tensor:
        """The heavy-score table, grown to hold ``num_pages`` pages (new pages score 0)."""
        cur = self.heavy_scores
        if cur is None or cur.shape[1] < num_pages:
            cap = max(num_pages, 2 * (0 if cur is None else cur.shape[1]), 64)
            new = torch.zeros((num_layers, cap), dtype=torch.float32, device=device)
            if cur is not None:
                new[:, : cur.shape[1]] = cur
            self.heavy_scores = new
        return self.heavy_scores


class RequestRegistry:
    def __init__(self):
        self._states: dict[str, RequestMemory] = {}
        self.readmitted = 0  # retracted requests whose options were recorded again (``/mux/stats``)
        # id(tokenizer) -> (tokenizer, its delimiter table): built at the first request that reads its chunks
        self._delimiter_tables: dict[int, tuple[object, torch.Tensor]] = {}
        self._tables_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def admit(self, rid: str, custom_params, token_ids=None, tokenizer=None) -> None:
        """Record a new request's options and, given its prompt's token ids and the tokenizer, how to find where
        its chunks end (a reference to the ids; the mask is computed at the first read of ``token_delims``).
        Malformed fields were rejected at the HTTP edge; here (second line) they are logged and ignored rather
        than failing the scheduler."""
        try:
            opts = parse_request_options(custom_params)
        except MuxRequestError as e:
            logger.warning("request %s: %s; serving it with the server's mux settings", rid, e)
            opts = MuxRequestOptions()
        st = self._states[rid] = RequestMemory(options=opts)
        if token_ids is not None and tokenizer is not None:
            st._delims_from = lambda: delimiter_mask(token_ids, self.delimiter_table(tokenizer))

    def delimiter_table(self, tokenizer) -> torch.Tensor:
        """``memory/chunks.py::delimiter_table`` of ``tokenizer``, built once per tokenizer (~0.5 s for a 50K
        vocabulary) and kept for the process's later requests."""
        with self._tables_lock:
            entry = self._delimiter_tables.get(id(tokenizer))
            if entry is None or entry[0] is not tokenizer:
                entry = self._delimiter_tables[id(tokenizer)] = (tokenizer, delimiter_table(tokenizer))
            return entry[1]

    def readmit(self, rid: str, custom_params, token_ids=None, tokenizer=None) -> bool:
        """A retracted request, its KV released and the request queued again: record its options as at admission.
        A request whose state was not released (its KV row kept) keeps it; returns whether it was recorded."""
        if rid in self._states:
            return False
        self.admit(rid, custom_params, token_ids, tokenizer)
        self.readmitted += 1
        return True

    def get(self, rid: str) -> RequestMemory:
        st = self._states.get(rid)
        if st is None:  # requests that bypassed admission (e.g. warm-up, PD transfer): server defaults
            st = self._states[rid] = RequestMemory()
        return st

    def states(self):
        return list(self._states.values())

    def peek(self, rid: str) -> Optional[RequestMemory]:
        return self._states.get(rid)

    def release(self, rid: str) -> RequestMemory | None:
        st = self._states.pop(rid, None)
        STATS.device_kv_tokens_held.pop(rid, None)
        return st

    def dropped_in_row(self, row: int) -> set:
        """Logical pages whose slots the running request in req_to_token row ``row`` already gave back."""
        for st in self._states.values():
            if st.row == row and (st.dropped_pages or st.demoted):
                return st.off_device_pages()
        return set()


# One registry per scheduler process (the cache, the backend and the scheduler hooks share it).
REGISTRY = RequestRegistry()
