"""launch_pd and PDCluster command lines (no server started): roles, CPU workarounds, flag errors."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from sglang_mux import launch_pd
from sglang_mux.disagg.cluster import PDCluster, pd_server_args, router_argv
from sglang_mux.platform import has_cuda_gpu
from sglang_mux.platform.cpu_pd import cpu_pd_flags


def test_unknown_flags_go_to_both_servers_role_flags_to_one():
    args, common = launch_pd.parse_args(
        ["--router-port", "31234", "--mux-budget", "512", "--dtype", "float32", "--decode-args", "--max-running-requests 64"]
    )
    assert args.router_port == 31234 and args.decode_args == "--max-running-requests 64"
    assert common == ["--mux-budget", "512", "--dtype", "float32"]


def test_bad_port_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        launch_pd.parse_args(["--prefill-port", "70000"])
    assert e.value.code == 2
    assert "--prefill-port: must be in [1, 65535], got 70000" in capsys.readouterr().err


def test_bad_mux_flag_fails_before_anything_starts(capsys):
    assert launch_pd.main(["--mux-budget", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mux-budget" in err[0]


@pytest.mark.skipif(has_cuda_gpu(), reason="the CPU workarounds apply only without a GPU")
def test_role_args_carry_the_cpu_workarounds():
    p = pd_server_args("prefill", 34567)
    assert p[:4] == ["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mooncake_tcp"]
    assert ["--disaggregation-bootstrap-port", "34567"] == p[4:6] and "--disable-overlap-schedule" in p
    d = pd_server_args("decode", 34567)
    assert "--disaggregation-bootstrap-port" not in d
    assert d[-2:] == ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
    with pytest.raises(ValueError, match="--disaggregation-mode"):
        cpu_pd_flags("both")


def test_cluster_wires_router_to_its_servers():
    pd = PDCluster(["--dtype", "float32"], ports={"prefill": 31001, "decode": 31003, "router": 31005, "bootstrap": 31002})
    argv = pd.router.argv
    i = argv.index("--prefill")
    assert argv[i + 1 : i + 3] == ["http://127.0.0.1:31001", "31002"]
    assert argv[argv.index("--decode") + 1] == "http://127.0.0.1:31003"
    assert pd.url == "http://127.0.0.1:31005"
    assert "--disaggregation-mode" in pd.prefill.args and "prefill" in pd.prefill.args
    r = router_argv("http://a:1", 2, "http://b:3", 4)
    assert r[r.index("--port") + 1] == "4" and "--prometheus-port" in r
    with pytest.raises(ValueError, match="ports: unknown keys"):
        PDCluster(ports={"router2": 1})


def test_cluster_stop_stops_every_part_when_one_fails_to_stop():
    """A router that will not stop must not leave the prefill and decode servers running (seen: sglang-router not
    reaped in time on a loaded machine, and both servers outlived the cluster). Real processes, no servers."""
    from sglang_mux.server_process import ManagedProcess

    class Stubborn(ManagedProcess):
        def stop(self) -> None:
            raise subprocess.TimeoutExpired("router", 10)

    def sleeper(tmp: str) -> ManagedProcess:
        p = ManagedProcess()
        p.log_path = tmp
        p._spawn([sys.executable, "-c", "import time; time.sleep(600)"])
        return p

    with tempfile.TemporaryDirectory() as d:
        cluster = PDCluster.__new__(PDCluster)
        cluster.router, cluster.decode, cluster.prefill = Stubborn(), sleeper(f"{d}/d.log"), sleeper(f"{d}/p.log")
        procs = [cluster.decode.proc, cluster.prefill.proc]
        with pytest.raises(subprocess.TimeoutExpired):
            cluster.stop()
        assert all(p.poll() is not None for p in procs)  # both real processes are gone
        assert cluster.decode.proc is None and cluster.prefill.proc is None


@pytest.mark.parametrize("argv", [["--mux-slo-policy", "queue"], ["--decode-args", "--mux-slo-policy shrink"]])
def test_slo_admission_is_refused_for_pd_in_one_line(argv, capsys):
    assert launch_pd.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mux-slo-policy: PD servers admit through SGLang's transfer queues" in err[0], err
