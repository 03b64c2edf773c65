"""scripts/extend_probe_context.py writes YaRN into a probe's config the way HF transformers reads it, records it
in the model card, rejects bad values with the field's name, and training drops it again (or, asked to, keeps it)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture()
def probe_copy(tmp_path):
    from sglang_mux.models import default_model_path

    dst = tmp_path / "probe"
    shutil.copytree(default_model_path(), dst)
    return dst


def test_yarn_is_written_read_by_hf_and_recorded(probe_copy):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    import extend_probe_context as E

    trained = json.loads((probe_copy / "mux_model_card.json").read_text())["context_extension"]["trained_rope"]
    theta = trained["rope_theta"]
    E.extend(probe_copy, 8.0, 3072, "first")
    E.extend(probe_copy, 2.0, 1024, "cmd")  # replaces the first; the card keeps the RoPE training ran with
    cfg = AutoConfig.from_pretrained(probe_copy)
    assert cfg.rope_parameters == {"rope_type": "yarn", "rope_theta": theta, "factor": 2.0,
                                   "original_max_position_embeddings": 1024}
    card = json.loads((probe_copy / "mux_model_card.json").read_text())
    assert card["context_extension"]["rope_parameters"] == cfg.rope_parameters and card["context_extension"]["command"] == "cmd"
    assert card["context_extension"]["trained_rope"] == trained == {"rope_theta": theta, "rope_type": "default"}
    # what HF builds from it: YaRN's attention factor on cos/sin, the fastest RoPE dimension as trained, the slowest
    # interpolated by the factor
    rotary = LlamaForCausalLM.from_pretrained(probe_copy, dtype=torch.float32).model.rotary_emb
    plain = 1.0 / theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(2.0) + 1)
    assert rotary.inv_freq[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    assert rotary.inv_freq[-1].item() == pytest.approx(plain[-1].item() / 2.0, rel=1e-5)


def test_training_drops_the_scaling(probe_copy):
    import train_probe_model as T

    import extend_probe_context as E

    E.extend(probe_copy, 4.0, 3072, "cmd")
    logged = []
    model = T.load_for_training(probe_copy, logged.append)
    assert model.config.rope_parameters["rope_type"] == "default" and "dropping RoPE scaling" in logged[0]
    assert model.model.rotary_emb.attention_scaling == 1.0


@pytest.mark.parametrize("args,field", [(["--factor", "1"], "--factor"), (["--factor", "0.5"], "--factor"),
                                        (["--original-length", "0"], "--original-length"),
                                        (["--original-length", "99999999"], "--original-length")])
def test_bad_values_name_the_field(probe_copy, args, field):
    before = (probe_copy / "config.json").read_text()
    argv = ["--model", str(probe_copy), "--original-length", "3072", *args]
    r = subprocess.run([sys.executable, str(ROOT / "scripts/extend_probe_context.py"), *argv], capture_output=True, text=True)
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (probe_copy / "config.json").read_text() == before  # nothing written


def test_missing_model_dir_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/extend_probe_context.py"), "--model", str(tmp_path / "nope"),
                        "--original-length", "3072"], capture_output=True, text=True)
    assert r.returncode == 2 and "--model" in r.stderr and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_training_can_keep_the_scaling(probe_copy):
    import train_probe_model as T

    import extend_probe_context as E

    E.extend(probe_copy, 4.0, 3072, "cmd")
    logged = []
    model = T.load_for_training(probe_copy, logged.append, keep_rope_scaling=True)
    assert model.config.rope_parameters["rope_type"] == "yarn" and "training under its RoPE scaling" in logged[0]
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_probe_model.py"), "--keep-rope-scaling", "--steps", "1",
                        "--out", str(probe_copy / "new")], capture_output=True, text=True)
    assert r.returncode == 2 and "--keep-rope-scaling" in r.stderr and "--init-from" in r.stderr
