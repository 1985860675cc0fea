"""Attention on the key/value heads: grouped query heads never get a copy of the keys and values per head.

SmolLM2-135M has 3 key/value heads for 9 query heads. transformers' ``sdpa`` repeats every key and value per query
head wherever a mask is given (every batch of left-padded prompts) and, before 5.20, for one-token decode steps
too (5.16-5.19: vLLM's environment pins them), where on CPU it made a step's attention 4-7x slower (15.5 ms
against 2.1 ms for 18 rows over 300 cached tokens). ``pluribus_sdpa`` sits in front of transformers' ``sdpa``:
a one-token step packs the query heads that share a key/value head into that head's query rows; a longer query
(a prefill) on the CPU hands the key/value heads to torch's SDPA with ``enable_gqa``. Both give sdpa's results
to the bit (tests/data/test_decoding.py; ``bench/prefill_attention.py``). Every other call (dropout, a position
bias, attention sinks, a per-head mask, a step without a mask, a prefill on a GPU or under a torch before 2.9)
goes to ``sdpa`` as is.
"""

from __future__ import annotations

from functools import cache
from typing import Any

NAME = "pluribus_sdpa"


@cache
def _cpu_flash_gqa() -> bool:
    """Whether torch's CPU flash kernel takes grouped KV heads with a mask (from 2.9; before, ``enable_gqa`` with
    a mask falls back to the math kernel: other bits and a score tensor per query head)."""
    from transformers.utils.import_utils import is_torch_greater_or_equal

    return is_torch_greater_or_equal("2.9", accept_dev=True)


def _plain(module: Any, query: Any, key: Any, attention_mask: Any, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether a call goes to transformers' ``sdpa`` as is: no grouped heads, anything beyond a plain causal or
    masked attention, a one-token step without a mask (sdpa runs it on the KV heads itself), or a prefill off the
    CPU (CUDA's flash kernel takes no mask: a masked grouped prefill there would fall back to the math kernel)."""
    groups = getattr(module, "num_key_value_groups", 1)
    length = query.shape[2]
    return bool(groups <= 1 or dropout or kwargs.get("position_bias") is not None
                or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
                or kwargs.get("cache") is not None or kwargs.get("softcap") is not None
                or kwargs.get("output_attentions")
                or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))
                or key.shape[1] * groups != query.shape[1]
                or (length == 1 and attention_mask is None)
                or (length > 1 and (query.device.type != "cpu" or not _cpu_flash_gqa())))


def _attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
               scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _plain(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = module.num_key_value_groups
    batch, heads, length, dim = query.shape
    if length == 1:
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None
    # a prefill: transformers' own rule for is_causal (a mask given means no flag), and its cut of a static
    # cache's empty columns where the flag is set
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and key.shape[2] > length:
        key, value = key[:, :, :length], value[:, :, :length]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=scaling, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def kv_head_attention(model: Any) -> bool:
    """Run ``model``'s attention through ``pluribus_sdpa`` where it runs transformers' sdpa; whether it does
    now."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, _attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):  # a transformers that refuses a registered name: keep its sdpa
        return False
    return model.config._attn_implementation == NAME
