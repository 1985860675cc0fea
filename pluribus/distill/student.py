"""The student: the base model loaded for training (QLoRA when asked), its LoRA targets, adapter and kernels."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pluribus.config import TrainConfig
from pluribus.errors import PluribusError


def load_student(
    cfg: TrainConfig, *, head: str = "causal", trust_remote_code: bool = False, seed: int = 0, device: Any = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Load the student (``head`` causal or token-cls with one logit) in bf16, or 4-bit NF4 for QLoRA.

    ``device`` (``pluribus.device.training_device``; None: auto) picks the dtype (bf16 where it computes it,
    else float32) and where the model is placed (a bare ``cuda``: this process's GPU, LOCAL_RANK), before the
    kernels are patched and the attention chosen, which look at where it is; the Trainer, told the same device
    (``loop.training_arguments``), keeps it there. Under FSDP or DeepSpeed the engine places it.

    The tokenizer gets a pad token (eos) when it has none and pads on the right (training). The global RNG is
    seeded with ``seed`` first: the new score head and the LoRA A matrices are drawn from it, so one recipe
    gives one initial adapter whatever ran before in the process (the Trainer seeds only later). ``progress``: the
    bar of a first dequantization of a GGUF model (``pluribus.models.resolve_model``).
    """
    import os

    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from pluribus import device as devices
    from pluribus.models import load_tokenizer, resolve_model
    from pluribus.weights import check_finite_model

    set_seed(seed)
    device = devices.resolve(device) if device is None or isinstance(device, str) else device
    if device.type == "cuda" and device.index is None:  # where the Trainer trains this process: its rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    folder = resolve_model(cfg.model, progress=progress)
    kwargs = _load_kwargs(cfg, device, trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if head == "causal":
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    else:
        model = score_head_model(folder, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    check_finite_model(model, folder)
    # FSDP / DeepSpeed shard the model from the CPU themselves: a whole copy on each GPU first could not fit
    sharded = any(os.environ.get(v, "false").lower() == "true" for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if cfg.lora.quantize != "nf4" and not sharded:
        model = devices.place(model, device)
    if cfg.lora.quantize == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.use_cache = False
    return model, tokenizer


def _load_kwargs(cfg: TrainConfig, device: Any, trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained``'s arguments for the student: its dtype on ``device``, safetensors, SDPA attention, and
    for QLoRA (``train.lora.quantize=nf4``) the 4-bit config, loaded on ``device`` (4-bit weights cannot move)."""
    from pluribus import device as devices

    kwargs: dict[str, Any] = {
        "dtype": devices.dtype_for(device, "bfloat16" if cfg.bf16 else "float32"),
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": "sdpa",
    }
    if cfg.lora.quantize == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PluribusError(
                "train.lora.quantize=nf4 (QLoRA) needs bitsandbytes: run `pip install 'bitsandbytes>=0.45'`"
            ) from None
        from pluribus.models import nf4_config

        kwargs["quantization_config"] = nf4_config("nf4")
        kwargs["device_map"] = {"": str(device)}  # 4-bit weights load where they train (they cannot be moved)
    return kwargs


def score_head_model(folder: str | Path, **kwargs: Any) -> Any:
    """The base as a token classifier with one logit (the PRM), without transformers' report of the new head."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    # the score head is new by design: the load report listing its weights as MISSING is no news to the user
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForTokenClassification.from_pretrained(folder, num_labels=1, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def linear_module_names(model: Any) -> list[str]:
    """Distinct suffix names of the model's linear layers (incl. 4-bit ones), e.g. ['down_proj', 'q_proj', ...]."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: Any, targets: str | Sequence[str]) -> str | list[str]:
    """'all-linear' as is; a list is checked against the model's linear layers (a PluribusError lists them)."""
    if targets == "all-linear":
        return "all-linear"
    available = linear_module_names(model)
    matched = [t for t in targets if any(n == t or re.fullmatch(t, n) for n in available)]
    unmatched = [t for t in targets if t not in matched]
    if not matched or unmatched:
        raise PluribusError(
            f"train.lora.target_modules {list(unmatched or targets)} match no linear layer of this model; "
            f"its linear modules are {available} (or use 'all-linear')"
        )
    return list(targets)


def attach_lora(model: Any, cfg: TrainConfig, task_type: str) -> Any:
    """Wrap ``model`` with a trainable LoRA (``cfg.lora``) or continue ``cfg.init_adapter``; returns the PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.init_adapter:
        from pluribus.adapter import check_adapter

        check_adapter(cfg.init_adapter, base_identity(model))
        return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    targets = resolve_targets(model, cfg.lora.target_modules)
    if targets == "all-linear" and task_type != "CAUSAL_LM":
        # PEFT's all-linear skips only a causal LM's output layer; a classification head is trained whole
        targets = [n for n in linear_module_names(model) if n not in {"score", "classifier", "lm_head"}]
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.rslora,
        target_modules=targets,
        task_type=task_type,
    )
    peft_model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        # LoRA leaves the embeddings frozen; checkpointed blocks need an input that requires grad.
        peft_model.enable_input_require_grads()
    return peft_model


def patch_kernels(model: Any, mode: str) -> Any:
    """Swap in pluribus's fused kernels (``pluribus.kernels.patch_model``) unless mode is 'off'; returns the handle."""
    if mode == "off":
        return None
    from pluribus.kernels import patch_model

    return patch_model(model, mode)


def base_identity(model: Any) -> str:
    """The base model a PEFT adapter is trained on, as PEFT records it (``base_model_name_or_path``)."""
    name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return str(Path(name).resolve()) if name and Path(name).exists() else str(name)
