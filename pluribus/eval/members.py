"""The team's strongest member: which seat eval's member-sc samples at the team's budget, and why.

By default the seat with the highest round-0 accuracy in the run's own debate store (its training problems, each
turn judged against the debate's target, ``build.target``: gold, or the team's final answer; ties: the first seat
in team order), read with the debate report's per-seat accounting (``pluribus.eval.scoring.seat_rounds``), so no
held-out problem chooses it. ``eval.member`` names the seat instead. A team whose seats all run the same weights
has no member other than its first agent (member-sc would be sc up to a persona), which ``heterogeneous`` tells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluribus.config import AgentConfig, Recipe, TeamConfig
from pluribus.errors import PluribusError


@dataclass(frozen=True)
class Member:
    """The seat member-sc samples: its place in the team, its name, its weights, and why it was chosen."""

    index: int
    seat: str
    agent: AgentConfig  # as seated: the weights it debates with (model, adapter)
    why: str  # "eval.member", or its round-0 accuracy in the debate

    def weights(self) -> dict[str, str | None]:
        """Its model and adapter, for results.json."""
        return {"model": self.agent.model, "adapter": self.agent.adapter}


def weights_of(agent: AgentConfig) -> tuple[str, str, str | None]:
    """What an agent answers with: backend, model and adapter (its persona and sampling aside)."""
    return agent.backend, agent.model, agent.adapter


def heterogeneous(seated: TeamConfig) -> bool:
    """Whether the team (as seated) runs at least two different weights among its agents."""
    return len({weights_of(a) for a in seated.agents}) >= 2


def debate_round0(records: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """Per seat, over the debate's trajectories: ``seat_rounds`` with each turn's ``correct`` against ``target``
    (gold: as stored; consensus: the turn's answer equals the team's final answer, build.target's meaning)."""
    from pluribus.data.answers import is_equivalent
    from pluribus.eval.scoring import seat_rounds

    def agrees(turn: dict[str, Any], final: str | None) -> bool:
        return turn["answer"] is not None and final is not None and bool(is_equivalent(turn["answer"], final))

    if target == "consensus":
        records = [{**r, "rounds": [[{**t, "correct": agrees(t, r["final_answer"])} for t in rnd]
                                    for rnd in r["rounds"]]} for r in records]
    return seat_rounds(records)


def strongest(store: Path, team: TeamConfig, target: str) -> tuple[int, str]:
    """The index of the seat with the highest round-0 accuracy in the debate ``store`` (the first of equals), and
    why, as the report says it. Raises PluribusError for a missing store or one debated by another team."""
    from pluribus.data.store import TrajectoryStore

    names = team.seat_names()
    if not (store / "manifest.json").is_file():
        raise PluribusError(f"eval system 'member-sc' samples the team's strongest member by its round-0 accuracy "
                            f"in the run's debate, and '{store}' holds no debate yet; run the debate first "
                            "(pluribus run RECIPE runs it before eval), or name the seat in eval.member")
    with TrajectoryStore(store) as debate:
        records = [r for r in debate.iter_records() if list(r["team"]) == names]
    if not records:
        raise PluribusError(f"eval system 'member-sc': the debate store '{store}' holds no trajectory of this team "
                            f"(seats {', '.join(names)}); rerun the debate, or name the seat in eval.member")
    seats = debate_round0(records, target)
    best = max(range(len(seats)), key=lambda i: (seats[i]["round0_accuracy"], -i))
    s = seats[best]
    if target == "consensus":  # no gold: a seat is scored by agreeing with the team's final answer
        return best, (f"highest round-0 agreement with the team's final answer in the debate (build.target: "
                      f"consensus), {s['round0_accuracy']:.1%} on {s['problems']} training problems")
    return best, (f"highest round-0 accuracy in the debate, {s['round0_accuracy']:.1%} on {s['problems']} "
                  "training problems")


def choose_member(recipe: Recipe, seated: TeamConfig, *, check: bool) -> Member:
    """The seat member-sc samples: ``eval.member``, else the strongest in the run's debate (``strongest``).

    ``check`` unset (planning before anything ran) and no debate store yet: the first seat, its ``why`` saying
    so; such a plan is for planning only (``PlanContext.check``)."""
    team = recipe.require("team")
    names = team.seat_names()
    member = recipe.eval.member if recipe.eval is not None else None
    if member is not None:
        i = names.index(member)  # a seat of the team: the recipe checked it when it loaded
        return Member(i, member, seated.agents[i], "eval.member")
    store = recipe.layout.trajectories()
    if not check and not (store / "manifest.json").is_file():
        return Member(0, names[0], seated.agents[0], "planned before the debate ran: the first seat")
    target = recipe.build.target if recipe.build is not None else "gold"
    i, why = strongest(store, team, target)
    return Member(i, names[i], seated.agents[i], why)
