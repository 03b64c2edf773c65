"""The mux memory's invariants, checked after every scheduler step when ``--mux-debug-invariants`` is on.

:func:`check_integrity` verifies, on explicit parts (so a test can hand it a deliberately broken state):

* **requests**: every demoted page of a tracked request has a copy in a tier (``TierManager.tier_of``), and no
  page is both dropped and demoted; a request's staging area holds at most its capacity in pages (and bytes), and
  only pages that left the device;
* **tiers**: each tier's used bytes equal the sum of its stored pages, within capacity, the index places exactly
  the pages each tier holds, the disk folder holds exactly this owner's stored pages (no file left behind), and
  every stored page is either a running request's demoted page or a reclaimable prefix copy (a copy owned by no
  one is a leak);
* **device pages**: the allocator's free list has no page twice; no page a running request still holds
  (its own pages minus those it dropped or demoted) and no radix-tree page is free, and no page is held twice;
* **conservation**: ``free + evictable + protected + session-held + sum over running requests of (own tokens -
  tokens of their pages that left the device) == pool size``: so a demoted or dropped page's slots really went
  back to the allocator (the request's row keeps the stale slot numbers, never read again), and nothing leaked.
  When no request holds KV this is SGLang's own idle check (``free + evictable + protected == total``), and the
  request-slot pool must be whole too.

A violation raises :class:`MuxIntegrityError` listing every broken invariant; raised from the scheduler hook it
stops the scheduler (and so the server) loudly. :func:`check_after_batch` is the hook (AFTER
``Scheduler.process_batch_result``, row in ``sglang_hooks.py``): it does nothing unless the flag is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from sglang_mux.memory.tier_base import TierIntegrityError

logger = logging.getLogger(__name__)


class MuxIntegrityError(RuntimeError):
    """An invariant of the mux memory does not hold (the message lists which, naming requests and pages)."""


@dataclass(frozen=True)
class RowOwner:
    """A request holding a row of ``req_to_token``: positions ``[protected_len, allocated_len)`` are its own
    (``[0, protected_len)`` belong to the radix tree)."""

    rid: str
    row: int
    allocated_len: int
    protected_len: int


@dataclass(frozen=True)
class PoolCounts:
    """The token counts SGLang's own leak check balances (``SchedulerInvariantChecker._check_full_pool``)."""

    total: int
    evictable: int = 0
    protected: int = 0
    session_held: int = 0


def _states(registry) -> list[tuple[str, object]]:
    states = getattr(registry, "_states", None)
    return list(states.items()) if isinstance(states, dict) else [(f"#{i}", st) for i, st in enumerate(registry.states())]


