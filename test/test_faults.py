"""Faults: the mux memory under a killed server, a full disk and a corrupt page, and its invariant checker.

In-process, on SGLang's real pool objects (as test/test_leaf_matrix.py builds them):
* ``check_integrity`` accepts a consistent tiered state and names each deliberately broken invariant;
* disk full while serving (OSError(ENOSPC) injected at the one place page files are written): demoted pages stay
  on the host or on the device, the routed step's output is still exact, ``disk_write_failures`` counts it, and
  demotion to disk resumes once the disk takes writes again;
* a disk folder shared by a live process and a killed one: a new tier removes only the dead one's page files.

With servers (marked ``server``; every one runs with ``--mux-debug-invariants``):
* crash: ``kill -9`` of a server's process group while long requests stream and pages sit on disk: the client gets
  a connection error within bounded time (no hang), and the next server on the same folder removes the dead
  server's page files and serves;
* a corrupt page on disk while its request needs it: that request fails with an error naming the page file,
  never a silent wrong answer; a request running beside it and later requests are served.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from cpu_pools import paged_allocator
from mux_test_support import wait_for
from test_routed_decode import HKV, HQ, D, decode_request, make_backend, ref_attention

from sglang_mux.attention.routed_decode import page_positions
from sglang_mux.config import MuxConfig
from sglang_mux.memory.integrity import MuxIntegrityError, PoolCounts, RowOwner, check_integrity
from sglang_mux.memory.staging import StagingArea
from sglang_mux.memory.tiers import DiskTier, TierManager
from sglang_mux.metrics import STATS

P, L = 8, 300  # 38 pages, the last one partial
REC = 2 * P * HKV * D * 4  # one page record: one layer, K and V, float32


# ------------------------------------------------------------------ an in-process tiered request on real pools
def tiered_request(tiers: TierManager, seed: int = 0) -> SimpleNamespace:
    """One routed request (row 1, L tokens, all its own) on a real paged allocator whose other pages are free; its
    first decode step is planned (cold pages demoted into ``tiers``)."""
    cfg = MuxConfig(budget=64, page_size=P, leaves="sink=16,recent=16,heavy=16,retrieval=rest", host_bytes=1 << 20,
                    missing_page="wait")
    be, layer, kv, r2t, slots = make_backend(cfg, L, seed=seed)
    k_all, v_all = kv.get_key_buffer(0)[slots].clone(), kv.get_value_buffer(0)[slots].clone()
    alloc = paged_allocator(kv, 4096, P)
    every = alloc.alloc(alloc.available_size()).long()
    mine = set((slots // P).tolist())
    alloc.free(every[~torch.isin(every // P, torch.tensor(sorted(mine)))])
    be.cold.allocator = alloc
    be.cold.tiers = be.tiers = tiers
    st, fb, g = decode_request(be, L, seed=100 + seed)
    ns = SimpleNamespace(be=be, layer=layer, kv=kv, r2t=r2t, slots=slots, k_all=k_all, v_all=v_all, alloc=alloc,
                         st=st, fb=fb, g=g, tiers=tiers)
    step(ns)
    return ns


def step(ns) -> None:
    """Plan a decode step (demotes what it can), then poison the slots given back, as another request would."""
    ns.be._plan_step(ns.fb)
    for page in ns.st.off_device_pages():
        ns.kv.get_key_buffer(0)[ns.slots[page * P : (page + 1) * P]] = 1e4
        ns.kv.get_value_buffer(0)[ns.slots[page * P : (page + 1) * P]] = -1e4


def assert_routed_step_exact(ns) -> None:
    """The routed step's output == float64 attention over the original K/V of the pages the leaves chose."""
    (p,) = ns.be._plan
    q = torch.randn(1, HQ * D, generator=ns.g)
    pages, *_ = ns.be.planner.select(p, 0, q.view(HQ, D), ns.r2t.req_to_token[1], ns.layer.scaling)
    assert set(pages.tolist()) & set(ns.st.demoted), "the step should read some demoted pages"
    out = ns.be._routed_decode(q, ns.layer, ns.be._plan)
    assert ns.st.error is None, ns.st.error
    positions = page_positions(pages, L, P)
    want = ref_attention(q.view(HQ, D), ns.k_all[positions], ns.v_all[positions], ns.layer.scaling)
    torch.testing.assert_close(out.view(HQ, D).double(), want, rtol=1e-5, atol=1e-5)


