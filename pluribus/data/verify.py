"""A verifier's choice: a solution's step scores into one score, and a team's answer chosen by those scores.

A process reward model (PRM) scores each step of a solution with ``p_j`` in [0, 1] (pluribus.distill.prm). One
number per solution, ``how`` (``team.verifier_aggregate``):

    min      min_j p_j          the weakest step decides (Math-Shepherd ranks solutions so)
    product  prod_j p_j         the chance that every step is right, taking the steps as independent
    last     p_m                the score at the solution's last step
    mean     (1/m) sum_j p_j    the average step

A solution without steps scores 0.0. Over the last round of a debate (one solution per member):

    prm_best   the answer of the member whose solution scores highest; ties go to the lowest-index member
    prm_vote   each parsed answer weighs the sum of its voters' scores; the heaviest wins; ties go to the answer
               with more voters, then to the one given first (lowest index)

In both, members whose answer did not parse do not compete; with no parsed answer the final answer is None.
Pure functions: the scorer that produces ``p_j`` is passed in (``Verifier``), never loaded here; ``prm_folder``
says which PRM folder a recipe's verifier setting names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pluribus.errors import PluribusError

if TYPE_CHECKING:
    from pathlib import Path

    from pluribus.config import Recipe

AGGREGATES = ("min", "product", "last", "mean")


class Verifier(Protocol):
    """Scores solutions step by step. ``name`` identifies it in the trajectories (a PRM folder)."""

    name: str

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[list[float]]]:
        """For each ``(question, solutions)`` (one problem), each solution's step scores, in order."""
        ...


def solution_score(scores: Sequence[float], how: str) -> float:
    """One number from a solution's step scores (module docstring); 0.0 for a solution without steps."""
    if not scores:
        return 0.0
    if how == "min":
        return float(min(scores))
    if how == "product":
        return float(math.prod(scores))
    if how == "last":
        return float(scores[-1])
    if how == "mean":
        return float(sum(scores) / len(scores))
    raise PluribusError(f"unknown step aggregation '{how}'; use {', '.join(AGGREGATES)}")


def choose(answers: Sequence[str | None], scores: Sequence[float], aggregation: str) -> int | None:
    """The index of the member whose answer is final under ``prm_best`` or ``prm_vote`` (module docstring), or
    None when no answer parsed. ``answers[i]`` and ``scores[i]`` belong to member i."""
    from pluribus.data.answers import vote_key

    voters = [i for i, a in enumerate(answers) if a is not None]
    if not voters:
        return None
    if aggregation == "prm_best":
        return max(voters, key=lambda i: (scores[i], -i))
    if aggregation != "prm_vote":
        raise PluribusError(f"'{aggregation}' is not a verifier aggregation; use prm_best or prm_vote")
    weight: dict[str, float] = {}
    count: dict[str, int] = {}
    first: dict[str, int] = {}
    for i in voters:
        key = vote_key(answers[i])  # type: ignore[arg-type]
        weight[key] = weight.get(key, 0.0) + scores[i]
        count[key] = count.get(key, 0) + 1
        first.setdefault(key, i)
    best = max(weight, key=lambda k: (weight[k], count[k], -first[k]))
    return first[best]


def verdict(agents: Sequence[str], answers: Sequence[str | None], step_scores: Sequence[Sequence[float]],
            how: str, aggregation: str, name: str) -> tuple[int | None, dict[str, Any]]:
    """(chosen member index or None, the record kept in a trajectory's ``meta.verifier``): per member its step
    scores and their aggregate, the aggregation and who was chosen."""
    scores = [solution_score(s, how) for s in step_scores]
    pick = choose(answers, scores, aggregation)
    record = {"name": name, "aggregation": aggregation, "aggregate": how,
              "chosen": agents[pick] if pick is not None else None,
              "members": [{"agent": a, "step_scores": [float(x) for x in s], "score": sc}
                          for a, s, sc in zip(agents, step_scores, scores, strict=True)]}
    return pick, record


def prm_folder(recipe: Recipe, name: str, *, check: bool = True) -> Path:
    """The PRM folder a verifier setting (``team.verifier``, ``eval.verifier``) names: ``<run>/adapters/<name>``
    for an expert of the run (pluribus.layout), else the folder itself. With ``check``, a PluribusError when it is
    not a PRM adapter folder."""
    from pathlib import Path

    from pluribus.adapter import read_adapter_config

    experts = [t.expert_name for t in recipe.train.trainings()] if recipe.train else []
    path = recipe.layout.adapter(name) if name in experts else Path(name)
    if not check:
        return path
    if not (path / "adapter_config.json").is_file():
        what = (f"the run's PRM expert '{name}' is not trained yet ('{path}' holds no adapter); train it first "
                f"(pluribus train RECIPE --expert {name})") if name in experts else \
            f"verifier '{name}' is neither an expert of the run nor an adapter folder; give a PRM adapter folder"
        raise PluribusError(what)
    config = read_adapter_config(path)
    if config.get("task_type") != "TOKEN_CLS":
        raise PluribusError(f"verifier '{name}' ('{path}') is an adapter of task type {config.get('task_type')}, not "
                            "a process reward model (TOKEN_CLS, from `pluribus train --objective prm`)")
    return path
