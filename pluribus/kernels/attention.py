"""Attention dispatch for the patched blocks: flash-attn varlen, PyTorch varlen on CUDA, else the model's SDPA/eager.

Attention is dispatched, not rewritten. The varlen paths take the packed layout (tokens, heads, D) with cumulative
sequence lengths, from Hugging Face's flattening collator (``cu_seq_lens_q``) or derived from ``position_ids``
(a sequence starts wherever its position is 0), so packed sequences never attend to each other. Anything they do
not cover (CPU, float32, padding masks, a KV cache, dropout on PyTorch varlen, output_attentions) goes to the
attention function the model is configured with, so results there are the unpatched model's exactly.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache

import torch

logger = logging.getLogger("pluribus.kernels")


@lru_cache(maxsize=1)
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sequence boundaries of a (B, T) batch, flattened: a sequence starts at each position 0 and at each row start."""
    b, t = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    starts[:: t] = True
    idx = torch.nonzero(starts).flatten().to(torch.int32)
    cu = torch.cat([idx, torch.tensor([b * t], device=idx.device, dtype=torch.int32)])
    return cu, int((cu[1:] - cu[:-1]).max())


def _hf_interface(module: torch.nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)


def attention(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attention_mask: torch.Tensor | None, *, dropout: float, scaling: float,
              sliding_window: int | None = None, has_cache: bool = False, **kwargs
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of q (B, Hq, T, D) over k, v (B, Hk, S, D); returns ((B, T, Hq, D), weights or None)."""
    impl = getattr(module.config, "_attn_implementation", "sdpa")
    varlen_ok = (
        impl in ("sdpa", "eager")
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and not has_cache
        and not kwargs.get("output_attentions", False)
        and q.shape[2] == k.shape[2]
        and (attention_mask is None or "cu_seq_lens_q" in kwargs)
    )
    use_flash = varlen_ok and flash_attn_installed()
    use_torch = varlen_ok and not use_flash and dropout == 0.0 and torch_varlen_available()
    if not (use_flash or use_torch):
        if sliding_window is not None:  # Llama's interface is never given one; Qwen2/3 pass theirs through
            kwargs["sliding_window"] = sliding_window
        return _hf_interface(module)(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, hq, t, d = q.shape
    if "cu_seq_lens_q" in kwargs:
        cu = kwargs["cu_seq_lens_q"].to(torch.int32)
        max_len = int(kwargs.get("max_length_q") or (cu[1:] - cu[:-1]).max())
    else:
        pos = kwargs.get("position_ids")
        if pos is None or pos.shape != (b, t):
            pos = torch.arange(t, device=q.device).expand(b, t)
        cu, max_len = cu_seqlens_from_position_ids(pos)
    qp, kp, vp = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v))
    if use_flash:
        from flash_attn import flash_attn_varlen_func

        window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
        out = flash_attn_varlen_func(qp, kp, vp, cu, cu, max_len, max_len, dropout_p=dropout,
                                     softmax_scale=scaling, causal=True, window_size=window)
    else:
        from torch.nn.attention.varlen import varlen_attn

        window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
        out = varlen_attn(qp, kp, vp, cu, cu, max_len, max_len, scale=scaling, window_size=window,
                          enable_gqa=hq != k.shape[1])
    return out.view(b, t, hq, d), None
