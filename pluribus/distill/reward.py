"""A pluribus PRM as a reward function for TRL's ``GRPOTrainer``: ``reward_funcs=[PRMReward(adapter)]``.

TRL calls a custom reward as ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and takes
one float per completion. ``PRMReward`` scores each completion's steps with ``prm.score_solutions`` (the input
the PRM was trained on: its prompt template, step rule and separator) and aggregates them: ``min`` (the weakest
step), ``product`` (every step right), ``mean`` or ``last``; a completion in which the step rule finds no step
gets 0.0.

    from trl import GRPOConfig, GRPOTrainer
    from pluribus.distill.reward import PRMReward

    trainer = GRPOTrainer(model=..., reward_funcs=[PRMReward("runs/quickstart/adapters/prm", aggregate="min")],
                          args=GRPOConfig(...), train_dataset=...)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pluribus.data.verify import AGGREGATES
from pluribus.distill.prm import PRM, aggregate_steps, load_prm, score_solutions
from pluribus.errors import PluribusError, unknown_name


def _text(completion: str | Sequence[dict[str, Any]]) -> str:
    """A completion as text: TRL's plain form is the text, its conversational form a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")


class PRMReward:
    """``reward(prompts, completions, **kwargs) -> list[float]``: the aggregated PRM step scores of each completion.

    The prompt (text, or TRL's conversational list of messages) is the PRM's user turn as given: a pluribus
    process row's prompt, which GRPO prompts built from it are, already is the PRM's prompt. With
    ``question_column``, the PRM's prompt template is filled with that column of the dataset instead (TRL passes
    a dataset's other columns to reward functions by name). ``prm`` is a PRM adapter folder or a loaded ``PRM``.
    """

    def __init__(self, prm: str | Path | PRM, *, aggregate: str = "min", question_column: str | None = None,
                 batch_size: int = 8, trust_remote_code: bool = False) -> None:
        if aggregate not in AGGREGATES:
            raise PluribusError(unknown_name("step aggregation", aggregate, AGGREGATES))
        self.prm = prm if isinstance(prm, PRM) else load_prm(prm, trust_remote_code=trust_remote_code)
        self.aggregate, self.question_column, self.batch_size = aggregate, question_column, batch_size
        self.__name__ = f"prm_{aggregate}"  # TRL logs each reward under its callable's name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if self.question_column is not None:
            if self.question_column not in kwargs:
                raise PluribusError(f"PRMReward(question_column='{self.question_column}'): the dataset has no such "
                                    f"column; it passed {sorted(k for k in kwargs if not k.startswith(('trainer_', 'log_')))}")
            questions, rendered = list(kwargs[self.question_column]), False
        else:
            questions, rendered = [p if isinstance(p, str) else list(p) for p in prompts], True
        scores = score_solutions(self.prm, questions, [_text(c) for c in completions], rendered=rendered,
                                 batch_size=self.batch_size)
        return [aggregate_steps(s, self.aggregate) for s in scores]
