"""Padding-free packing: several examples in one row, each with its own position_ids and attention span.

A micro-batch of examples becomes one row ``[x_1 | x_2 | ... | x_n]`` with ``position_ids`` restarting at 0 in
each example and ``cu_seq_lens`` (cumulative lengths) marking the boundaries, so no token is padding and no
example attends to another. Attention uses FlashAttention's varlen kernel where it is installed (CUDA) and
otherwise ``VARLEN_SDPA``: PyTorch SDPA run causally on each example's slice, which costs what the unpacked
examples cost (a dense block-diagonal mask over the packed row would cost O(total length^2)).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

VARLEN_SDPA = "pluribus_varlen_sdpa"


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example: ``out[s:e] = softmax(q[s:e] k[s:e]^T * scale + causal) v[s:e]``.

    query ``[1, H, T, D]``, key/value ``[1, Hkv, T, D]``; returns ``[1, T, H, D]`` like transformers' attention
    functions. Without ``cu_seq_lens_q`` (an unpacked batch, generation) it is transformers' own SDPA path.
    """
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    bounds = cu_seq_lens_q.tolist()
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def varlen_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a packed row (the attention slices by cu_seq_lens); SDPA's own mask for padded batches."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_varlen_attention(model: Any) -> str:
    """Switch ``model`` to a varlen attention (flash_attention_2 on CUDA when installed, else VARLEN_SDPA).

    Registers the name with transformers' attention registries (adds a name; replaces nothing). Returns the
    implementation set.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    on_cuda = next(model.parameters()).is_cuda
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        impl = "flash_attention_2"
    else:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
        AttentionMaskInterface.register(VARLEN_SDPA, varlen_sdpa_mask)
        impl = VARLEN_SDPA
    model.set_attn_implementation(impl)
    return impl


def shift_labels(labels: list[int]) -> list[int]:
    """Targets aligned with positions: position t predicts labels[t+1]; an example's last position predicts nothing."""
    return labels[1:] + [-100]


class PackingCollator:
    """Collate tokenized examples ``{input_ids, labels, weight?}`` into one packed row or a right-padded batch.

    Both layouts carry ``shift_labels`` (targets already aligned with positions, -100 where there is none) and
    ``loss_weights`` (a per-token weight, the example's weight on its labelled tokens), so a loss reads the same.
    """

    def __init__(self, pad_token_id: int, packing: bool = True) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        targets = [shift_labels(lab) for lab in labels]
        weights = [[float(f.get("weight", 1.0))] * len(x) for f, x in zip(features, ids, strict=True)]
        if self.packing:
            lengths = [len(x) for x in ids]
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
            return {
                "input_ids": torch.tensor([sum(ids, [])]),
                "labels": torch.tensor([sum(labels, [])]),
                "shift_labels": torch.tensor([sum(targets, [])]),
                "loss_weights": torch.tensor([sum(weights, [])]),
                "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
                "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu,
                "max_length_q": max(lengths),
                "max_length_k": max(lengths),
            }
        width = max(len(x) for x in ids)

        def pad(rows: list[list[Any]], value: Any) -> torch.Tensor:
            return torch.tensor([r + [value] * (width - len(r)) for r in rows])

        return {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": pad([[1] * len(x) for x in ids], 0),
            "labels": pad(labels, -100),
            "shift_labels": pad(targets, -100),
            "loss_weights": pad(weights, 0.0),
        }
