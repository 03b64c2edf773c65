"""Start and stop a real SGLang server (mux or stock) on a free port: for tests, benchmarks and examples.

    with ServerProcess(["--mux-budget", "256"]) as srv:          # python -m sglang_mux.launch_server ...
        requests.post(srv.url + "/generate", json={...})
    with ServerProcess([...], stock=True) as srv: ...           # python -m sglang.launch_server ... (CPU defaults)

The stock server gets the same CPU settings our launcher uses (torch_native, --device cpu, ...), so a
comparison differs only in what mux changes.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from sglang_mux.platform import has_cuda_gpu


# Ports handed to a child that binds them later are drawn below the kernel's ephemeral range: any outgoing
# connection (the server's own startup opens several) may otherwise take the port first, and the child's HTTP
# bind then fails while SGLang's warm-up waits 120 s on it and kills the server. SGLang draws its internal
# torch.distributed port from 22000-29999 for the same reason, so ours stay under that. (Its helper,
# sglang.srt.utils.network.get_free_port_below_ephemeral, takes a range too, but importing it loads SGLang, about
# 10 s, in every process that only starts servers.)
PORT_RANGE = (12000, 21999)


def ephemeral_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(rng: random.Random | None = None) -> int:
    """A port nothing listens on now, outside the range the kernel gives out to bind(0) and connect()."""
    rng = rng or random.Random()
    low, high = PORT_RANGE[0], min(PORT_RANGE[1], ephemeral_port_start() - 1)
    for port in rng.sample(range(low, high + 1), min(200, max(0, high - low + 1))):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # an unusual range setting (or all taken): any free port the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stock_argv(args: list[str]) -> list[str]:
    """Stock SGLang's argv with the same defaults our launcher adds (but no mux)."""
    from sglang_mux.launch_server import build_sglang_argv

    env: dict[str, str] = {}
    _, argv = build_sglang_argv(["--mux-disable", *args], env=env)
    return argv


class GenerateClient:
    """Small clients of SGLang's ``/generate`` for anything with a ``url`` (a server, or a PD cluster's router)."""

    url: str

    def generate(self, body: dict, timeout: float = 120.0) -> requests.Response:
        return requests.post(self.url + "/generate", json=body, timeout=timeout)

    def greedy_ids(self, input_ids: list[int], max_new_tokens: int, **extra) -> list[int]:
        sp = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        sp.update(extra.pop("sampling_params", {}))
        r = self.generate({"input_ids": input_ids, "sampling_params": sp, **extra})
        r.raise_for_status()
        return r.json()["output_ids"]


class ManagedProcess:
    """A child process in its own process group, logging to a file: spawn, tail its log, stop it (TERM, then KILL).
    Shared by the servers here and the PD router (``disagg/cluster.py``)."""

    proc: subprocess.Popen | None = None
    log_path: str = ""

    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    # Not reaped yet even after SIGKILL (seen once with sglang-router on a loaded machine): say so
                    # and go on, so a caller stopping several processes still stops the others.
                    print(f"warning: process group {self.proc.pid} did not exit 30 s after SIGKILL", file=sys.stderr)
        self._log.close()
        self.proc = None


class ServerProcess(ManagedProcess, GenerateClient):
    def __init__(
        self,
        args: list[str] | None = None,
        *,
        stock: bool = False,
        port: int | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 240.0,
        log_path: str | None = None,
    ):
        self.args = list(args or [])
        # The port and host are this helper's: a second --port would win inside SGLang's parser while readiness is
        # polled on ours, and the start would wait out its whole timeout.
        clash = sorted({a.split("=")[0] for a in self.args} & {"--port", "--host"})
        if clash:
            raise ValueError(f"server args: {', '.join(clash)} not allowed here; the server gets a free port on "
                             "127.0.0.1 (pass port= to choose one)")
        self.stock = stock
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = log_path or tempfile.mktemp(prefix=f"sglang-{'stock' if stock else 'mux'}-{self.port}-", suffix=".log")

    def command(self) -> list[str]:
        base = ["--port", str(self.port), "--host", "127.0.0.1", *self.args]
        if self.stock:
            return [sys.executable, "-m", "sglang.launch_server", *stock_argv(base)]
        return [sys.executable, "-m", "sglang_mux.launch_server", *base]

    def start(self) -> "ServerProcess":
        env = dict(os.environ)
        env.update(self.extra_env)
        if not has_cuda_gpu():
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        if self.stock:
            # Stock means stock: load no plugin at all (an unknown name in SGLang's whitelist loads none).
            env["SGLANG_PLUGINS"] = "__stock_sglang__"
        self._spawn(self.command(), env)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/model_info", timeout=2).status_code == 200:
                    # /model_info answers before the warm-up request finished; /health_generate waits for it.
                    if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                        return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server did not become ready in {self.timeout}s; log tail:\n{self.log_tail()}")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