def integrity(ns, **over) -> None:
    kw = dict(registry=ns.be.registry, page_size=P, tiers=ns.tiers, allocator=ns.alloc,
              req_to_token=ns.r2t.req_to_token, owners=[RowOwner("r", 1, L, 0)], pool=PoolCounts(total=4096),
              record_bytes=REC)
    kw.update(over)
    check_integrity(**kw)


# ------------------------------------------------------------------ the invariant checker on broken states
def test_check_integrity_accepts_a_consistent_tiered_state(tmp_path):
    ns = tiered_request(TierManager(host_bytes=4 * REC, disk_path=str(tmp_path), disk_bytes=1 << 20))
    assert ns.st.demoted and ns.tiers.bytes_by_tier()["disk"] > 0
    assert ns.tiers.request_bytes == ns.tiers.bytes_by_tier()  # all of it belongs to the running request
    integrity(ns)
    assert_routed_step_exact(ns)  # staging now holds fetched pages: still consistent
    integrity(ns)


def _broken(ns, what: str):
    """Break one invariant of the consistent state ``ns``; returns extra check_integrity arguments."""
    st, tiers = ns.st, ns.tiers
    page, key = next(iter(st.demoted.items()))
    if what == "demoted page without a tier copy":
        tiers.evict(key)
    elif what == "device page still read but free":
        q = next(q for q in range(L // P) if q not in st.off_device_pages())
        ns.alloc.free(ns.slots[q * P : (q + 1) * P])
    elif what == "demoted slots not given back":
        return {"pool": PoolCounts(total=4096 + 3 * P)}  # as if 3 pages' slots never came back to the allocator
    elif what == "tier bytes differ from their pages":
        tiers.host._used += 1
    elif what == "tier page of no request":
        tiers.demote(("gone-request", 7), torch.zeros(1, 2, P, HKV, D))
    elif what == "page file left behind":
        (tiers.disk.path / f"page-{tiers.disk.owner}-gone-3.kv").write_bytes(b"x")
    elif what == "staging over capacity":
        st.staging = StagingArea(1, "cpu")
        st.staging._pages.update({p: tiers.get(k) for p, k in list(st.demoted.items())[:2]})
    elif what == "tree page free":
        q = next(q for q in range(L // P) if q in st.off_device_pages())
        return {"tree_slots": ns.slots[q * P : (q + 1) * P]}  # a freed page claimed by the tree
    elif what == "dropped and demoted":
        st.dropped_pages.add(page)
    elif what == "request bytes miscounted":
        tiers.request_bytes["host"] += REC
    return {}


BROKEN = {
    "demoted page without a tier copy": "has no copy in any tier",
    "device page still read but free": "is still read but is free",
    "demoted slots not given back": "leaked",
    "tier bytes differ from their pages": "host tier: used bytes",
    "tier page of no request": "of no running request",
    "page file left behind": "left behind",
    "staging over capacity": "staging holds 2 pages, capacity 1",
    "tree page free": "radix tree pages",
    "dropped and demoted": "both dropped and demoted",
    "request bytes miscounted": "request bytes by tier",
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_check_integrity_names_each_broken_invariant(tmp_path, what):
    ns = tiered_request(TierManager(host_bytes=4 * REC, disk_path=str(tmp_path), disk_bytes=1 << 20))
    integrity(ns)
    extra = _broken(ns, what)
    with pytest.raises(MuxIntegrityError, match=BROKEN[what]):
        integrity(ns, **extra)


# ------------------------------------------------------------------ disk full while serving
def test_disk_full_keeps_pages_above_output_exact_and_counts(tmp_path, monkeypatch):
    def no_space(f, header, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(DiskTier, "_write_file", staticmethod(no_space))
    before = STATS.disk_write_failures
    tiers = TierManager(host_bytes=3 * REC, disk_path=str(tmp_path), disk_bytes=1 << 20)
    ns = tiered_request(tiers)
    # the host took 3 pages; spilling its oldest to disk failed, so that one stayed on the host, and every other
    # cold page stayed on the device
    assert STATS.disk_write_failures == before + 1 and tiers.disk.write_failures == 1
    assert tiers.bytes_by_tier() == {"host": 3 * REC, "disk": 0} and len(ns.st.demoted) == 3
    assert all(tiers.tier_of(k) == "host" for k in ns.st.demoted.values())
    assert not list(tmp_path.glob("page-*.kv"))
    integrity(ns)
    assert_routed_step_exact(ns)
    # the next step does not hammer the full disk (writes pause for WRITE_RETRY_S)
    step(ns)
    assert tiers.disk.write_failures == 1 and len(ns.st.demoted) == 3
    # the disk takes writes again: demotion goes on through it, output still exact, nothing lost
    monkeypatch.undo()
    tiers.disk._write_paused_until = 0.0
    step(ns)
    assert len(ns.st.demoted) > 3 and tiers.bytes_by_tier()["disk"] > 0
    integrity(ns)
    assert_routed_step_exact(ns)
    integrity(ns)


# ------------------------------------------------------------------ a folder shared by a live and a dead owner
_HOLDER = textwrap.dedent("""
    import sys, time, torch
    from sglang_mux.memory.tiers import DiskTier
    d = DiskTier(sys.argv[1], 1 << 20)
    for i in range(3):
        assert d.put(("req", i), torch.full((1, 2, 4, 2, 8), float(i)))
    print("ready", flush=True)
    time.sleep(600)
""")


def _holder(path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_shared_disk_folder_cleanup_spares_live_owners_and_removes_killed_ones(tmp_path):
    live, dead = _holder(tmp_path), _holder(tmp_path)
    try:
        assert len(list(tmp_path.glob("page-*.kv"))) == 6
        assert DiskTier(str(tmp_path), 1 << 20).stale_removed == 0  # both owners alive: nothing touched
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        before = STATS.disk_stale_files_removed
        d = DiskTier(str(tmp_path), 1 << 20)
        assert d.stale_removed == 3 and STATS.disk_stale_files_removed == before + 3
        left = list(tmp_path.glob("page-*.kv"))
        assert len(left) == 3 and all(f.name.startswith(f"page-{live.pid}.") for f in left)
        assert not list(tmp_path.glob(f"owner-{dead.pid}.*.lock"))
        d.check_integrity(files=True)
    finally:
        for proc in (live, dead):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


# ------------------------------------------------------------------ with servers
BUDGET, PAGE = 256, 16


def fault_server_args(disk: Path, staging_pages: int = 4) -> list[str]:
    from mux_test_support import SERVER_COMMON

    # a host tier of a few pages, so routed requests' cold pages reach the disk at once
    return SERVER_COMMON + ["--mux-budget", str(BUDGET), "--mux-host-bytes", str(1 << 20), "--mux-disk-path", str(disk),
                            "--mux-disk-bytes", str(1 << 30), "--mux-staging-pages", str(staging_pages),
                            "--mux-debug-invariants"]


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (n,), generator=g).tolist()


def body(ids, n, **extra) -> dict:
    return {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}, **extra}


def request_files(disk: Path, rid: str = "") -> list[Path]:
    return [f for f in disk.glob("page-*.kv") if "-prefix-" not in f.name and (not rid or f"-{rid}-" in f.name)]


@pytest.mark.server
def test_kill_9_mid_stream_gives_a_clean_client_error_and_the_next_start_cleans_the_disk(tmp_path):
    from sglang_mux.server_process import ServerProcess

    disk = tmp_path / "disk"
    srv = ServerProcess(fault_server_args(disk)).start()
    outcomes: dict[int, object] = {}

    def stream(i: int) -> None:
        try:
            with requests.post(srv.url + "/generate", json=body(prompt(1500, i), 3000, stream=True), stream=True,
                               timeout=(10, 30)) as r:
                for _ in r.iter_lines():
                    pass
            outcomes[i] = "finished"
        except requests.RequestException as e:
            outcomes[i] = e

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    try:
        for th in threads:
            th.start()
        wait_for(lambda: request_files(disk), 300, "request pages on disk")
        os.killpg(srv.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        for th in threads:
            th.join(timeout=60)
        assert not any(th.is_alive() for th in threads), "a client hung after the server was killed"
        assert time.monotonic() - t_kill < 60
        assert all(isinstance(o, requests.RequestException) for o in outcomes.values()), outcomes
        assert len(outcomes) == 2
    finally:
        srv.stop()
    dead_files, dead_locks = set(disk.glob("page-*.kv")), set(disk.glob("owner-*.lock"))
    assert request_files(disk) and dead_locks  # kill -9 cleaned nothing up

    with ServerProcess(fault_server_args(disk)) as srv2:
        assert not any(f.exists() for f in dead_files | dead_locks)
        st = requests.get(srv2.url + "/mux/stats", timeout=30).json()["mux"]
        assert st["disk_stale_files_removed"] == len(dead_files)
        r = srv2.generate(body(prompt(1500, 7), 24))
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 24
        assert requests.get(srv2.url + "/mux/stats", timeout=30).json()["mux"]["demoted_pages"] > 0


def _flip_bytes(f: Path) -> bool:
    """Flip the last payload bytes of a complete page file, in place; False if it is not there (any more)."""
    try:
        with open(f, "r+b") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if size < 64:
                return False
            fh.seek(size - 8)
            data = fh.read(8)
            fh.seek(size - 8)
            fh.write(bytes(b ^ 0xFF for b in data))
        return True
    except OSError:
        return False


@pytest.mark.server
def test_corrupt_disk_page_fails_its_request_naming_the_page_and_others_go_on(tmp_path):
    from sglang_mux.server_process import ServerProcess

    disk = tmp_path / "disk"
    # one staging page: a request's demoted pages are read back from the tiers step after step
    with ServerProcess(fault_server_args(disk, staging_pages=1)) as srv:
        other_ids = prompt(1200, 2)
        want_other = srv.generate(body(other_ids, 40)).json()["output_ids"]
        replies: dict[str, requests.Response] = {}

        def post(name, b):
            replies[name] = srv.generate(b, timeout=300)

        victim = threading.Thread(target=post, args=("victim", body(prompt(1500, 1), 1500, rid="victim-1")))
        victim.start()
        files = wait_for(lambda: request_files(disk, "victim-1"), 120, "the victim's pages on disk")
        bystander = threading.Thread(target=post, args=("other", body(other_ids, 40)))
        bystander.start()
        flipped = [f.name for f in files if _flip_bytes(f)]
        assert flipped
        victim.join(timeout=300)
        bystander.join(timeout=300)
        assert not victim.is_alive() and not bystander.is_alive()

        bad = replies["victim"]
        text = bad.text
        if bad.status_code == 200:  # an abort reported in the answer itself
            fin = bad.json()["meta_info"]["finish_reason"]
            assert fin["type"] == "abort", f"a corrupt page must never give an answer: {fin}"
            text = str(fin)
        else:
            assert bad.status_code >= 400
        assert "checksum mismatch" in text and any(name in text for name in flipped), text
        ok = replies["other"]
        assert ok.status_code == 200 and ok.json()["output_ids"] == want_other
        # the server goes on: a new routed request is served, the failure is counted, nothing of the victim is left
        r = srv.generate(body(prompt(1500, 3), 24))
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 24
        st = requests.get(srv.url + "/mux/stats", timeout=30).json()["mux"]
        assert st["checksum_failures"] >= 1 and st["integrity_checks"] > 0
        assert not request_files(disk, "victim-1") and st["running_requests_tracked"] == 0


def test_adopting_a_page_whose_prefix_copy_exists_leaves_no_orphan():
    """A finished request's demoted page is re-keyed to its prefix hash; when an earlier identical prompt already
    left that prefix page in the tiers, the request's copy must go (the invariant checker found it orphaned)."""
    m = TierManager(host_bytes=1 << 20)
    page = torch.ones(1, 2, P, HKV, D)
    assert m.demote(("prefix", 1), page, reclaimable=True) == "host"
    assert m.demote(("req-b", 5), page) == "host"
    assert m.rename(("req-b", 5), ("prefix", 1))
    assert m.tier_of(("req-b", 5)) is None and m.request_bytes == {"host": 0}
    m.check_integrity()


def test_a_corrupt_page_is_not_adopted_as_a_prefix_copy(tmp_path):
    """A finished (here: aborted) request's demoted page that fails its checksum is dropped, not re-keyed into
    the prefix cache, and its release goes on (it used to raise out of the cache's release)."""
    m = TierManager(host_bytes=0, disk_path=str(tmp_path), disk_bytes=1 << 20)
    assert m.demote(("req-c", 3), torch.ones(1, 2, P, HKV, D)) == "disk"
    (f,) = list(tmp_path.glob("page-*.kv"))
    assert _flip_bytes(f)
    assert m.rename(("req-c", 3), ("prefix", 9)) is False
    assert m.tier_of(("req-c", 3)) is None and m.tier_of(("prefix", 9)) is None and not f.exists()
    m.check_integrity(files=True)
