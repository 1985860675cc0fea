"""Batched decoding over a KV cache: continuous batching (a finished row's slot goes to the next waiting prompt)
and prefill shared by prompts with a common prefix.

``model.generate`` keeps every row of a batch in every forward until the longest one stops, and a batch that only
drops its finished rows ends with a few rambling rows running alone, at nearly the cost of a full step each.
``decode`` keeps ``slots`` rows running: each step forwards only the running rows; a row that finishes (its first
``eos`` token, or ``max_new_tokens``) leaves the cache at once, and as soon as a quarter of the slots are free the
next waiting prompts are prefilled and join the running batch (their caches left-padded to a common length, the
columns no running row needs cut off again). Prompts that are admitted together share their prefill: identical
prompts are prefilled once (self-consistency's samples, an RL group, the rollouts from one step), and prompts with
a long common prefix (Monte-Carlo rollouts from one trace's step prefixes) prefill that prefix once and only
their own suffixes apart.

A row's tokens are the ones ``generate`` would pick from the same logits: greedy argmax, or ``pick`` (a row's own
seeded sampler, which a row calls once per token it takes, whichever rows share its batch and whenever it was
admitted). Its logits can differ from ``generate``'s in the last bits, as between any two batch compositions (see
``bench/batch_invariance.py``). A model whose cache layers keep per-row state beside keys and values (linear
attention, sliding windows) cannot have rows joined or dropped: there a batch runs to its end, as in generate.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pluribus.data.prefix_store import PrefixStore

# A sampler: (float32 logits of the running rows, their row indices in the call) -> one token per row.
Pick = Callable[[Any, list[int]], Any]
# Told the indices of the rows that have just ended and their tokens (final).
Finished = Callable[[list[int], list[list[int]]], None]

# A shared prefix is prefilled apart (one more forward) only where it saves at least this many prompt tokens.
SHARED_MIN_SAVED = 128
# ... and only prefixes of at least this many tokens count as shared.
SHARED_MIN_LEN = 16


def _prunable() -> tuple[type, ...]:
    """The cache layers whose rows ``batch_select_indices`` drops exactly (keys and values are all they hold)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from pluribus.data.kv_cache import RoomyLayer

    return (DynamicLayer, DynamicSlidingWindowLayer, RoomyLayer)


def _joinable(cache: Any) -> bool:
    """Whether rows can join ``cache`` and columns be cut from it: layers that hold nothing but keys and values
    along one sequence axis (a sliding-window layer also counts the tokens it has seen)."""
    from transformers.cache_utils import DynamicLayer

    from pluribus.data.kv_cache import RoomyLayer

    return bool(getattr(cache, "layers", None)) and all(type(layer) in (DynamicLayer, RoomyLayer)
                                                        for layer in cache.layers)


def nucleus(logits: Any, top_p: float) -> Any:
    """``logits`` with every token outside the top-p nucleus set to -inf: transformers' ``TopPLogitsWarper``,
    the one rule for the sampler and for the log-probabilities RL trains (vLLM's too), ties included."""
    if top_p >= 1.0:
        return logits
    from transformers.generation.logits_process import TopPLogitsWarper

    shape = logits.shape
    return TopPLogitsWarper(top_p)(None, logits.reshape(-1, shape[-1])).view(shape)


class _Forward:
    """One model's forward with a KV cache, under the argument names its transformers version takes."""

    def __init__(self, model: Any, device: Any, room: int) -> None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel takes **kwargs
        params = set(inspect.signature(inner.forward).parameters)
        self.model, self.device, self.room = model, device, room
        # the KV cache is `cache` from transformers 5.24, `past_key_values` before (5.24 still takes the old name,
        # with a deprecation warning)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keeps_last = "logits_to_keep" in params

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        from pluribus.data.kv_cache import roomy

        # keys and values written in place, ``room`` columns at a time (kv_cache.py): a step copies no cache
        return roomy(DynamicCache(config=self.model.config), self.room)

    def __call__(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """The float logits of the last column of ``ids`` (every row left-padded to it)."""
        # the last position as an index tensor, not `logits_to_keep=1`: the slice that 1 makes is a strided view,
        # and torch's linear on a strided 3-d input with a frozen weight (every PeftModel's head) expands the head
        # to one copy per row: 12 s of a 96-row prefill on SmolLM2 instead of 0.01 s (bench/lora_decode.py)
        keep = {"logits_to_keep": ids.new_tensor([ids.shape[1] - 1])} if self.keeps_last and ids.shape[1] > 1 else {}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep,
                          **{self.cache_arg: cache}).logits[:, -1].float()


