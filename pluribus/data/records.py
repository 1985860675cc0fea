"""The records passed between stages (DESIGN.md, "Records"): Problem, Turn, Trajectory.

Plain dataclasses with lossless ``to_dict`` / ``from_dict``, so a record written as one JSON line by one
stage reads back identically in the next. ``from_dict`` checks field names and JSON types, so a hand-edited or
foreign line is refused with the field named instead of failing later in a builder.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (str, int, float, bool, None, unions, list, dict, records)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_is(v, args[1]) for v in value.values())
    if hint is float:  # JSON writes 2.0 as 2
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _from_dict(cls, d: dict[str, Any]):
    """``cls(**d)`` for a record read back from JSON; a ValueError naming the field if a key or type is wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} record is {json.dumps(d, default=str)[:40]}, not a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__} record has unknown fields {sorted(unknown)}; expected {sorted(names)}")
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{cls.__name__} record lacks the field(s) {missing}")
    for name, hint in _hints(cls).items():
        if name in d and not _is(d[name], hint):
            raise ValueError(f"{cls.__name__} field '{name}' is {json.dumps(d[name], default=str)[:40]}, expected {_show(hint)}")
    return cls(**d)


def _show(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace(f"{__name__}.", "") if typing.get_args(hint) else hint.__name__


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
        if not isinstance(d, dict):
            return _from_dict(cls, d)  # raises, naming what it got
        d = dict(d)
        if "rounds" not in d:
            return _from_dict(cls, d)  # raises, naming the missing fields
        rounds = d["rounds"]
        if not (isinstance(rounds, list) and all(isinstance(rnd, list) for rnd in rounds)):
            raise ValueError(f"Trajectory field 'rounds' is {json.dumps(rounds, default=str)[:40]}, expected a list of rounds "
                             "(lists of turns)")
        d["rounds"] = [[t if isinstance(t, Turn) else Turn.from_dict(t) for t in rnd] for rnd in rounds]
        traj = _from_dict(cls, d)
        # every consumer reads rounds[0] and rounds[-1] and pairs turns with team members: a line with no
        # round, or a round missing an agent, is as unusable as a torn line
        if not traj.rounds:
            raise ValueError("Trajectory field 'rounds' is empty; a trajectory has at least one round")
        for r, rnd in enumerate(traj.rounds):
            if len(rnd) != len(traj.team):
                raise ValueError(f"Trajectory round {r} has {len(rnd)} turns for a team of {len(traj.team)}")
        return traj
