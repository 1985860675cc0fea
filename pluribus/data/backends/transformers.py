"""The ``transformers`` backend: a local model, decoded by ``decoding.decode_rows`` (continuous batching)."""

from __future__ import annotations

import time
from typing import Any

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.attention import kv_head_attention
from pluribus.data.backends.base import Conversation, Generation, OnBatch
from pluribus.data.backends.prompt import Fit, Prompt, PromptBuilder, _context_length, eos_ids, row_seeds
from pluribus.data.decoding import decode_rows, row_sampler
from pluribus.data.prefix_store import PrefixStore


class TransformersBackend:
    """A local model; every call is one ``decoding.decode_rows`` over its prompts, longest first, at most
    ``batch_size`` rows decoding at once (a finished row's slot goes to the next prompt)."""

    takes_seeds = True
    takes_on_batch = True

    def __init__(self, agent: AgentConfig, *, trust_remote_code: bool = False, batch_size: int = 32,
                 device: str | None = None) -> None:
        from pluribus import device as devices
        from pluribus.models import load_model

        # the device policy: ``device`` (a setting, the caller's), else the agent's own, else auto
        target = devices.resolve(devices.pick(device, agent.device))
        self.model, self.tokenizer = load_model(
            agent.model, dtype=devices.dtype_for(target, agent.dtype), device=target, adapter=agent.adapter,
            trust_remote_code=trust_remote_code
        )
        self.model.eval()
        kv_head_attention(self.model)  # attention on the KV heads (transformers' sdpa repeats them per query head)
        self.where = devices.where(self.model)  # {"device", "dtype"}: what the stage records
        self.name = agent.model if agent.adapter is None else f"{agent.model}+{agent.adapter}"
        self.batch_size = batch_size
        ctx = _context_length(self.model.config, self.tokenizer, agent.context_length)
        self.builder = PromptBuilder(self.tokenizer, ctx, agent.model)
        self.eos = eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.eos[0]
        self.calls = 0  # decode_rows calls (one per generate); tests and benchmarks read it
        # finished rows' KV caches: a next round's prompt, which starts with the agent's own last exchange,
        # prefills only what is new; emptied when the model's weights change under it (_weights_stamp)
        self.prefixes = PrefixStore()
        self.weights = _weights_stamp(self.model)

    def count_tokens(self, text: str) -> int:
        return self.builder.count_tokens(text)

    def keep_last_tokens(self, text: str, n: int) -> str:
        return self.builder.keep_last_tokens(text, n)

    def prompt_fit(self, conversation: Conversation, max_new_tokens: int) -> Fit | None:
        return self.builder.fit(conversation, max_new_tokens)

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig,
                 on_batch: OnBatch | None = None, seeds: list[int] | None = None) -> list[Generation]:
        prompts = [self.builder.encode(c, sampling.max_new_tokens) for c in conversations]
        if not prompts:
            return []
        per_row = row_seeds(sampling, len(prompts), seeds)
        if per_row is None and sampling.temperature > 0:
            # unseeded sampling: seeds from torch's global RNG, so torch.manual_seed still reproduces a call
            import torch

            per_row = torch.randint(0, 2**62, (len(prompts),)).tolist()
        # Longest first, so rows decoding together have similar lengths (little padding)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
        pick = None if sampling.temperature == 0.0 else row_sampler(
            [per_row[i] for i in order], sampling.temperature, sampling.top_p)  # type: ignore[index]
        out: list[Generation | None] = [None] * len(prompts)
        clock = [time.perf_counter()]

        def finished(rows: list[int], tokens: list[list[int]]) -> None:
            # the wall time since rows last ended, shared by the rows that end now (the shares sum to the call's)
            now = time.perf_counter()
            seconds, clock[0] = (now - clock[0]) / len(rows), now
            gens = [self._generation(prompts[order[r]], new, seconds) for r, new in zip(rows, tokens, strict=True)]
            for r, g in zip(rows, gens, strict=True):
                out[order[r]] = g
            if on_batch is not None:
                on_batch(gens)

        self.calls += 1
        if (weights := _weights_stamp(self.model)) != self.weights:
            # caches computed under other weights (an adapter swapped in, a training step) must not be lent
            self.prefixes, self.weights = PrefixStore(), weights
        decode_rows(self.model, [prompts[i].ids for i in order], max_new_tokens=prompts[0].max_new_tokens,
                    eos=self.eos, pick=pick, slots=self.batch_size, on_finish=finished, store=self.prefixes)
        return out  # type: ignore[return-value]

    def _generation(self, prompt: Prompt, new: list[int], seconds: float) -> Generation:
        stop = next((k for k, t in enumerate(new) if t in self.eos), None)
        n_out = len(new) if stop is None else stop + 1
        text = self.tokenizer.decode(new[: stop if stop is not None else n_out], skip_special_tokens=True)
        return Generation(text=text, tokens_in=len(prompt.ids), tokens_out=n_out, seconds=seconds,
                          finish_reason="stop" if stop is not None else "length")

    def close(self) -> None:
        self.model = None
        self.prefixes = PrefixStore()


def _weights_stamp(model: Any) -> tuple:
    """What changes when the weights do: the model object, its active PEFT adapter(s) and every parameter's in-place
    version counter (an optimizer step, ``load_state_dict`` and ``copy_`` bump it)."""
    active = getattr(model, "active_adapter", None)  # a PeftModel's property; a plain model's is a method
    adapters = tuple(active) if isinstance(active, list | tuple) else active if isinstance(active, str) else None
    return id(model), adapters, sum(p._version for p in model.parameters())