def _left_padded(seqs: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class _Rows:
    """Rows decoding together: their indices in the call, their shared cache (left-padded to one length), its
    attention mask, each row's position of its last token, and the float logits of each row's next token."""

    rows: list[int]
    cache: Any
    mask: Any
    last: Any
    logits: Any

    def keep(self, keep: list[int], cut: bool) -> None:
        """Keep these rows (indices into ``rows``); with ``cut``, drop the leading columns no kept row attends
        to."""
        index = self.mask.new_tensor(keep)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.last, self.logits = self.mask[index], self.last[index], self.logits[index]
        used = self.mask.any(0)
        first = int(used.nonzero()[0]) if cut and bool(used.any()) else 0
        if first > 0:
            from pluribus.data.kv_cache import drop_columns

            for layer in self.cache.layers:
                drop_columns(layer, first)
            self.mask = self.mask[:, first:]

    def join(self, other: _Rows) -> None:
        """Append ``other``'s rows, left-padding the shorter cache (masked zeros) to the longer one's length."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(other.mask, width, dim=1)])
        self.rows += other.rows
        self.last = torch.cat([self.last, other.last])
        self.logits = torch.cat([self.logits, other.logits])


def _pad_left(t: Any, width: int, dim: int = -2) -> Any:
    import torch

    short = width - t.shape[dim]
    if short == 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _extend(fwd: _Forward, cache: Any, mask: Any, base: Any, seqs: list[list[int]], pad: int) -> tuple[Any, Any]:
    """Forward the (non-empty) ``seqs``, left-padded, on top of ``cache`` (``mask`` its columns, ``base`` each
    row's count of real tokens in it): (the mask grown by them, the logits of each row's next token)."""
    import torch

    ids, new = _left_padded(seqs, pad, fwd.device)
    mask = torch.cat([mask, new], dim=1)
    # positions count real tokens only, as generate derives them from the mask (left padding, a hole after a
    # shared prefix)
    positions = (base[:, None] + new.cumsum(-1) - 1).clamp(min=0)
    return mask, fwd(ids, mask, positions, cache)


def _shared_prefixes(prompts: list[list[int]]) -> list[int]:
    """For each prompt, the length of the prefix it shares with a run of others (lexicographic neighbours), at
    most its length - 1 (its last token is prefilled apart, for its own logits); 0 where it shares none."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    lcp = [0] * len(order)  # lcp[k]: common prefix of order[k-1] and order[k]
    for k in range(1, len(order)):
        a, b = prompts[order[k - 1]], prompts[order[k]]
        n = min(len(a), len(b))
        j = next((j for j in range(n) if a[j] != b[j]), n)
        lcp[k] = j if j >= SHARED_MIN_LEN else 0
    shared = [0] * len(prompts)
    k = 1
    while k < len(order):
        if lcp[k] == 0:
            k += 1
            continue
        end = k
        while end + 1 < len(order) and lcp[end + 1] > 0:
            end += 1
        members = order[k - 1:end + 1]
        length = min(min(lcp[k:end + 1]), min(len(prompts[i]) for i in members) - 1)
        for i in members:
            shared[i] = length if length >= SHARED_MIN_LEN else 0
        k = end + 1
    return shared


def _prefill(fwd: _Forward, prompts: list[list[int]], rows: list[int], pad: int, *, dedupe: bool, prefixes: bool,
             store: PrefixStore | None = None) -> _Rows:
    """The rows of ``prompts``, prefilled: with ``dedupe`` identical prompts once (the cache copied to each), with
    ``prefixes`` a prefix that several share once where that saves ``SHARED_MIN_SAVED`` tokens, then what each
    has of its own; or, where ``store`` holds heads of them, each its stored head and then the rest."""
    import torch

    if dedupe:
        distinct: dict[tuple[int, ...], int] = {}
        inverse = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = [list(p) for p in distinct]
    else:
        inverse, unique = list(range(len(prompts))), [list(p) for p in prompts]
    cache, device = fwd.new_cache(), fwd.device
    stored = _stored_prefill(cache, unique, store) if store is not None and prefixes else None
    if stored is not None:
        mask, base, shared = stored
    else:
        shared = _shared_prefixes(unique) if prefixes else [0] * len(unique)
        heads = {tuple(p[:n]) for p, n in zip(unique, shared, strict=True) if n}
        if sum(shared) - sum(map(len, heads)) < SHARED_MIN_SAVED:  # the tokens one prefill of each prefix saves
            shared = [0] * len(unique)
        mask, base = _shared_prefill(fwd, cache, unique, shared, pad)
    mask, logits = _extend(fwd, cache, mask, base, [p[n:] for p, n in zip(unique, shared, strict=True)], pad)
    last = torch.tensor([len(p) - 1 for p in unique], device=device)
    if len(unique) < len(prompts):
        index = torch.tensor(inverse, device=device)
        cache.batch_select_indices(index)
        mask, last, logits = mask[index], last[index], logits[index]
    return _Rows(list(rows), cache, mask, last, logits)


def _stored_prefill(cache: Any, prompts: list[list[int]], store: PrefixStore) -> tuple[Any, Any, list[int]] | None:
    """Each prompt's longest head in ``store`` (all but its last token at most) put in ``cache``, left-padded
    with masked zeros: (the rows' mask, their count of real tokens, the heads' lengths); None where that saves
    fewer than ``SHARED_MIN_SAVED`` tokens."""
    import torch

    hits = [store.longest(p[:-1]) for p in prompts]
    hits = [(n, layers) if n >= SHARED_MIN_LEN else (0, []) for n, layers in hits]
    lengths = [n for n, _ in hits]
    if sum(lengths) < SHARED_MIN_SAVED:
        return None
    store.lent += sum(lengths)
    width = max(lengths)
    some = next(layers for n, layers in hits if n)
    for i, (k0, v0) in enumerate(some):
        keys = k0.new_zeros((len(prompts), k0.shape[0], width, k0.shape[2]))
        values = v0.new_zeros((len(prompts), v0.shape[0], width, v0.shape[2]))
        for r, (n, layers) in enumerate(hits):
            if n:
                keys[r, :, width - n:] = layers[i][0][:, :n]
                values[r, :, width - n:] = layers[i][1][:, :n]
        cache.layers[i].update(keys, values)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=keys.device)
    for r, n in enumerate(lengths):
        if n:
            mask[r, width - n:] = 1
    return mask, torch.tensor(lengths, device=keys.device), lengths


