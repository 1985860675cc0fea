"""The one tiny-model factory of the tests: a 2-layer random causal LM built from a config in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_causal_lm(model_type: str = "llama", *, seed: int = 0, dtype: Any = None, tokenizer: Any = None,
                   **sizes: Any) -> Any:
    """A random ``model_type`` model (2 layers, 4 heads, 2 kv heads unless ``sizes`` say otherwise), in eval mode.

    Weights are drawn in float32 from ``torch.manual_seed(seed)`` and then cast to ``dtype``, so a model is the same
    in every dtype's precision. With ``tokenizer``, the vocabulary and the bos/eos/pad ids are the tokenizer's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config: dict[str, Any] = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **sizes}
    if tokenizer is not None:
        config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        config.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    return model.to(dtype or torch.float32).eval()


def save_tiny(folder: Path, model: Any, tokenizer: Any = None) -> Path:
    """``model`` (and ``tokenizer``) saved as safetensors in ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def default_sigint() -> None:
    """For ``Popen(preexec_fn=...)``: the child takes SIGINT as Ctrl-C even when the test run itself was started
    as a background job, where the shell leaves SIGINT ignored and every child inherits that."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
