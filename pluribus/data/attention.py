"""One-token decode steps' attention on the key/value heads: grouped query heads packed as the query length.

A decode step's query is one token. transformers from 5.20 packs the query heads that share a key/value head
into that head's query rows for such steps (``pack_gqa``); 5.16-5.19 (vLLM's environment pins them) repeat every
key and value per query head instead, which on CPU made a step's attention 4-7x slower (SmolLM2-135M: 3 KV heads
for 9 query heads; 15.5 ms against 2.1 ms for 18 rows over 300 cached tokens, same results to the bit). The
backend registers ``pluribus_sdpa``, this packing in front of transformers' own ``sdpa``, for models that run sdpa;
every other call (prefill, dropout, a position bias, attention sinks, a per-head mask) goes to ``sdpa`` as is.
"""

from __future__ import annotations

from typing import Any

NAME = "pluribus_sdpa"


def _attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
               scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    plain = (length != 1 or groups <= 1 or dropout or kwargs.get("position_bias") is not None
             or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None or kwargs.get("cache") is not None
             or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
             or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))
             or key.shape[1] * groups != heads)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def pack_decode_attention(model: Any) -> bool:
    """Run ``model``'s one-token steps through ``pluribus_sdpa`` where it runs transformers' sdpa; whether it
    does now."""
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
