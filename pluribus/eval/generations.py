"""Eval across generations: does a generation's team beat its best member and self-consistency at its budget, and
does each of its students beat the base agent and the self-distillation baseline of the same generation?

Every comparison is paired on the problems both systems answered, with the two-sided exact McNemar p
(pluribus.eval.stats). The systems of each generation are named by ``GenerationSystems`` (the eval stage knows
the labels); the outcomes are per problem, as the eval stage scored them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pluribus.eval.stats import mcnemar_exact, paired

BASE = "single-greedy"


@dataclass(frozen=True)
class GenerationSystems:
    """The labels of one generation's systems in eval."""

    generation: int
    team: str | None  # its team (None: eval did not run it)
    members: tuple[str, ...]  # its seats as single systems (the base agent: single-greedy)
    sc: str | None  # self-consistency at its team's token budget
    students: tuple[str, ...]  # its experts and merges
    self_baseline: str | None  # its self-distillation student (the single-agent baseline of this generation)
    # PRM best-of-N at the team's budget (the same draws as sc, another chooser) goes here beside sc
    verifier: str | None = None
    # the team's strongest member sampled at its budget (member-sc), and the PRM's choice among those draws
    member_sc: str | None = None
    member_verifier: str | None = None
    # the team's own transcripts re-chosen by the PRM (team-prm): compared with the same others as the team
    team_verifier: str | None = None


def versus(system: str, other: str, outcomes: dict[str, dict[str, bool]]) -> dict[str, Any] | None:
    """``system`` against ``other`` on the problems both answered: accuracies there, wins, losses, exact McNemar p;
    None when either was not evaluated."""
    if system not in outcomes or other not in outcomes:
        return None
    a, b = outcomes[system], outcomes[other]
    wins, losses, shared = paired(a, b)
    ids = a.keys() & b.keys()
    acc_a = sum(a[i] for i in ids) / shared if shared else 0.0
    acc_b = sum(b[i] for i in ids) / shared if shared else 0.0
    return {"system": system, "versus": other, "problems": shared, "accuracy": acc_a, "versus_accuracy": acc_b,
            "difference": acc_a - acc_b, "wins": wins, "losses": losses, "p_value": mcnemar_exact(wins, losses)}


def best_member(team: str, members: tuple[str, ...], outcomes: dict[str, dict[str, bool]]) -> str | None:
    """The member most accurate on the team's problems (the first of equals), or None if none was evaluated."""
    ids = outcomes.get(team, {}).keys()
    scored = [(sum(outcomes[m][i] for i in ids & outcomes[m].keys()), -k, m)
              for k, m in enumerate(members) if m in outcomes]
    return max(scored)[2] if scored else None


def team_against(team: str, others: tuple[tuple[str, str | None], ...],
                 outcomes: dict[str, dict[str, bool]]) -> list[dict[str, Any]]:
    """``team`` against each (role, label) of ``others`` that was evaluated (``versus``), the role in "against"."""
    rows = []
    for role, other in others:
        row = versus(team, other, outcomes) if other else None
        if row is not None:
            rows.append({"against": role, **row})
    return rows


def answer(roles: list[GenerationSystems], main: dict[str, Any]) -> dict[str, Any]:
    """Per generation: accuracy of each system, the team's comparisons (the team as it votes and as the PRM
    re-chooses its transcripts, against its best member, sc, PRM best-of-N, member-sc, member-prm-bon) and each
    student's (base, self baseline). ``main`` is the eval stage's scored main task (``systems``, ``outcomes``)."""
    outcomes: dict[str, dict[str, bool]] = main["outcomes"]
    systems = main["systems"]
    out = []
    for r in roles:
        team: list[dict[str, Any]] = []
        if r.team is not None:
            member = best_member(r.team, r.members, outcomes)
            others = (("best member", member), ("sc", r.sc), ("verifier", r.verifier), ("member sc", r.member_sc),
                      ("member verifier", r.member_verifier))
            team = [row for chooser in (r.team, r.team_verifier) if chooser
                    for row in team_against(chooser, others, outcomes)]
        students = []
        for s in r.students:
            for role, other in (("base", BASE), ("self baseline", r.self_baseline)):
                row = versus(s, other, outcomes) if other and other != s else None
                if row is not None:
                    students.append({"against": role, **row})
        labels = [x for x in (r.team, r.team_verifier, r.sc, r.verifier, r.member_sc, r.member_verifier, *r.students)
                  if x and x in systems]
        # a seat or baseline eval did not run (eval.systems): no comparison with it, and the report says so
        missing = [x for x in (*r.members, r.self_baseline) if x and x not in outcomes]
        out.append({**asdict(r), "accuracy": {x: systems[x]["accuracy"] for x in labels}, "not_evaluated": missing,
                    "team_comparisons": team, "student_comparisons": students})
    return {"base": BASE, "base_accuracy": systems[BASE]["accuracy"] if BASE in systems else None,
            "generations": out}


def family(label: str) -> str:
    """A system's name without its generation (``gen2/rsft-greedy`` -> ``rsft-greedy``): one line in the plot."""
    head, _, tail = label.partition("/")
    return tail if head.startswith("gen") and head[3:].isdigit() and tail else label
