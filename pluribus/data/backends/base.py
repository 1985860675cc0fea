"""What every generation backend is: the ``Backend`` protocol and the ``Generation`` record it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pluribus.config import SamplingConfig

if TYPE_CHECKING:  # prompt.py imports this module
    from pluribus.data.backends.prompt import Fit

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
