"""Fixtures of the merge tests: a tiny random Llama folder (no tokenizer needed) and a LoRA adapter factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_causal_lm

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny_model(seed: int = 0):
    """The merge tests' tiny Llama (``TINY``: hidden 32, untied, no tokenizer) drawn from ``seed``."""
    return tiny_causal_lm("llama", seed=seed, **TINY)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (hidden 32) saved as float32 safetensors."""
    out = tmp_path_factory.mktemp("merge-base")
    tiny_model().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_expert(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_expert(seed, scale=0.02)``: the tiny base with every tensor perturbed by scale * N(0, 1)."""
    from safetensors.torch import load_file, save_file

    def make(seed: int, scale: float = 0.02) -> Path:
        out = tmp_path_factory.mktemp(f"expert{seed}")
        sd = load_file(tiny_base / "model.safetensors")
        g = torch.Generator().manual_seed(seed)
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in sd.items()},
                  out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text((tiny_base / "config.json").read_text())
        return out

    return make


@pytest.fixture(scope="session")
def make_adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_adapter(r, alpha, targets, seed, rslora=False, **extra)``: a saved PEFT LoRA with random A and B."""
    from peft import LoraConfig, get_peft_model

    def make(r: int, alpha: float, targets: list[str], seed: int, rslora: bool = False, **extra) -> Path:
        out = tmp_path_factory.mktemp(f"lora-r{r}-s{seed}")
        model = get_peft_model(
            tiny_model(),
            LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                       base_model_name_or_path=str(tiny_base), **extra),
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(out)
        return out

    return make


def tiny_qwen2(seed: int = 0):
    """A 2-layer random Qwen2 (q/k/v have biases), its biases random too (a zero base bias would hide a lost base)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape) * 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_qwen2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random Qwen2 of :func:`tiny_qwen2` saved as float32 safetensors."""
    out = tmp_path_factory.mktemp("merge-qwen2-base")
    tiny_qwen2().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_qwen2_adapter(tiny_qwen2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_qwen2_adapter(targets, seed, r=4, alpha=8, **extra)``: a saved PEFT LoRA of the tiny Qwen2 in which
    every trainable tensor is random (LoRA factors) or randomly moved from the base (biases, modules_to_save), as
    a training with ``extra`` (``bias="all"``, ``modules_to_save=[...]``, ``lora_bias=True``) would leave it."""
    from peft import LoraConfig, get_peft_model

    def make(targets: list[str], seed: int, r: int = 4, alpha: float = 8, **extra) -> Path:
        out = tmp_path_factory.mktemp(f"qwen2-lora-s{seed}")
        qwen2 = tiny_qwen2()
        qwen2.name_or_path = str(tiny_qwen2_base)  # what PEFT records as the base
        model = get_peft_model(qwen2, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                        base_model_name_or_path=str(tiny_qwen2_base), **extra))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=g) * 0.1
                    p.copy_(noise if "lora_" in name else p + noise)
        model.save_pretrained(out)
        return out

    return make
