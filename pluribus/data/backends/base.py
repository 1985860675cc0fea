"""What every generation backend is: the ``Backend`` protocol and the ``Generation`` record it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pluribus.config import SamplingConfig

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
