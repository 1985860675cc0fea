"""The ``transformers`` backend: a local model, batched with left padding, decoded by ``decoding.decode``."""

from __future__ import annotations

import time

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.backends.base import Conversation, Generation, OnBatch
from pluribus.data.backends.prompt import Fit, Prompt, PromptBuilder, _context_length, _eos_ids, row_seeds
from pluribus.data.decoding import decode, row_sampler


class TransformersBackend:
    """A local model; every call is split into batches of ``batch_size`` rows, left-padded, decoded by
    ``decoding.decode``."""

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
        self.where = devices.where(self.model)  # {"device", "dtype"}: what the stage records
        self.name = agent.model if agent.adapter is None else f"{agent.model}+{agent.adapter}"
        self.batch_size = batch_size
        ctx = _context_length(self.model.config, self.tokenizer, agent.context_length)
        self.builder = PromptBuilder(self.tokenizer, ctx, agent.model)
        self.eos = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.eos[0]
        self.calls = 0  # generate() calls on the model; tests and benchmarks read it

    def count_tokens(self, text: str) -> int:
        return self.builder.count_tokens(text)

    def keep_last_tokens(self, text: str, n: int) -> str:
        return self.builder.keep_last_tokens(text, n)

    def prompt_fit(self, conversation: Conversation, max_new_tokens: int) -> Fit | None:
        return self.builder.fit(conversation, max_new_tokens)

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig,
                 on_batch: OnBatch | None = None, seeds: list[int] | None = None) -> list[Generation]:
        prompts = [self.builder.encode(c, sampling.max_new_tokens) for c in conversations]
        per_row = row_seeds(sampling, len(prompts), seeds)
        if per_row is None and sampling.temperature > 0:
            # unseeded sampling: seeds from torch's global RNG, so torch.manual_seed still reproduces a call
            import torch

            per_row = torch.randint(0, 2**62, (len(prompts),)).tolist()
        # Longest first, so each micro-batch holds rows of similar length (little padding).
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
        out: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            gens = self._generate_batch([prompts[i] for i in rows], sampling,
                                        None if per_row is None else [per_row[i] for i in rows])
            for i, g in zip(rows, gens, strict=True):
                out[i] = g
            if on_batch is not None:
                on_batch(gens)
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[Prompt], sampling: SamplingConfig, seeds: list[int] | None
                        ) -> list[Generation]:
        import torch

        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            if p.ids:
                input_ids[r, width - len(p.ids) :] = torch.tensor(p.ids)
                mask[r, width - len(p.ids) :] = 1
        pick = None if sampling.temperature == 0.0 else row_sampler(
            seeds or [0] * len(prompts), sampling.temperature, sampling.top_p)
        t0 = time.perf_counter()
        device = self.model.device
        rows = decode(self.model, input_ids.to(device), mask.to(device), max_new_tokens=prompts[0].max_new_tokens,
                      eos=self.eos, pick=pick)
        self.calls += 1
        seconds = (time.perf_counter() - t0) / len(prompts)
        gens = []
        for p, new in zip(prompts, rows, strict=True):
            stop = next((k for k, t in enumerate(new) if t in self.eos), None)
            n_out = len(new) if stop is None else stop + 1
            text = self.tokenizer.decode(new[: stop if stop is not None else n_out], skip_special_tokens=True)
            gens.append(Generation(
                text=text, tokens_in=len(p.ids), tokens_out=n_out, seconds=seconds,
                truncated=p.dropped_tokens > 0, dropped_tokens=p.dropped_tokens,
                finish_reason="stop" if stop is not None else "length",
            ))
        return gens

    def close(self) -> None:
        self.model = None
