"""The mux launcher: what it hands to SGLang, and how it refuses bad flags (at once, one line)."""

import subprocess
import sys
import time

import pytest

from sglang_mux.config import ENV_VAR, MuxConfig, MuxConfigError
from sglang_mux.launch_server import build_sglang_argv
from sglang_mux.models import default_model_path


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_mux_on_by_default_with_bundled_model_and_cpu_settings():
    env = {}
    cfg, argv = build_sglang_argv(["--port", "1234", "--mux-budget", "512"], env=env)
    assert _value(argv, "--radix-cache-backend") == "mux"
    assert _value(argv, "--attention-backend") == "mux"
    assert _value(argv, "--model-path") == default_model_path()
    assert _value(argv, "--device") == "cpu" and "--disable-cuda-graph" in argv and "--sleep-on-idle" in argv
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert MuxConfig.from_json(env[ENV_VAR]) == cfg and cfg.budget == 512


def test_default_model_is_smollm2_and_short_names_resolve(monkeypatch, tmp_path):
    import sglang_mux.models as models

    monkeypatch.delenv("MUX_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(models, "smollm2_path", lambda: "/cache/smollm2")
    _, argv = build_sglang_argv([], env={})
    assert _value(argv, "--model-path") == "/cache/smollm2"
    _, argv = build_sglang_argv(["--model-path", "tiny"], env={})
    assert argv.count("--model-path") == 1 and _value(argv, "--model-path") == models.tiny_model_path()
    _, argv = build_sglang_argv(["--model-path", "smollm2", "--mux-disable"], env={})
    assert _value(argv, "--model-path") == "/cache/smollm2"
    monkeypatch.setenv("MUX_DEFAULT_MODEL", "tiny")
    _, argv = build_sglang_argv([], env={})
    assert _value(argv, "--model-path") == models.tiny_model_path()
    _, argv = build_sglang_argv(["--model-path", str(tmp_path)], env={})  # any other path passes through
    assert _value(argv, "--model-path") == str(tmp_path)


def test_missing_default_model_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MUX_DEFAULT_MODEL", raising=False)
    monkeypatch.setenv("MUX_MODEL_CACHE", str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "sglang_mux.launch_server"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "MUX_MODEL_CACHE": str(tmp_path), "MUX_DEFAULT_MODEL": ""})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not installed" in lines[0] and "sglang_mux.models.smollm2" in lines[0]


def test_user_flags_win_and_attention_backend_becomes_inner():
    env = {}
    cfg, argv = build_sglang_argv(
        ["--model-path", "/m", "--device", "cpu", "--mem-fraction-static", "0.2", "--attention-backend", "triton"], env=env
    )
    assert argv.count("--model-path") == 1 and _value(argv, "--model-path") == "/m"
    assert _value(argv, "--mem-fraction-static") == "0.2"
    assert _value(argv, "--attention-backend") == "mux" and cfg.inner_backend == "triton"


def test_mux_disable_gives_stock_settings():
    cfg, argv = build_sglang_argv(["--mux-disable"], env={})
    assert cfg.disable
    assert "--radix-cache-backend" not in argv
    assert _value(argv, "--attention-backend") == "torch_native"


@pytest.mark.parametrize(
    "flags",
    [["--mux-budget", "-5"], ["--mux-budget", "lots"], ["--mux-page-size", "3"], ["--mux-window-tokens", "9000"],
     ["--mux-frobnicate"]],
)
def test_bad_flag_exits_at_once_with_one_line(flags):
    needle = flags[0]  # the error names the bad flag
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "sglang_mux.launch_server", *flags], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2
    assert time.time() - t0 < 30  # no model load, no server start
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("sglang-mux: error:") and needle in lines[0]


# ------------------------------------------------------------------ parallel layouts mux refuses (launch_server.check_parallelism)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--tp-size", "2"], "--tp-size 2"),
        (["--tp", "2"], "--tp-size 2"),  # SGLang's parser takes abbreviations
        (["--tensor-parallel-size=4"], "--tp-size 4"),
        (["--pp-size", "2"], "--pp-size 2"),
    ],
)
def test_tp_or_pp_above_one_is_refused_with_mux_on(flags, needle):
    with pytest.raises(MuxConfigError) as e:
        build_sglang_argv(flags, env={})
    msg = str(e.value)
    assert needle in msg and "--mux-disable" in msg and "\n" not in msg


def test_tp_from_a_config_file_is_refused(tmp_path):
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("tp-size: 2\n")
    with pytest.raises(MuxConfigError, match="--tp-size 2"):
        build_sglang_argv(["--config", str(cfg_file)], env={})


def test_parallel_layouts_mux_serves():
    _, argv = build_sglang_argv(["--tp-size", "2", "--mux-disable"], env={})  # stock tensor parallelism
    assert _value(argv, "--tp-size") == "2"
    _, argv = build_sglang_argv(["--tp-size", "1", "--pp-size", "1"], env={})
    assert _value(argv, "--radix-cache-backend") == "mux"
    _, argv = build_sglang_argv(["--dp-size", "2"], env={})  # independent replicas
    assert _value(argv, "--dp-size") == "2" and _value(argv, "--radix-cache-backend") == "mux"


def test_dp_with_a_disk_tier_is_refused(tmp_path):
    with pytest.raises(MuxConfigError, match="--dp-size 2 with --mux-disk-path"):
        build_sglang_argv(["--dp-size", "2", "--mux-disk-path", str(tmp_path), "--mux-disk-bytes", "1000000"], env={})


def test_tp_above_one_exits_at_once_with_one_line():
    p = subprocess.run(
        [sys.executable, "-m", "sglang_mux.launch_server", "--tp", "2"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("sglang-mux: error: --tp-size 2") and "--mux-disable" in lines[0]
