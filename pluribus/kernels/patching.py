"""Explicit, reversible patching of a model's modules onto the fused paths: ``patch_model(model, mode) -> PatchHandle``.

What is patched (instance ``forward`` attributes only; no class, library function or global is touched):
- every PEFT LoRA ``Linear`` -> ``lora_linear`` (fused forward, memory-saving backward);
- Llama / Qwen2 / Qwen3 attention whose q, k, v are LoRA layers -> one fused q/k/v projection, RoPE in place,
  attention through ``attention.attention`` (varlen on CUDA, the model's SDPA/eager otherwise), then o_proj;
- Llama / Qwen2 / Qwen3 MLP whose gate and up are LoRA layers -> one fused gate/up projection, then down_proj.
Each patched forward checks its layer at every call (adapter disabled or merged, several active adapters, DoRA,
lora_dropout > 0 in training, a lora_bias, a non-``nn.Linear`` base such as 4-bit): then it runs the original
forward and logs why, once. ``handle.unpatch()`` restores every module exactly as it was.

The patched attention stands in for the library's ``forward``, so it must take the KV cache under the name the
decoder layer passes it (``cache`` in transformers 5.24, ``past_key_values`` in earlier releases): a cache
given under another name lands in ``**kwargs``, is never updated, and generation silently attends to the new
tokens only.
``patch_model`` therefore reads the signature of each attention class's ``forward`` and patches only the
signatures listed in ``_ATTENTION_SIGNATURES``; any other (a transformers release this module does not know)
leaves that block on its own forward, listed in ``handle.skipped`` and logged as a warning: slower, never wrong.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from pluribus.errors import PluribusError
from pluribus.kernels.dispatch import check_mode, device_reason

logger = logging.getLogger("pluribus.kernels")

_ATTR_MODE = "_pluribus_kernels"
_ATTR_ORIGINAL = "_pluribus_original_forward"
_logged: set[str] = set()
# The parameters (after self) of the attention forwards the patched one can stand in for, by the cache's name:
# only signatures checked against a transformers release (5.24, by tests/kernels/test_patching.py's generation
# test), since an earlier one may also expect cache_position or cache kwargs in cache.update.
_ATTENTION_SIGNATURES = {
    "cache": ("hidden_states", "position_embeddings", "attention_mask", "cache"),
}


def _log_once(kind: str, reason: str) -> None:
    key = f"{kind}: {reason}"
    if key not in _logged:
        _logged.add(key)
        logger.info("kernels: %s runs its original forward because %s", kind, reason)


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def _block_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP

    return (LlamaAttention, Qwen2Attention, Qwen3Attention), (LlamaMLP, Qwen2MLP, Qwen3MLP)


def lora_projection(layer: nn.Module):
    """``(Projection, None)`` when ``layer`` can take the fused path right now, else ``(None, reason)``."""
    from pluribus.kernels.lora_linear import Projection

    if not isinstance(layer, _lora_linear_class()):
        return None, f"{type(layer).__name__} is not a PEFT LoRA Linear"
    if layer.disable_adapters:
        return None, "its adapters are disabled"
    if layer.merged:
        return None, "its adapter is merged into the weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None, f"it has {len(active)} active adapters (the fused path takes exactly one)"
    name = active[0]
    if name in layer.lora_variant:
        return None, f"adapter '{name}' is a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    if layer.fan_in_fan_out:
        return None, "its weight is stored fan_in_fan_out"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return None, f"its base layer is {type(base).__name__}, not nn.Linear"
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
        return None, "lora_dropout > 0 while training"
    if not isinstance(dropout, nn.Identity | nn.Dropout):
        return None, f"its lora_dropout is {type(dropout).__name__}"
    if getattr(layer.lora_B[name], "bias", None) is not None:
        return None, f"adapter '{name}' has a lora_bias"
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return Projection(base.weight, base.bias, a, b, float(layer.scaling[name])), None


def _dtype_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return f"its input is {x.dtype} and its weight {weight.dtype}"
    return None


# --------------------------------------------------------------------------------------- patched forwards


def _lora_linear_forward(self, x, *args, **kwargs):
    from pluribus.kernels.lora_linear import lora_linear

    spec, reason = lora_projection(self)
    if spec is not None:
        reason = _dtype_reason(x, spec.weight) or ("it was called with extra arguments" if args or kwargs else None)
    if reason:
        _log_once("LoRA linear", reason)
        return getattr(self, _ATTR_ORIGINAL)(x, *args, **kwargs)
    return lora_linear(x, spec.weight, spec.lora_a, spec.lora_b, spec.scale, spec.bias, mode=getattr(self, _ATTR_MODE))


def _fused_specs(x: torch.Tensor, layers: list[nn.Module]):
    specs = []
    for layer in layers:
        spec, reason = lora_projection(layer)
        if spec is None:
            return None, reason
        specs.append(spec)
    if len({s.bias is None for s in specs}) > 1:
        return None, "some projections have a bias and some do not"
    return specs, _dtype_reason(x, specs[0].weight)


def attention_cache_arg(cls: type) -> tuple[str | None, str | None]:
    """``(name of the KV-cache parameter, None)`` when ``cls.forward``'s signature is one the patched attention
    can stand in for, else ``(None, reason)``."""
    sig = inspect.signature(cls.forward)  # follows functools.wraps (transformers' deprecate_kwarg) to the real one
    params = list(sig.parameters.values())[1:]
    named = tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    for cache_arg, expected in _ATTENTION_SIGNATURES.items():
        if named == expected and has_var_kw:
            return cache_arg, None
    import transformers

    return None, (f"{cls.__name__}.forward{sig} is not an attention signature pluribus.kernels knows "
                  f"(transformers {transformers.__version__}); its KV cache could be dropped")


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *, cache_arg: str,
                       **kwargs):
    from pluribus.kernels.attention import attention
    from pluribus.kernels.lora_linear import projections
    from pluribus.kernels.rope import rope_

    cache = kwargs.pop(cache_arg, None)
    specs, reason = _fused_specs(hidden_states, [self.q_proj, self.k_proj, self.v_proj])
    if not reason and (position_embeddings is None or hidden_states.dim() != 3):
        reason = "it was called without position_embeddings or with a non (B, T, d) input"
    if reason:
        _log_once("attention block", reason)
        return getattr(self, _ATTR_ORIGINAL)(hidden_states, position_embeddings=position_embeddings,
                                             attention_mask=attention_mask, **{cache_arg: cache}, **kwargs)
    mode = getattr(self, _ATTR_MODE)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape) for t in projections(hidden_states, specs, mode, "qkv_lora"))
    if hasattr(self, "q_norm"):  # Qwen3 normalizes each head before RoPE
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = rope_(q, k, cos, sin, mode=mode)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, sliding_window=getattr(self, "sliding_window", None),
                             has_cache=cache is not None, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _mlp_forward(self, x):
    from pluribus.kernels.lora_linear import projections

    specs, reason = _fused_specs(x, [self.gate_proj, self.up_proj])
    if reason:
        _log_once("MLP block", reason)
        return getattr(self, _ATTR_ORIGINAL)(x)
    gate, up = projections(x, specs, getattr(self, _ATTR_MODE), "gate_up_lora")
    return self.down_proj(self.act_fn(gate) * up)


# --------------------------------------------------------------------------------------- handle


@dataclass
class PatchHandle:
    """What ``patch_model`` changed; ``unpatch()`` (or leaving a ``with`` block) restores it exactly."""

    mode: str
    modules: list[tuple[str, str, nn.Module, object]] = field(default_factory=list)  # name, kind, module, prev
    skipped: list[tuple[str, str]] = field(default_factory=list)  # block name, reason

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, kind, _, _ in self.modules:
            out[kind] = out.get(kind, 0) + 1
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())) or "nothing"
        return f"kernels={self.mode}: patched {counts}" + (f"; {len(self.skipped)} blocks left as is" if self.skipped else "")

    def unpatch(self) -> None:
        for _, _, module, prev in reversed(self.modules):
            del module.forward
            if prev is not None:  # an instance forward that was there before us (e.g. an accelerate hook)
                module.forward = prev
            delattr(module, _ATTR_MODE)
            delattr(module, _ATTR_ORIGINAL)
        self.modules.clear()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def _patch(handle: PatchHandle, name: str, kind: str, module: nn.Module, forward) -> None:
    if hasattr(module, _ATTR_MODE):
        raise PluribusError(f"module '{name}' is already patched by pluribus.kernels; unpatch the first handle first")
    prev = module.__dict__.get("forward")
    setattr(module, _ATTR_ORIGINAL, module.forward)
    setattr(module, _ATTR_MODE, handle.mode)
    module.forward = types.MethodType(forward, module)  # a bound method: deepcopy rebinds it to the copy
    handle.modules.append((name, kind, module, prev))


def patch_model(model: nn.Module, mode: str) -> PatchHandle:
    """Route a model's LoRA linears and Llama/Qwen2/Qwen3 attention and MLP blocks through the fused kernels.

    ``model`` may be a PeftModel or any module tree. ``mode``: auto | triton | torch | off (``off`` patches
    nothing). With ``torch`` the patched model computes the same loss and gradients as the unpatched one.
    Raises PluribusError for an unknown mode, for ``triton`` where Triton cannot run (no CUDA GPU of compute
    capability 8.0+, triton missing), or for a model that is already patched. An attention class whose
    ``forward`` signature is not one this module knows is not patched (see the module docstring): it is listed in
    ``handle.skipped`` with the signature, and a warning is logged.
    """
    check_mode(mode)
    handle = PatchHandle(mode)
    if mode == "off":
        return handle
    if mode == "triton":
        param = next(model.parameters(), None)
        reason = device_reason(param.device) if param is not None else None
        if reason:
            raise PluribusError(f"kernels: triton cannot run here: {reason}; use kernels: auto or torch")
    lora_cls = _lora_linear_class()
    attn_cls, mlp_cls = _block_classes()
    for name, module in model.named_modules():
        if isinstance(module, attn_cls):
            cache_arg, reason = attention_cache_arg(type(module))
            if reason:
                if reason not in _logged:
                    _logged.add(reason)
                    logger.warning("kernels: attention blocks run their original forward: %s", reason)
            else:
                _, reason = _fused_specs(module.q_proj.weight, [module.q_proj, module.k_proj, module.v_proj])
            if reason:
                handle.skipped.append((name, reason))
            else:
                _patch(handle, name, "attention", module,
                       functools.partial(_attention_forward, cache_arg=cache_arg))
        elif isinstance(module, mlp_cls):
            _, reason = _fused_specs(module.gate_proj.weight, [module.gate_proj, module.up_proj])
            if reason:
                handle.skipped.append((name, reason))
            else:
                _patch(handle, name, "mlp", module, _mlp_forward)
        elif isinstance(module, lora_cls):
            _patch(handle, name, "lora_linear", module, _lora_linear_forward)
    logger.info(handle.summary())
    return handle
