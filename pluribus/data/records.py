"""The records passed between stages (DESIGN.md, "Records"): Problem, Turn, Trajectory.

Plain dataclasses with lossless ``to_dict`` / ``from_dict``, so a record written as one JSON line by one
stage reads back identically in the next.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__} record has unknown fields {sorted(unknown)}; expected {sorted(names)}")
    return cls(**d)


@dataclass(frozen=True)
class Problem:
    """A question with its gold final answer.

    ``answer`` is the gold final answer as a string; ``solution`` the gold worked steps when the source has
    them (one step per line for GSM8K and the synthetic task); ``meta`` holds source-specific extras such as
    multiple-choice ``choices`` or the synthetic task's ``level``.
    """

    id: str
    question: str
    answer: str
    solution: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Turn:
    """One agent's response in one round. ``answer`` is the extracted final answer (``None`` if unparsable)."""

    agent: str
    round: int
    model: str
    response: str
    answer: str | None
    correct: bool | None
    tokens_in: int
    tokens_out: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Turn:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Trajectory:
    """One problem solved by one team run: every round of every agent, the aggregate answer and the cost.

    ``rounds[r][i]`` is agent i's Turn in round r.
    """

    problem_id: str
    question: str
    gold: str
    team: list[str]
    rounds: list[list[Turn]]
    final_answer: str | None
    final_correct: bool | None
    aggregation: str
    cost: dict[str, float]
    run_id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        d = dict(d)
        d["rounds"] = [[t if isinstance(t, Turn) else Turn.from_dict(t) for t in rnd] for rnd in d["rounds"]]
        return _from_dict(cls, d)
