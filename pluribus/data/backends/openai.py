"""The ``openai`` backend: OpenAI-compatible servers of one model, with retries and failover between them."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.backends.base import Conversation, Generation, OnBatch
from pluribus.data.backends.prompt import (
    Fit,
    PromptBuilder,
    TokenText,
    _context_length,
    _local_tokenizer,
    _one_line,
    row_seeds,
)
from pluribus.errors import PluribusError

logger = logging.getLogger(__name__)


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

    takes_seeds = True
    takes_on_batch = True

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
