"""What every generation backend is: the ``Backend`` protocol, the ``Generation`` record it returns and the ``Fit``
of a prompt in its context."""

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
    # No field says a prompt was cut: none is (PromptBuilder refuses a prompt that does not fit, a server answers
    # one with an error); an output cut by max_new_tokens says so in finish_reason.
    finish_reason: str = "stop"  # "stop" (end of turn) or "length" (hit max_new_tokens)
    tokens_estimated: bool = False  # counts guessed from characters: no server usage and no tokenizer offline


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


class Backend(Protocol):
    """The narrow interface every backend implements; what it can do beyond ``generate(conversations, sampling)``
    it declares (callers read these, never the signature)."""

    name: str  # the model name recorded in turns
    # generate(..., seeds=[one per conversation]) draws each row from its own seed; False: one ``sampling.seed``
    # per call, so a caller asking k samples of one prompt makes k calls
    takes_seeds: bool
    # generate(..., on_batch=f) calls f with each batch as it finishes; False: the caller reports the whole call
    takes_on_batch: bool

    def generate(self, conversations: list[Conversation], sampling: SamplingConfig) -> list[Generation]: ...

    def prompt_fit(self, conversation: Conversation, max_new_tokens: int) -> Fit | None:
        """How the rendered prompt compares with the context's room for it; None where the backend cannot tell
        (no tokenizer: the server refuses what does not fit)."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def keep_last_tokens(self, text: str, n: int) -> str: ...

    def close(self) -> None: ...
