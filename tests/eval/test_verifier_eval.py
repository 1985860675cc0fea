"""Eval's verifier: prm-bon chooses among exactly the samples sc voted over, the chooser agreement, the PRM's
quality and the per-seat round accounting in the report (closed form, a scripted scorer)."""

from __future__ import annotations

import pytest

from pluribus.config import load_recipe
from pluribus.errors import PluribusError
from pluribus.eval.report import markdown
from pluribus.eval.scoring import best_of_n, budget_vote, chooser_agreement, seat_rounds
from pluribus.eval.systems import plan_systems
from tests.data.test_verify import ScriptedVerifier


def _sample(agent: str, text: str, answer: str | None, correct: bool, tokens: int = 10) -> dict:
    return {"agent": agent, "round": 0, "model": "m", "response": text, "answer": answer, "correct": correct,
            "tokens_in": tokens // 2, "tokens_out": tokens - tokens // 2, "seconds": 0.1, "meta": {}}


def _draws(pid: str, samples: list[dict]) -> dict:
    return {"problem_id": pid, "question": f"q {pid}", "gold": "4", "team": [s["agent"] for s in samples],
            "rounds": [samples], "final_answer": None, "final_correct": None, "aggregation": "majority",
            "cost": {}, "run_id": "r", "meta": {}}


def test_prm_bon_chooses_among_exactly_the_samples_sc_voted_over():
    draws = [
        # the majority (3) is wrong; the verifier trusts "careful" lines; the 4th sample is past the budget
        _draws("p0", [_sample("sc0", "quick\n\\boxed{3}", "3", False), _sample("sc1", "quick\n\\boxed{3}", "3", False),
                      _sample("sc2", "careful\n\\boxed{4}", "4", True),
                      _sample("sc3", "careful\ncareful\n\\boxed{4}", "4", True)]),
        # the majority is right, the verifier's favourite wrong
        _draws("p1", [_sample("sc0", "quick\n\\boxed{4}", "4", True), _sample("sc1", "quick\n\\boxed{4}", "4", True),
                      _sample("sc2", "careful\n\\boxed{5}", "5", False),
                      _sample("sc3", "careful\n\\boxed{4}", "4", True)]),
    ]
    voted = [budget_vote(d, 30)[0] for d in draws]  # 3 samples of 10 tokens fit a budget of 30
    verifier = ScriptedVerifier({"careful": 0.9, "quick": 0.3})
    chosen = best_of_n(voted, verifier, "min")
    for v, c in zip(voted, chosen, strict=True):
        # the very samples sc voted over, in its order: ids and texts
        assert [t["agent"] for t in c["rounds"][0]] == [t["agent"] for t in v["rounds"][0]] == ["sc0", "sc1", "sc2"]
        assert [t["response"] for t in c["rounds"][0]] == [t["response"] for t in v["rounds"][0]]
        assert c["cost"] == v["cost"]  # the same tokens
        assert [m["agent"] for m in c["meta"]["verifier"]["members"]] == ["sc0", "sc1", "sc2"]
    assert [g[1] for g in verifier.calls[0]] == [[t["response"] for t in v["rounds"][0]] for v in voted]
    assert [v["final_answer"] for v in voted] == ["3", "4"]
    assert [(c["final_answer"], c["final_correct"]) for c in chosen] == [("4", True), ("5", False)]
    assert [c["meta"]["verifier"]["chosen"] for c in chosen] == ["sc2", "sc2"]
    agree = chooser_agreement(voted, chosen)
    assert agree == {"problems": 2, "vote_wrong": 1, "verifier_right_when_vote_wrong": 1, "verifier_wrong": 1,
                     "vote_right_when_verifier_wrong": 1, "any_sample_right": 2, "p_value": 1.0}


def test_seat_rounds_counts_each_seat_from_its_first_round_to_its_last():
    def traj(r0, r1):
        return {"team": ["a", "b"], "rounds": [[{"correct": x} for x in r0], [{"correct": x} for x in r1]]}

    seats = seat_rounds([traj([True, True], [False, True]), traj([False, True], [True, True]),
                         traj([False, False], [False, None]), {"team": ["a", "b"], "rounds": [[{"correct": True},
                                                                                              {"correct": False}]]}])
    assert seats[0] == {"seat": "a", "problems": 4, "round0_accuracy": 0.5, "final_accuracy": 0.5,
                        "right_to_wrong": 1, "wrong_to_right": 1}
    # b: a problem that stopped after round 0 counts round 0 as its last round
    assert seats[1] == {"seat": "b", "problems": 4, "round0_accuracy": 0.5, "final_accuracy": 0.5,
                        "right_to_wrong": 0, "wrong_to_right": 0}


def _payload(quality) -> dict:
    system = {"system": "prm-bon", "mode": "sampled", "problems": 10, "correct": 4, "accuracy": 0.4,
              "accuracy_low": 0.17, "accuracy_high": 0.69, "first_answer_accuracy": 0.3, "wrong_first_corrected": 0.0,
              "unparsable": 0.0, "tokens_per_problem": 300.0, "seconds_per_problem": 1.0, "verifier": "runs/x/prm",
              "verifier_fingerprint": "abc", "verifier_aggregate": "min", "verifier_prompt": "training record",
              "verifier_quality": quality,
              "vote": "sc", "vs_vote": {"problems": 10, "vote_wrong": 7, "verifier_right_when_vote_wrong": 2, "verifier_wrong": 6,
                        "vote_right_when_verifier_wrong": 1, "any_sample_right": 8, "p_value": 1.0}}
    seats = [{"seat": "solver", "problems": 10, "round0_accuracy": 0.36, "final_accuracy": 0.26,
              "right_to_wrong": 3, "wrong_to_right": 2}]
    task = {"name": "heldout", "task": "synthetic", "split": "heldout", "problems": 10, "team_problems": 10,
            "systems": {"prm-bon": system}, "comparisons": [], "seats": seats}
    return {"run": "r", "tasks": [task]}


def test_report_says_how_the_verifier_and_the_vote_differ_and_each_seats_rounds():
    text = markdown(_payload({"source": "prm_metrics", "auroc": 0.81, "f1": 0.7, "first_error_accuracy": 0.5,
                              "n_steps": 120, "n_rows": 30}))
    assert "where the majority vote is wrong, the PRM's choice is right on 2 of 7 (29%)" in text
    assert "where the PRM's choice is wrong, the majority is right on 1 of 6 (17%)" in text
    assert "some sample was right on 8 of 10 (80%)" in text
    assert ("step AUROC 0.810, step F1 0.700, first-error accuracy 0.500, steps 120, rows 30" in text)
    assert "| solver | 10 | 36.0% | 26.0% | 3 | 2 |" in text
    assert "not measured" in markdown(_payload(None))


def test_prm_bon_is_planned_with_sc_and_refused_without_it_or_a_prm(tmp_path):
    base = [f"root={tmp_path}", "task.source=synthetic", "team.rounds=2",
            "team.agents=[{name: a}, {name: b}]"]
    with pytest.raises(PluribusError, match="needs a process reward model"):
        plan_systems(load_recipe(None, [*base, "eval.systems=[single, team, sc, prm-bon]"]), check=False)
    with pytest.raises(PluribusError, match="add 'sc'"):
        plan_systems(load_recipe(None, [*base, "eval.systems=[single, team, prm-bon]", "eval.verifier=x"]),
                     check=False)
    # by default it comes with sc when the run trains one PRM, and reads it from <run>/adapters/<name>
    recipe = load_recipe(None, [*base, "train.experts=[{objective: rsft}, {objective: prm}]"])
    plans = {p.label: p for p in plan_systems(recipe, check=False)}
    assert "prm-bon" in plans and plans["prm-bon"].verifier == str(recipe.layout.adapter("prm"))
    assert plans["team-prm"].verifier == plans["prm-bon"].verifier and plans["team-prm"].team == plans["team"].team
    with pytest.raises(PluribusError, match="add 'team'"):
        plan_systems(load_recipe(None, [*base, "eval.systems=[single, team-prm]", "eval.verifier=x"]), check=False)


def test_team_prm_rechooses_the_teams_last_round_without_debating_again():
    def traj(pid, r0, r1):
        return {**_draws(pid, r0), "team": ["a", "b", "c"], "rounds": [r0, r1], "final_answer": "3",
                "final_correct": False, "cost": {"tokens_in": 50, "tokens_out": 50, "seconds": 1.0}}

    first = [_sample(n, "careful\n\\boxed{4}", "4", True) for n in "abc"]
    last = [_sample("a", "quick\n\\boxed{3}", "3", False), _sample("b", "quick\n\\boxed{3}", "3", False),
            _sample("c", "careful\n\\boxed{4}", "4", True)]
    team = [traj("p0", first, last)]
    verifier = ScriptedVerifier({"careful": 0.9, "quick": 0.3})
    [chosen] = best_of_n(team, verifier, "min")
    assert verifier.calls[0][0][1] == [t["response"] for t in last]  # the last round, not round 0
    assert (chosen["final_answer"], chosen["final_correct"], chosen["cost"]) == ("4", True, team[0]["cost"])
    assert chosen["rounds"] == team[0]["rounds"]  # the transcripts as the team debated them
    agree = chooser_agreement(team, [chosen])
    assert agree["verifier_right_when_vote_wrong"] == 1 and agree["any_sample_right"] == 1


def test_a_verifier_team_is_evaluated_with_its_prm_and_the_single_systems_without(tmp_path):
    prm = tmp_path / "elsewhere" / "prm"
    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "team.rounds=2",
                                "team.agents=[{name: a}, {name: b}]", "team.aggregation=prm_vote",
                                f"team.verifier={prm}"])
    plans = {p.label: p for p in plan_systems(recipe, check=False)}
    assert set(plans) == {"single-greedy", "sc", "team", "prm-bon"}  # the team is team-prm already
    assert plans["team"].team.verifier == str(prm.resolve()) == plans["team"].verifier
    assert plans["prm-bon"].verifier == str(prm)
    # the single agent and sc answer alone: no verifier, so their stores are those of a majority team's
    assert plans["single-greedy"].team.verifier is None and plans["sc"].team.verifier is None


