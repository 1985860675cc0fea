"""LoRA extraction: exact on a low-rank fine-tune, loads in PEFT, per-module ranks by energy, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pluribus.errors import PluribusError
from pluribus.merge.extract import extract_lora
from tests.merge.conftest import tiny_model


@pytest.fixture(scope="module")
def low_rank_tune(tiny_base, tmp_path_factory):
    """The tiny base with rank-3 updates on q/up of layer 0, rank-1 on v of layer 1, and a changed norm."""
    out = tmp_path_factory.mktemp("tuned")
    sd = load_file(tiny_base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, r in (("model.layers.0.self_attn.q_proj.weight", 3), ("model.layers.0.mlp.up_proj.weight", 3),
                    ("model.layers.1.self_attn.v_proj.weight", 1)):
        d_out, d_in = sd[name].shape
        sd[name] = sd[name] + 0.05 * torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g)
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.01
    save_file(sd, out / "model.safetensors")
    (out / "config.json").write_text((tiny_base / "config.json").read_text())
    return out


def test_fixed_rank_recovers_a_low_rank_tune_and_loads_in_peft(tiny_base, low_rank_tune, tmp_path):
    from peft import PeftModel

    report = extract_lora(tiny_base, low_rank_tune, tmp_path / "lora", rank=3)
    assert report["modules"] == 3 and report["error"] < 1e-6 and report["uncaptured"] > 0
    tuned = tiny_model()
    tuned.load_state_dict({k: v for k, v in load_file(low_rank_tune / "model.safetensors").items()}, strict=False)
    sd = tuned.state_dict()
    sd["model.norm.weight"] = tiny_model().state_dict()["model.norm.weight"]  # not carried by a LoRA
    tuned.load_state_dict(sd)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "lora"))(x).logits
        torch.testing.assert_close(got, tuned(x).logits, rtol=1e-4, atol=1e-5)


def test_energy_gives_each_module_its_own_rank(tiny_base, low_rank_tune, tmp_path):
    report = extract_lora(tiny_base, low_rank_tune, tmp_path / "lora", energy=0.999999)
    assert report["ranks"]["model.layers.1.self_attn.v_proj"] == 1
    assert report["ranks"]["model.layers.0.self_attn.q_proj"] == 3
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]
    truncated = extract_lora(tiny_base, low_rank_tune, tmp_path / "lora1", rank=1)
    assert 0.1 < truncated["error"] < 1


def test_bad_input(tiny_base, low_rank_tune, tmp_path):
    with pytest.raises(PluribusError, match="exactly one of rank"):
        extract_lora(tiny_base, low_rank_tune, tmp_path / "x")
    with pytest.raises(PluribusError, match="nothing to extract"):
        extract_lora(tiny_base, tiny_base, tmp_path / "x", rank=2)
    odd = tmp_path / "odd"
    odd.mkdir()
    sd = load_file(low_rank_tune / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 30)
    save_file(sd, odd / "model.safetensors")
    with pytest.raises(PluribusError, match=r"up_proj\.weight is \(48, 32\) in '.*' but \(48, 30\) in '.*odd'"):
        extract_lora(tiny_base, odd, tmp_path / "x", rank=2)


def test_an_extracted_adapter_records_its_base_as_an_absolute_path(tiny_base, low_rank_tune, tmp_path, monkeypatch):
    import os
    from pathlib import Path

    monkeypatch.chdir(tiny_base.parent)
    extract_lora(tiny_base.name, low_rank_tune, tmp_path / "lora", rank=3)  # the base given by a relative name
    recorded = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(recorded) and Path(recorded) == tiny_base.resolve()
