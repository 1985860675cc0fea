"""Batched decoding with a KV cache that drops each row from the batch as soon as it finishes.

``model.generate`` keeps every row of a batch in every forward until the longest one stops: with brief answers
(10 tokens typical, 64 for the one row that rambles) most of a batch's compute goes to rows that are already
done. ``decode`` prefills the left-padded batch once, then at each step forwards only the rows still running
and removes finished rows from the cache (``Cache.batch_select_indices``). A row's tokens are the ones
``generate`` would pick from the same logits: greedy argmax, or ``pick`` (a row's own seeded sampler). Its
logits can differ from ``generate``'s in the last bits, as between any two batch compositions (see
``bench/batch_invariance.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

# A sampler: (float32 logits of the running rows, their row indices in the batch) -> one token per row.
Pick = Callable[[Any, list[int]], Any]


def _prunable() -> tuple[type, ...]:
    """The cache layers whose rows ``batch_select_indices`` drops exactly (keys and values are all they hold)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return (DynamicLayer, DynamicSlidingWindowLayer)


def nucleus(logits: Any, top_p: float) -> Any:
    """``logits`` with every token outside the top-p nucleus set to -inf: transformers' ``TopPLogitsWarper``,
    the one rule for the sampler and for the log-probabilities RL trains (vLLM's too), ties included."""
    if top_p >= 1.0:
        return logits
    from transformers.generation.logits_process import TopPLogitsWarper

    shape = logits.shape
    return TopPLogitsWarper(top_p)(None, logits.reshape(-1, shape[-1])).view(shape)


def _forward_params(model: Any) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel takes **kwargs
    return set(inspect.signature(inner.forward).parameters)


def decode(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int, eos: list[int],
           pick: Pick | None = None) -> list[list[int]]:
    """The new tokens of each row of a left-padded batch, each ending at its first ``eos`` token (included) or
    after ``max_new_tokens``. ``pick`` samples; without it each step takes the argmax."""
    import torch
    from transformers import DynamicCache

    n = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    if n == 0 or max_new_tokens <= 0:
        return out
    params = _forward_params(model)
    # the KV cache is `cache` from transformers 5.24, `past_key_values` before (5.24 still takes the old name,
    # with a deprecation warning)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    # the last position as an index tensor, not `logits_to_keep=1`: the slice that 1 makes is a strided view, and
    # torch's linear on a strided 3-d input with a frozen weight (every PeftModel's head) expands the head to one
    # copy per row: 12 s of a 96-row prefill on SmolLM2 instead of 0.01 s (bench/lora_decode.py)
    last_position = input_ids.new_tensor([input_ids.shape[1] - 1])
    keep_last = {"logits_to_keep": last_position} if "logits_to_keep" in params else {}
    cache = DynamicCache(config=model.config)
    stop = torch.tensor(sorted(set(eos)), dtype=torch.long, device=input_ids.device)
    mask = attention_mask
    # left padding: positions count real tokens only, as generate derives them from the mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    alive = list(range(n))
    # rows leave the batch only where every cache layer can drop rows exactly; a linear-attention or hybrid
    # layer keeps per-row state beside its keys and values, so there finished rows run on, as in generate
    prunable = _prunable()
    prune = all(type(layer) in prunable for layer in getattr(cache, "layers", [None]))
    with torch.inference_mode():
        # rows with the same prompt (self-consistency's samples, an RL group, a single agent's k samples, the
        # rollouts from one step) share one prefill: the cache of each distinct prompt is copied to its rows
        unique, inverse = torch.unique(torch.cat([input_ids, mask.to(input_ids.dtype)], 1), dim=0,
                                       return_inverse=True) if prune else (None, None)
        if unique is not None and unique.shape[0] < n:
            width = input_ids.shape[1]
            ids, first_mask = unique[:, :width], unique[:, width:].to(mask.dtype)
            logits = model(input_ids=ids, attention_mask=first_mask,
                           position_ids=(first_mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=True,
                           **keep_last, **{cache_arg: cache}).logits[:, -1]
            cache.batch_select_indices(inverse.to(input_ids.device))
            logits = logits[inverse.to(logits.device)]
        else:
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **keep_last, **{cache_arg: cache}).logits[:, -1]
        stop = stop.to(logits.device)
        last = positions[:, -1]
        done = torch.zeros(n, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            scores = logits.float()
            tokens = scores.argmax(-1) if pick is None else pick(scores, alive)
            for row, t, finished in zip(alive, tokens.tolist(), done.tolist(), strict=True):
                if not finished:
                    out[row].append(t)
            done = done | torch.isin(tokens, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if prune and bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep.to(input_ids.device))
                alive = [alive[i] for i in keep.tolist()]
                mask, last, tokens, done = mask[keep], last[keep], tokens[keep], done[keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            last = last + 1
            logits = model(input_ids=tokens[:, None].to(input_ids.device), attention_mask=mask,
                           position_ids=last[:, None], use_cache=True, **{cache_arg: cache}).logits[:, -1]
    return out


def row_sampler(seeds: list[int], temperature: float, top_p: float) -> Pick:
    """A sampler that draws each row from its own ``torch.Generator``: p = softmax(logits / T) restricted to the
    top-p nucleus (``nucleus``); one uniform draw per row per step, mapped through the row's cumulative
    distribution. torch's CPU generator keeps the low 32 bits of a seed, so seeds must differ there (hash them).

    HF's own sampling draws the whole batch from torch's global RNG, which ties a row's tokens to its batch;
    here a row's draws depend only on its seed (a finished row draws no more, as it takes no more steps).
    """
    import torch

    generators = [torch.Generator().manual_seed(s % 2**63) for s in seeds]

    def pick(scores: Any, rows: list[int]) -> Any:
        logits = nucleus(scores / temperature, top_p)
        # inverse-CDF: one uniform per row from its generator; the first token whose cumulative mass exceeds it
        # (side=right never lands on a zero-probability token). 7x cheaper than a multinomial per row on a
        # 49k vocabulary.
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=generators[r]) for r in rows]).to(cdf.device)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        return picks.squeeze(1).clamp_(max=cdf.shape[-1] - 1)

    return pick
