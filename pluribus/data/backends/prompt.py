"""Request building shared by the backends: a conversation rendered by the model's chat template, the context
rule (``PromptBuilder``), per-row sampling seeds, and counting and trimming peers' text in a model's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pluribus.config import AgentConfig, SamplingConfig
from pluribus.data.backends.base import Conversation, Fit
from pluribus.errors import PluribusError


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_new_tokens: int


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
        return Prompt(ids=ids, max_new_tokens=fit.max_new)

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


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the generation config's EOS ids, then the tokenizer's, each once."""
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
        tokenizer, _ = _local_tokenizer(agent.model, trust_remote_code)
    else:
        tokenizer = load_tokenizer(resolve_model(agent.model), trust_remote_code=trust_remote_code)
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    # the context length plays no part in counting or trimming
    return TokenText(tokenizer, PromptBuilder(tokenizer, 1 << 30, agent.model) if has_template else None)


def _local_tokenizer(model: str, trust_remote_code: bool) -> tuple[Any | None, str]:
    """(the model's tokenizer when it is available offline (alias, local folder, cached hub id), else None;
    why it is not, in a few words)."""
    try:
        from transformers import AutoTokenizer

        from pluribus.models import resolve_model

        return AutoTokenizer.from_pretrained(str(resolve_model(model)), trust_remote_code=trust_remote_code), ""
    except Exception as e:  # a served model name need not exist locally; token counts then come from the server
        return None, _one_line(str(e)) or type(e).__name__


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