def _keep_finished(store: PrefixStore, run: _Rows, ended: list[int], prompts: list[list[int]],
                   out: list[list[int]]) -> None:
    """Put each ended row's keys and values in ``store``: its prompt and every token it took but the last (which
    was never fed)."""
    ending = set(ended)
    for i, row in enumerate(run.rows):
        if row in ending:
            real = run.mask[i].bool()
            tokens = prompts[row] + out[row][:-1]
            layers = [(layer.keys[i][:, real], layer.values[i][:, real]) for layer in run.cache.layers]
            assert layers[0][0].shape[1] == len(tokens), "a row's cache and its tokens disagree"
            store.put(tokens, len(prompts[row]), layers)


def _shared_prefill(fwd: _Forward, cache: Any, prompts: list[list[int]], shared: list[int], pad: int
                    ) -> tuple[Any, Any]:
    """Prefill each distinct shared prefix (``prompts[i][:shared[i]]``) once into ``cache`` and give every prompt
    a row holding its prefix (an empty one: masked zeros): (the rows' mask, their count of real tokens)."""
    import torch

    device = fwd.device
    rows = len(prompts)
    empty = torch.zeros((rows, 0), dtype=torch.long, device=device)
    if not any(shared):
        return empty, torch.zeros(rows, dtype=torch.long, device=device)
    by_prefix: dict[tuple[int, ...], int] = {}
    for p, n in zip(prompts, shared, strict=True):
        if n:
            by_prefix.setdefault(tuple(p[:n]), len(by_prefix))
    prefixes = [list(p) for p in by_prefix]
    mask, _ = _extend(fwd, cache, empty[: len(prefixes)], torch.zeros(len(prefixes), dtype=torch.long,
                                                                       device=device), prefixes, pad)
    # a prompt that shares nothing reads an all-padding prefix: one masked row of zeros after the prefixes
    for layer in cache.layers:
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((1, *layer.keys.shape[1:]))])
        layer.values = torch.cat([layer.values, layer.values.new_zeros((1, *layer.values.shape[1:]))])
    mask = torch.cat([mask, mask.new_zeros((1, mask.shape[1]))])
    index = torch.tensor([by_prefix[tuple(p[:n])] if n else len(prefixes) for p, n in zip(prompts, shared,
                                                                                          strict=True)],
                         device=device)
    cache.batch_select_indices(index)
    return mask[index], torch.tensor(shared, device=device)


@dataclass
class _Plan:
    """How one call decodes: at most ``width`` rows at once; ``joinable``: waiting prompts join running rows
    (else a batch runs until its last row ends); ``prunable``: finished rows leave the cache (else they run on,
    their tokens unread, as in generate)."""

    width: int
    joinable: bool
    prunable: bool
    pad: int
    store: PrefixStore | None = None