def test_verifier_systems_count_coverage_over_the_problems_their_chooser_saw(tmp_path):
    """team-prm is asked the team's problems (eval.team_n), prm-bon sc's; neither over all of eval.n (a report
    that said they skipped the rest as too long was wrong)."""
    from types import SimpleNamespace

    from pluribus.eval.systems import SYSTEMS, TaskRun

    problems = [SimpleNamespace(id=f"p{i}") for i in range(5)]
    run = TaskRun(recipe=None, cfg=None, eval_dir=tmp_path, problems=problems, team_problems=problems[:2],
                  answer=lambda *a, **k: [])
    assert SYSTEMS["team-prm"].asked(run) == SYSTEMS["team"].asked(run) == {"p0", "p1"}
    assert SYSTEMS["prm-bon"].asked(run) is None is SYSTEMS["sc"].asked(run)
    assert SYSTEMS["single"].asked(run) == {p.id for p in problems}


def test_a_rerun_reads_the_prm_scores_it_wrote_and_scores_only_new_groups(tmp_path):
    """choose_by_verifier's RememberedScores: the groups an earlier eval scored (same question, same solutions in
    the same order) come back from its choices.jsonl without loading the PRM; the others are scored, once."""
    import json

    from pluribus.eval.systems import RememberedScores

    old = [_draws("p0", [_sample("a", "careful\n\\boxed{4}", "4", True), _sample("b", "quick\n\\boxed{3}", "3", False)])]
    first = ScriptedVerifier({"careful": 0.9, "quick": 0.3})
    chosen = best_of_n(old, first, "min")
    for r in chosen:
        r["meta"]["verifier"]["scored_with"] = "cpu:bfloat16:v1"
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    # scored on another device type or dtype (or by an older reading of solutions): nothing is remembered
    assert RememberedScores(first.name, lambda: first, choices, "cuda:bfloat16:v1").known == {}

    later = ScriptedVerifier({"careful": 0.1, "quick": 0.8})  # another scorer: a score it gives was not read back
    loads = []

    def load():
        loads.append(1)
        return later

    new = _draws("p1", [_sample("a", "quick\n\\boxed{4}", "4", True), _sample("b", "careful\n\\boxed{5}", "5", False)])
    changed = _draws("p0", [_sample("a", "careful\n\\boxed{4}", "4", True), _sample("b", "other\n\\boxed{3}", "3", False)])
    remembered = RememberedScores(first.name, load, choices, "cpu:bfloat16:v1")
    assert remembered.score([("q p0", ["careful\n\\boxed{4}", "quick\n\\boxed{3}"])]) == \
        [[m["step_scores"] for m in chosen[0]["meta"]["verifier"]["members"]]]
    assert loads == []  # everything known: the PRM is not even loaded
    again = best_of_n([*old, new, changed, new], remembered, "min")
    assert [g[0] for g in later.calls[0]] == ["q p1", "q p0"]  # the new group and the changed one, each once
    assert {**again[0]["meta"]["verifier"], "scored_with": "cpu:bfloat16:v1"} == chosen[0]["meta"]["verifier"]
    assert again[0]["final_answer"] == "4"
    assert again[1]["final_answer"] == "4" and loads == [1]  # the later scorer prefers "quick" lines
