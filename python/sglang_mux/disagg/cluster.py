"""PDCluster: one prefill server, one decode server and sglang-router in front, started and stopped together.

    with PDCluster(common_args=["--dtype", "float32"]) as pd:        # mux on in both roles
        requests.post(pd.url + "/generate", json={...})             # the router's address
    with PDCluster(stock=True) as pd: ...                          # stock SGLang PD, same settings
                                                                   # (CPU: --mux-disable, see __init__)

Both servers are real SGLang servers (``sglang_mux.launch_server``, or stock ``sglang.launch_server``) in
``--disaggregation-mode prefill`` / ``decode``; KV crosses over SGLang's transfer engine (``mooncake_tcp`` on
a machine without a GPU, ``mooncake`` otherwise); the router is ``sglang_router.launch_router
--pd-disaggregation``. Servers start one after the other (a machine with few cores), every port is free.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

import requests

from sglang_mux.platform import has_cuda_gpu
from sglang_mux.platform.cpu_pd import CPU_TRANSFER_BACKEND, cpu_pd_flags
from sglang_mux.server_process import GenerateClient, ManagedProcess, ServerProcess, free_port


def mooncake_unavailable_reason() -> str | None:
    """None when SGLang's mooncake transfer engine and sglang-router can be used here, else why not (one line)."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as e:  # ImportError, or OSError for a missing libibverbs
        return f"mooncake transfer engine not importable ({type(e).__name__}: {e}); see docs/pd.md (install)"
    try:
        import sglang_router  # noqa: F401
    except Exception as e:
        return f"sglang-router not importable ({type(e).__name__}: {e}); pip install sglang-router"
    return None


def transfer_backend() -> str:
    return "mooncake" if has_cuda_gpu() else CPU_TRANSFER_BACKEND


def pd_server_args(mode: str, bootstrap_port: int, extra: list[str] | None = None) -> list[str]:
    """SGLang flags of one PD role: mode, transfer backend, bootstrap port (prefill), CPU workarounds."""
    args = ["--disaggregation-mode", mode, "--disaggregation-transfer-backend", transfer_backend()]
    if mode == "prefill":
        args += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
    return args + cpu_pd_flags(mode) + list(extra or [])


def router_argv(prefill_url: str, bootstrap_port: int, decode_url: str, port: int, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
        "--prefill", prefill_url, str(bootstrap_port), "--decode", decode_url,
        "--host", "127.0.0.1", "--port", str(port),
        # The router's metrics exporter listens on 29000 by default: two routers on one machine collide.
        *([] if "--prometheus-port" in (extra or []) else ["--prometheus-port", str(free_port())]),
        *(extra or []),
    ]


class RouterProcess(ManagedProcess):
    """sglang-router in PD mode on a free port; ready when a tiny /generate through it succeeds."""

    def __init__(self, argv: list[str], port: int, timeout: float = 120.0):
        self.argv, self.port, self.timeout = argv, port, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = tempfile.mktemp(prefix=f"sglang-router-{port}-", suffix=".log")

    def start(self, probe_body: dict) -> "RouterProcess":
        self._spawn(self.argv)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if requests.post(self.url + "/generate", json=probe_body, timeout=60).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"router not ready in {self.timeout}s; log tail:\n{self.log_tail()}")


PROBE = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}


class PDCluster(GenerateClient):
    """Prefill + decode + router. ``url`` is the router's; ``prefill`` / ``decode`` are the ServerProcesses."""

    def __init__(
        self,
        common_args: list[str] | None = None,
        *,
        stock: bool = False,
        prefill_args: list[str] | None = None,
        decode_args: list[str] | None = None,
        router_args: list[str] | None = None,
        timeout: float = 240.0,
        ports: dict[str, int] | None = None,
        env: dict[str, str] | None = None,
    ):
        """``ports``: optional fixed ports, keys ``prefill``, ``decode``, ``router``, ``bootstrap`` (else free ones);
        ``env``: extra environment of both servers (e.g. SGLang's ``SGLANG_DISAGGREGATION_*`` timeouts)."""
        common = list(common_args or [])
        if stock and not has_cuda_gpu():
            # Stock SGLang's PD prefill cannot run on CPU without the Mooncake patch of platform/cpu_pd.py,
            # which lives in our plugin: stock PD on CPU is SGLang's own memory and attention (--mux-disable:
            # torch_native, no mux cache) with the plugin loaded for that patch (and request validation).
            common = ["--mux-disable", *common]
            stock = False
        self.stock_memory = stock or "--mux-disable" in common
        ports = dict(ports or {})
        unknown = sorted(set(ports) - {"prefill", "decode", "router", "bootstrap"})
        if unknown:
            raise ValueError(f"ports: unknown keys {unknown}; allowed: prefill, decode, router, bootstrap")
        self.stock = stock
        self.bootstrap_port = ports.get("bootstrap") or free_port()
        self.prefill = ServerProcess(
            common + pd_server_args("prefill", self.bootstrap_port, prefill_args), stock=stock, timeout=timeout,
            port=ports.get("prefill"), env=env,
        )
        self.decode = ServerProcess(
            common + pd_server_args("decode", self.bootstrap_port, decode_args), stock=stock, timeout=timeout,
            port=ports.get("decode"), env=env,
        )
        port = ports.get("router") or free_port()
        self.router = RouterProcess(router_argv(self.prefill.url, self.bootstrap_port, self.decode.url, port, router_args), port)
        self.url = self.router.url

    def start(self) -> "PDCluster":
        try:
            self.prefill.start()
            self.decode.start()
            self.router.start(PROBE)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the router, then the decode and prefill servers; each one even when stopping another failed (a
        leftover server keeps its ports, memory and KV). The first failure is raised after all were tried."""
        first: BaseException | None = None
        for part in (self.router, self.decode, self.prefill):
            try:
                part.stop()
            except BaseException as e:  # noqa: BLE001  (re-raised below, once the rest are stopped)
                first = first or e
        if first is not None:
            raise first

    def __enter__(self) -> "PDCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