def _admit(fwd: _Forward, prompts: list[list[int]], waiting: deque[int], run: _Rows | None, plan: _Plan
           ) -> _Rows:
    """``run`` with the waiting prompts it takes now: while rows run, a joinable batch takes new ones once a
    quarter of its slots (or every waiting prompt) would fit, in one prefill; a batch that cannot take rows is
    filled only when empty."""
    free = plan.width - (len(run.rows) if run is not None else 0)
    due = run is None or (plan.joinable and free >= min(len(waiting), max(1, plan.width // 4)))
    if not waiting or not due:
        assert run is not None
        return run
    rows = [waiting.popleft() for _ in range(min(free, len(waiting)))]
    new = _prefill(fwd, [prompts[r] for r in rows], rows, plan.pad, dedupe=plan.prunable, prefixes=plan.joinable,
                   store=plan.store)
    if run is None:
        return new
    run.join(new)
    return run


def _take(run: _Rows, tokens: list[int], out: list[list[int]], finished: set[int], stop: set[int],
          max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Append each running row's token; (the positions in ``run`` of the rows that go on, the rows that end)."""
    going, ended = [], []
    for i, (row, t) in enumerate(zip(run.rows, tokens, strict=True)):
        if row in finished:  # a row that ended in a batch that cannot drop it
            continue
        out[row].append(t)
        if t in stop or len(out[row]) >= max_new_tokens:
            finished.add(row)
            ended.append(row)
        else:
            going.append(i)
    return going, ended


def _step(fwd: _Forward, run: _Rows, tokens: Any) -> None:
    """Feed each running row its new token: the cache and mask grow by one column, the logits move on."""
    import torch

    run.mask = torch.cat([run.mask, run.mask.new_ones(len(run.rows), 1)], dim=1)
    run.last = run.last + 1
    run.logits = fwd(tokens[:, None].to(fwd.device), run.mask, run.last[:, None], run.cache)


def decode_rows(model: Any, prompts: list[list[int]], *, max_new_tokens: int, eos: list[int],
                pick: Pick | None = None, slots: int | None = None, on_finish: Finished | None = None,
                store: PrefixStore | None = None, device: Any = None) -> list[list[int]]:
    """The new tokens of each prompt, each ending at its first ``eos`` token (included) or after
    ``max_new_tokens``, decoded ``slots`` rows at a time (all at once by default; see the module docstring).
    ``pick`` samples; without it each step takes the argmax. ``on_finish`` hears which rows have just ended, with
    their tokens. ``store`` (a ``PrefixStore``) lends prompts the cached heads it holds and keeps every finished
    row (where rows can join a batch: the module docstring)."""
    import torch

    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens <= 0:
        return out
    if not all(prompts):
        raise ValueError("decode_rows: a prompt of no tokens has nothing to continue; give every row a token")
    # a step writes into its cache's spare room; the room is renewed (one copy) every ``room`` steps
    fwd = _Forward(model, model.device if device is None else device, room=max(16, min(max_new_tokens, 128)))
    probe = fwd.new_cache()
    prunable = all(type(layer) in _prunable() for layer in getattr(probe, "layers", [None]))
    joinable = _joinable(probe)
    plan = _Plan(len(prompts) if slots is None else max(1, slots), joinable, prunable, pad=0,
                 store=store if joinable else None)
    stop, finished = set(eos), set()
    waiting, run = deque(range(len(prompts))), None
    with torch.inference_mode():
        while waiting or run is not None:
            run = _admit(fwd, prompts, waiting, run, plan)
            tokens = run.logits.argmax(-1) if pick is None else pick(run.logits, run.rows)
            going, ended = _take(run, tokens.tolist(), out, finished, stop, max_new_tokens)
            if ended and plan.store is not None:
                _keep_finished(plan.store, run, ended, prompts, out)
            if ended and on_finish is not None:
                on_finish(ended, [out[r] for r in ended])
            if not going:
                run = None
                continue
            if plan.prunable and len(going) < len(run.rows):
                run.keep(going, cut=plan.joinable)
                tokens = tokens[tokens.new_tensor(going)]
            _step(fwd, run, tokens)
    return out


def decode(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int, eos: list[int],
           pick: Pick | None = None, slots: int | None = None) -> list[list[int]]:
    """``decode_rows`` of a left-padded batch (its rows' tokens where ``attention_mask`` is 1)."""
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
    return decode_rows(model, prompts, max_new_tokens=max_new_tokens, eos=eos, pick=pick, slots=slots,
                       device=input_ids.device)


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
