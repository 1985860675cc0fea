"""Broken inputs built from good ones for the bad-input tests: NaN weights, truncated files, foreign adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def nan_copy(src: Path, dst: Path, filename: str = "model.safetensors") -> Path:
    """A copy of the model or adapter folder ``src`` whose first tensor in ``filename`` holds one NaN."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / filename)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, dst / filename, metadata={"format": "pt"})
    return dst


def truncated_copy(src: Path, dst: Path, filename: str = "model.safetensors", keep: int = 300) -> Path:
    """A copy of ``src`` whose ``filename`` is cut to its first ``keep`` bytes (an interrupted download)."""
    shutil.copytree(src, dst)
    data = (dst / filename).read_bytes()
    (dst / filename).write_bytes(data[:keep])
    return dst


def lora_adapter(model_dir: Path, dst: Path, base: str | None = None) -> Path:
    """A LoRA adapter (q_proj, v_proj) on ``model_dir``; ``base`` rewrites the base it records."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(dst)
    if base is not None:
        cfg_path = dst / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base
        cfg_path.write_text(json.dumps(cfg))
    return dst


def other_base(model_dir: Path, dst: Path) -> Path:
    """A local base folder like ``model_dir`` but of another config (one more layer): another model."""
    shutil.copytree(model_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