def check_integrity(
    *,
    registry,
    page_size: int,
    tiers=None,
    allocator=None,
    req_to_token: Optional[torch.Tensor] = None,
    owners: Iterable[RowOwner] = (),
    tree_slots: Optional[torch.Tensor] = None,
    pool: Optional[PoolCounts] = None,
    record_bytes: int = 0,
    check_files: bool = True,
) -> None:
    """Raise MuxIntegrityError if any invariant of the module docstring is broken. Parts left at None are not
    checked (``allocator`` + ``req_to_token`` for the device pages, ``pool`` for conservation)."""
    P = page_size
    problems: list[str] = []
    states = _states(registry)
    by_rid = dict(states)

    # ---------------------------------------------------------------- requests
    running_keys = set()
    for rid, st in states:
        for page, key in st.demoted.items():
            if key is None:  # adopted by the prefix cache when the request finished
                continue
            running_keys.add(key)
            if tiers is None or tiers.tier_of(key) is None:
                problems.append(f"request {rid}: demoted page {page} has no copy in any tier (key {key!r})")
        both = st.dropped_pages & set(st.demoted)
        if both:
            problems.append(f"request {rid}: pages {sorted(both)[:5]} are both dropped and demoted")
        staging = st.staging
        if staging is not None:
            staged = list(getattr(staging, "_pages", {}).keys())
            if len(staged) > staging.capacity:
                problems.append(f"request {rid}: staging holds {len(staged)} pages, capacity {staging.capacity}")
            if record_bytes and staging.nbytes() > staging.capacity * record_bytes:
                problems.append(f"request {rid}: staging holds {staging.nbytes()} bytes, more than "
                                f"{staging.capacity} pages of {record_bytes} bytes")
            stray = [p for p in staged if p not in st.demoted]
            if stray:
                problems.append(f"request {rid}: staging holds pages {stray[:5]} that never left the device")

    # ---------------------------------------------------------------- tiers
    if tiers is not None:
        try:
            tiers.check_integrity(files=check_files)
        except TierIntegrityError as e:
            problems.append(str(e))
        reclaimable = getattr(tiers, "_reclaimable", {})
        orphans = [k for k in list(getattr(tiers, "_where", {})) if k not in reclaimable and k not in running_keys]
        if orphans:
            problems.append(f"tiers hold {len(orphans)} pages of no running request (leaked), e.g. {orphans[0]!r}")

    # ---------------------------------------------------------------- device pages
    owners = list(owners)
    if allocator is not None and req_to_token is not None:
        free = allocator.get_all_free_pages()
        free = free.long().cpu() if free is not None else torch.empty(0, dtype=torch.long)
        uniq = torch.unique(free)
        if uniq.numel() != free.numel():
            problems.append(f"allocator: {free.numel() - uniq.numel()} pages are free twice (double free)")
        free_set = set(uniq.tolist())
        held: dict[int, str] = {}
        if tree_slots is not None and tree_slots.numel():
            for pg in torch.unique(tree_slots.long().cpu() // P).tolist():
                held[pg] = "the radix tree"
            in_free = free_set.intersection(held)
            if in_free:
                problems.append(f"radix tree pages {sorted(in_free)[:5]} are in the allocator's free list")
        for o in owners:
            st = by_rid.get(o.rid)
            off = st.off_device_pages() if st is not None else set()
            row = req_to_token[o.row]
            n = -(-o.allocated_len // P)
            own = [q for q in range(o.protected_len // P, n) if q not in off]
            if not own:
                continue
            phys = (row[torch.tensor(own, dtype=torch.long, device=row.device) * P].long().cpu() // P).tolist()
            for q, pg in zip(own, phys):
                if pg in free_set:
                    problems.append(f"request {o.rid}: page {q} (device page {pg}) is still read but is free")
                elif pg in held:
                    problems.append(f"request {o.rid}: page {q} (device page {pg}) is also held by {held[pg]}")
                else:
                    held[pg] = f"request {o.rid}"
            if len(problems) > 20:
                break

    # ---------------------------------------------------------------- conservation
    if allocator is not None and pool is not None:
        private = 0
        for o in owners:
            st = by_rid.get(o.rid)
            n = -(-o.allocated_len // P)
            first_own = o.protected_len // P
            off = st.off_device_pages() if st is not None else set()
            gone = sum(1 for q in off if first_own <= q < n)
            private += n * P - o.protected_len - gone * P
        available = int(allocator.available_size())
        accounted = available + pool.evictable + pool.protected + pool.session_held + private
        if accounted != pool.total:
            problems.append(
                f"device pool: free {available} + evictable {pool.evictable} + protected {pool.protected} + "
                f"session {pool.session_held} + held by {len(owners)} running requests {private} = {accounted} "
                f"tokens, pool size {pool.total} ({'leaked' if accounted < pool.total else 'counted twice'}: "
                f"{abs(pool.total - accounted)})"
            )

    if problems:
        raise MuxIntegrityError("mux memory invariants broken: " + "; ".join(problems[:20]))


# -------------------------------------------------------------------- the scheduler hook
_ENABLED: list[bool] = []


def _enabled() -> bool:
    if not _ENABLED:
        try:
            from sglang_mux.config import MuxConfig

            _ENABLED.append(MuxConfig.from_env().debug_invariants)
        except Exception:  # validated at launch; a bad environment here only means no checks
            logger.exception("mux: reading --mux-debug-invariants failed")
            _ENABLED.append(False)
    return _ENABLED[0]


def _row_owners(scheduler, batch) -> list[RowOwner]:
    """Requests holding a KV row now: those of the batch just processed, the running batch, the batch in flight
    (overlap scheduler) and the chunked-prefill request (SGLang's ``_requests_owning_rows``, plus the batch the
    hook is called with)."""
    reqs = []
    for b in (batch, getattr(scheduler, "running_batch", None), getattr(scheduler, "last_batch", None),
              getattr(scheduler, "cur_batch_for_debug", None)):
        if b is not None:
            reqs.extend(getattr(b, "reqs", None) or ())
    chunked = getattr(scheduler, "chunked_req", None)
    if chunked is not None:
        reqs.append(chunked)
    tree = getattr(scheduler, "tree_cache", None)
    try:
        session_kvs = {id(kv) for kv in tree.session_records().values()}
    except Exception:
        session_kvs = set()
    out, seen = [], set()
    for req in reqs:
        kv = getattr(req, "kv", None)
        if kv is None or id(req) in seen or not kv.holds_kv or id(kv) in session_kvs or kv.req_pool_idx is None:
            continue
        seen.add(id(req))
        out.append(RowOwner(req.rid, int(kv.req_pool_idx), int(kv.kv_allocated_len), int(kv.cache_protected_len)))
    return out


def _tree_slots(tree) -> torch.Tensor:
    """Every device slot the radix tree holds (SGLang's ``all_values_flatten`` fails on an empty tree)."""
    values, stack = [], list(tree.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.value is not None and len(node.value):
            values.append(node.value)
        stack.extend(node.children.values())
    return torch.cat(values) if values else torch.empty(0, dtype=torch.long)


def check_scheduler(scheduler, batch=None) -> None:
    """:func:`check_integrity` on a live scheduler's objects (the device checks only for a plain paged pool, not in
    PD or hybrid models)."""
    from sglang_mux.metrics import STATS
    from sglang_mux.memory.requests import REGISTRY

    tree = getattr(scheduler, "tree_cache", None)
    tiers = getattr(tree, "tiers", None)
    page_size = int(getattr(scheduler, "page_size", 0) or getattr(tree, "page_size", 1) or 1)
    plain = (
        getattr(getattr(scheduler, "disaggregation_mode", None), "name", "NULL") == "NULL"
        and not getattr(scheduler, "is_hybrid_swa", False)
        and not getattr(scheduler, "is_hybrid_ssm", False)
        and getattr(getattr(scheduler, "token_to_kv_pool_allocator", None), "get_all_free_pages", None) is not None
        and tree is not None
        and not getattr(tree, "disable", False)
    )
    kw: dict = {}
    owners: list[RowOwner] = []
    if plain:
        owners = _row_owners(scheduler, batch)
        obs = getattr(scheduler, "pool_stats_observer", None)
        session = int(obs.session_held_tokens()) if obs is not None else 0
        kw = dict(
            allocator=scheduler.token_to_kv_pool_allocator,
            req_to_token=scheduler.req_to_token_pool.req_to_token,
            owners=owners,
            tree_slots=_tree_slots(tree),
            pool=PoolCounts(total=int(getattr(getattr(scheduler, "invariant_checker", None), "max_total_num_tokens",
                                              scheduler.max_total_num_tokens)),
                            evictable=int(tree.evictable_size()),
                            protected=int(tree.protected_size()), session_held=session),
        )
    check_integrity(registry=REGISTRY, page_size=page_size, tiers=tiers,
                    record_bytes=STATS.kv_bytes_per_token * page_size, **kw)
    if plain and not owners:
        _check_idle_request_pool(scheduler)
    STATS.integrity_checks += 1


def _check_idle_request_pool(scheduler) -> None:
    """No request holds KV: every request slot is free (SGLang's ``_check_req_pool``, raising instead of warning)."""
    pool = scheduler.req_to_token_pool
    obs = getattr(scheduler, "pool_stats_observer", None)
    session = int(obs.session_held_req_count()) if obs is not None else 0
    total = int(pool.size) + int(getattr(pool, "pre_alloc_size", 0) or 0)
    free = len(pool.free_slots)
    if free + session != total:
        raise MuxIntegrityError(
            f"mux memory invariants broken: idle, but the request-slot pool has {free} free + {session} "
            f"session-held of {total} slots"
        )


def check_after_batch(result, scheduler, batch=None, *args, **kwargs):
    """AFTER ``Scheduler.process_batch_result``: with ``--mux-debug-invariants``, :func:`check_scheduler`; a
    violation is logged and raised (the scheduler stops: the server fails loudly rather than serving on)."""
    if _enabled():
        try:
            check_scheduler(scheduler, batch)
        except MuxIntegrityError:
            logger.error("sglang-mux: --mux-debug-invariants: a memory invariant is broken; stopping", exc_info=True)
            raise
    return result
