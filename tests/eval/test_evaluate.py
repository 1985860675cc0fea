"""Eval: scoring from stored trajectories (closed form), planning errors, and an end-to-end eval on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pluribus.config import EvalConfig, load_recipe
from pluribus.errors import PluribusError
from pluribus.eval.scoring import score
from pluribus.eval.systems import plan_systems
from pluribus.stages.eval import run_eval


def _turn(correct: bool | None, answer: str | None = "1") -> dict:
    return {"correct": correct, "answer": answer}


def _traj(rounds: list[list[dict]], final: bool, tin: int = 10, tout: int = 5, sec: float = 1.0) -> dict:
    return {"rounds": rounds, "final_correct": final, "cost": {"tokens_in": tin, "tokens_out": tout, "seconds": sec}}


def test_score_matches_hand_computed_values() -> None:
    records = [
        # agent 0 wrong then right (corrected), agent 1 right both rounds
        _traj([[_turn(False), _turn(True)], [_turn(True), _turn(True)]], final=True),
        # agent 0 wrong both rounds (not corrected), agent 1 wrong then unparsable
        _traj([[_turn(False), _turn(False)], [_turn(False), _turn(None, answer=None)]], final=False, sec=3.0),
    ]
    r = score(records, "team", "as-configured")
    assert r.problems == 2 and r.correct == 1
    assert r.accuracy == 0.5
    assert (r.accuracy_low, r.accuracy_high) == pytest.approx((0.0945, 0.9055), abs=1e-4)  # Wilson, 1 of 2
    assert r.first_answer_accuracy == 0.25  # 1 of 4 round-0 turns
    assert r.wrong_first_corrected == pytest.approx(1 / 3)  # 3 wrong first answers, 1 corrected
    assert r.unparsable == 0.25
    assert r.tokens_per_problem == 15 and r.seconds_per_problem == 2.0


def test_distilled_without_adapter_is_a_clear_error(tmp_path: Path) -> None:
    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "team.rounds=1",
                                "eval.systems=[single, team, distilled]"])
    with pytest.raises(PluribusError, match="needs an adapter"):
        plan_systems(recipe)


def test_plan_single_and_sampled_modes(tmp_path: Path) -> None:
    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "team.rounds=3", "eval.systems=[single]",
                                "eval.modes=[greedy, sampled]", "eval.temperature=0.9",
                                "team.prompts.question='{question} Answer: The answer is N.'", "team.batch_size=7"])
    plans = plan_systems(recipe)
    assert [(p.system, p.mode) for p in plans] == [("single", "greedy"), ("single", "sampled")]
    assert plans[0].team.rounds == 1 and len(plans[0].team.agents) == 1
    # the single agent is asked exactly what the team's agents are asked
    assert plans[0].team.prompts == recipe.team.prompts and plans[0].team.batch_size == 7
    assert plans[0].team.agents[0].sampling.temperature == 0.0
    assert plans[1].team.agents[0].sampling.temperature == 0.9


@pytest.mark.slow
def test_eval_end_to_end_on_a_tiny_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(adapter)
    agent = f"{{model: '{tiny_llama_dir}', sampling: {{max_new_tokens: 6}}}}"
    recipe = load_recipe(None, [
        f"root={tmp_path}", "name=evalrun", "task.source=synthetic", "task.n=3", "task.heldout_fraction=0.5",
        f"team.agents=[{agent}, {agent}]", "team.rounds=2", f"eval.adapter={adapter}",
        "eval.systems=[single, team, distilled]",
        "eval.robustness=[distractor, typos]",
    ])
    payload = run_eval(recipe, progress=False)
    out = tmp_path / "evalrun" / "eval"
    assert set(payload["systems"]) == {"single-greedy", "team", "distilled-greedy"}
    assert json.loads((out / "results.json").read_text()) == payload
    report = (out / "report.md").read_text()
    assert report.count("| ") >= 3 and "McNemar" in report and "| team | distractor |" in report
    assert "next_generation" not in payload and "This run is one generation" not in report  # it trained nothing
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    for r in payload["systems"].values():
        assert r["problems"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["tokens_per_problem"] > 0
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
    assert {c["system"]: c["baseline"] for c in payload["comparisons"]} == {
        "team": "single-greedy", "distilled-greedy": "single-greedy"}
    for c in payload["comparisons"]:
        assert c["problems"] == 3 and c["wins"] + c["losses"] <= 3 and 0.0 < c["p_value"] <= 1.0
    # every system answered the perturbed copies too, from its own store; lost/gained pair them with the clean ones
    for label in payload["systems"]:
        for kind in ("distractor", "typos"):
            r = payload["robustness"][label][kind]
            assert r["change"] == pytest.approx(r["accuracy"] - payload["systems"][label]["accuracy"])
            assert r["lost"] - r["gained"] == round(-r["change"] * 3)
            # the distilled system's stores sit in a folder named by its adapter's fingerprint
            folder = out / f"{label}-{kind}" / (payload["adapter"]["fingerprint"] if label.startswith("distilled") else "")
            stored = (folder / "trajectories").glob("*.jsonl")
            ids = [json.loads(line)["problem_id"] for f in stored for line in f.read_text().splitlines()]
            assert len(ids) == 3 and all(i.endswith("~" + kind) for i in ids)
    # a rerun resumes from the stores: nothing is generated twice
    again = run_eval(recipe, progress=False)
    assert again == payload
    # other settings for the same store: refused, unless new_run moves the old answers aside
    shorter = f"{{model: '{tiny_llama_dir}', sampling: {{max_new_tokens: 5}}}}"
    changed = load_recipe(None, [f"root={tmp_path}", "name=evalrun", "task.source=synthetic", "task.n=3",
                                 "task.heldout_fraction=0.5", f"team.agents=[{shorter}, {shorter}]",
                                 "eval.systems=[single]"])
    with pytest.raises(PluribusError, match="--new-run"):
        run_eval(changed, progress=False)
    assert run_eval(changed, progress=False, new_run=True)["systems"]["single-greedy"]["problems"] == 3


def test_eval_bars_are_labelled_by_system(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import pluribus.stages.debate as debate

    labels = []
    real = debate.run_debate

    def recording(recipe, **kwargs):
        labels.append(kwargs.get("label"))
        return real(recipe, **kwargs)

    monkeypatch.setattr(debate, "run_debate", recording)
    agent = f"{{model: '{tiny_llama_dir}', sampling: {{max_new_tokens: 2}}}}"
    recipe = load_recipe(None, [f"root={tmp_path}", "name=e", "task.n=1", "task.heldout_fraction=0.5",
                                f"team.agents=[{agent}, {agent}]", "team.rounds=1", "eval.systems=[single, team]",
                                "eval.robustness=[typos]"])
    run_eval(recipe, progress=False)
    assert labels == ["single-greedy", "single-greedy-typos", "team", "team-typos"]


def _t(answer, correct, tin=10, tout=5):
    return {"answer": answer, "correct": correct, "tokens_in": tin, "tokens_out": tout, "seconds": 0.1}


def test_self_consistency_votes_over_the_samples_that_fit_the_budget() -> None:
    from pluribus.eval.scoring import budget_vote

    samples = {"problem_id": "p", "rounds": [[_t("3", False), _t("4", True), _t("4", True), _t("5", False)]],
               "final_correct": None, "cost": {}}
    # 15 tokens each: for a budget of 40 three samples (45) come closest, and their majority is 4
    voted, used = budget_vote(samples, 40)
    assert used == 3 and voted["final_answer"] == "4" and voted["final_correct"] is True
    assert voted["cost"] == {"tokens_in": 30, "tokens_out": 15, "seconds": pytest.approx(0.3)}
    # a budget under one sample still uses one; ties go to the answer seen first
    assert budget_vote(samples, 1)[1] == 1 and budget_vote(samples, 1)[0]["final_answer"] == "3"
    assert budget_vote(samples, 31)[1] == 2  # 30 tokens are closer to 31 than 45 are
    assert budget_vote(samples, 31)[0]["final_answer"] == "3"  # 3 vs 4, one vote each: first seen
    # more budget than samples: all of them; equal numbers written two ways are one vote
    frac = {**samples, "rounds": [[_t("0.5", True), _t("1/2", True), _t("7", False)]]}
    voted, used = budget_vote(frac, 10_000)
    assert used == 3 and voted["final_answer"] == "0.5" and voted["final_correct"] is True
    assert budget_vote({**samples, "rounds": [[_t(None, False)]]}, 5)[0]["final_correct"] is False


def test_early_stop_effect_from_full_trajectories() -> None:
    from pluribus.eval.scoring import early_stop_effect

    agree_right = {"rounds": [[_t("2", True), _t("2", True)], [_t("2", True), _t("2", True)]], "final_correct": True,
                   "cost": {"tokens_in": 40, "tokens_out": 20}, "meta": {}}
    # agreeing on a wrong answer in round 0 would stop there, though the debate later fixed it
    agree_wrong = {"rounds": [[_t("3", False), _t("3", False)], [_t("2", True), _t("2", True)]], "final_correct": True,
                   "cost": {"tokens_in": 40, "tokens_out": 20}, "meta": {}}
    split = {"rounds": [[_t("2", True), _t("3", False)], [_t("2", True), _t("2", True)]], "final_correct": True,
             "cost": {"tokens_in": 40, "tokens_out": 20}, "meta": {}}
    e = early_stop_effect([agree_right, agree_wrong, split])
    assert e["observed"] is False and e["stopped_early"] == 2 and e["accuracy_full"] == 1.0 and e["accuracy_early_stop"] == pytest.approx(2 / 3)
    assert e["tokens_full"] == 60 and e["tokens_early_stop"] == pytest.approx((30 + 30 + 60) / 3)
    assert e["tokens_saved"] == pytest.approx(1 - 40 / 60)
    assert early_stop_effect([{**split, "rounds": split["rounds"][:1]}]) is None  # one round: nothing to stop


def test_share_of_the_team_gain_on_the_team_problems() -> None:
    from pluribus.eval.scoring import team_gain

    def recs(correct, tokens):
        return [{"problem_id": f"p{i}", "final_correct": c, "cost": {"tokens_in": tokens, "tokens_out": 0}}
                for i, c in enumerate(correct)]

    records = {"single-greedy": recs([1, 0, 0, 0, 1], 10), "team": recs([1, 1, 1, 0, 0], 100),
               "rsft-greedy": recs([1, 1, 0, 0, 0], 20)}
    g = team_gain(records, {"p0", "p1", "p2", "p3"})  # p4 is not a team problem
    assert g["single_accuracy"] == 0.25 and g["team_accuracy"] == 0.75 and g["team_gain"] == 0.5
    assert g["systems"]["rsft-greedy"]["share_of_team_gain"] == pytest.approx(0.5)
    assert g["systems"]["rsft-greedy"]["token_fraction_of_team"] == pytest.approx(0.2)
    worse = team_gain({**records, "team": recs([1, 0, 0, 0, 0], 100)}, {"p0", "p1", "p2", "p3"})
    assert worse["systems"]["rsft-greedy"]["share_of_team_gain"] is None  # no gain to share


def test_early_stop_effect_of_a_run_that_stopped_or_had_a_judge() -> None:
    from pluribus.eval.scoring import early_stop_effect

    full = {"rounds": [[_t("2", True), _t("3", False)], [_t("2", True), _t("2", True)]], "final_correct": True,
            "cost": {"tokens_in": 40, "tokens_out": 20}, "meta": {}}
    stopped = {"rounds": [[_t("2", True), _t("2", True)]], "final_correct": True,
               "cost": {"tokens_in": 20, "tokens_out": 10}, "meta": {"stopped_after_round": 0}}
    e = early_stop_effect([full, stopped])
    assert e == {"problems": 2, "observed": True, "stopped_early": 1, "accuracy_early_stop": 1.0,
                 "tokens_early_stop": 45.0}
    judged = {**full, "meta": {"judge": [{"answer": "2"}]}}
    assert early_stop_effect([judged]) is None  # a stop would change the judge's input and cost


def test_eval_refuses_held_out_problems_the_debate_already_saw(tmp_path: Path) -> None:
    from pluribus.stages.eval import _eval_tasks

    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "task.split=heldout"])
    with pytest.raises(PluribusError, match="already saw the held-out problems"):
        _eval_tasks(recipe, EvalConfig())
    # a transfer task that is the training task itself takes the training task's split settings
    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "task.seed=3",
                                "task.heldout_fraction=0.4", "eval.tasks=[{name: again, source: synthetic}]"])
    (_, main, _), (_, again, _) = _eval_tasks(recipe, recipe.eval)
    assert (again.seed, again.heldout_fraction, again.split) == (3, 0.4, "heldout") == (main.seed, 0.4, main.split)


def test_a_transfer_task_with_team_true_runs_the_team_and_sc_there_too(tiny_llama_dir: Path, tmp_path: Path) -> None:
    agent = f"{{model: '{tiny_llama_dir}', sampling: {{max_new_tokens: 4}}}}"
    recipe = load_recipe(None, [
        f"root={tmp_path}", "name=transfer", "task.source=synthetic", "task.n=2", "task.heldout_fraction=0.5",
        f"team.agents=[{agent}, {agent}]", "team.rounds=2", "eval.systems=[single, team, sc]", "eval.sc_max_samples=2",
        "eval.tasks=[{name: two, source: synthetic, synthetic: {level: word2}, n: 2, team: true}, "
        "{name: one, source: synthetic, synthetic: {level: word1}, n: 2}]",
    ])
    payload = run_eval(recipe, progress=False)
    held, two, one = payload["tasks"]
    assert set(held["systems"]) == set(two["systems"]) == {"single-greedy", "team", "sc"}
    assert set(one["systems"]) == {"single-greedy"}  # without team: true a transfer task measures the single agent
    assert two["team_problems"] == 2 and one["team_problems"] == 0
    assert two["team_gain"]["problems"] == 2
    stored = (tmp_path / "transfer" / "eval" / "tasks" / "two" / "team" / "trajectories").glob("*.jsonl")
    assert sum(len(f.read_text().splitlines()) for f in stored) == 2
    assert "Transfer: `two`" in (tmp_path / "transfer" / "eval" / "report.md").read_text()


def _scored(correct: list[int], ids: list[int]) -> list[dict]:
    return [{"problem_id": f"p{i}", "final_correct": bool(c), "rounds": [[{"correct": bool(c), "answer": "1"}]],
             "cost": {"tokens_in": 10, "tokens_out": 5, "seconds": 1.0}} for i, c in zip(ids, correct, strict=True)]


def test_systems_that_answered_other_problems_are_counted_and_paired_on_shared_ones() -> None:
    from dataclasses import asdict

    from pluribus.eval.report import markdown
    from pluribus.eval.scoring import compare, coverage, outcomes

    # 6 problems; the rsft expert's longer prompt was skipped on p4 and p5 (team.too_long: skip)
    records = {"single-greedy": _scored([1, 0, 0, 1, 1, 1], [0, 1, 2, 3, 4, 5]),
               "rsft-greedy": _scored([1, 1, 1, 0], [0, 1, 2, 3])}
    everything = {f"p{i}" for i in range(6)}
    gaps = coverage(records, {"single-greedy": everything, "rsft-greedy": everything})
    assert gaps == {"rsft-greedy": {"asked": 6, "answered": 4}}
    (c,) = compare({k: outcomes(v) for k, v in records.items()})
    assert (c["problems"], c["wins"], c["losses"]) == (4, 2, 1)  # p4, p5 left out of the pairs
    task = {"task": "synthetic", "split": "heldout", "problems": 6, "team_problems": 0, "comparisons": [c],
            "systems": {k: asdict(score(v, k.split("-")[0], "greedy")) for k, v in records.items()},
            "unanswered": gaps}
    text = markdown({"run": "r", "tasks": [{**task, "name": "heldout"}]})
    assert "every single-agent system saw the same ones" not in text
    assert "rsft-greedy answered 4 of 6" in text and "over the problems both answered" in text
    full = {k: v for k, v in task.items() if k != "unanswered"}
    assert "every system answered all of them." in markdown({"run": "r", "tasks": [{**full, "name": "heldout"}]})


def test_robustness_change_is_measured_on_the_problems_both_runs_answered() -> None:
    from pluribus.eval.scoring import robustness_row

    clean = _scored([1, 1, 0, 0], [0, 1, 2, 3])
    # the distractor made p0's and p1's prompts too long: skipped; on p2 and p3 it changed nothing
    perturbed = [{**r, "problem_id": f"{r['problem_id']}~distractor"} for r in _scored([0, 0], [2, 3])]
    row = robustness_row(clean, perturbed, "single", "greedy")
    assert row["problems"] == 2 and row["change"] == 0.0  # not 0% - 50%: the lost problems were never asked
    assert (row["lost"], row["gained"]) == (0, 0)


def test_eval_max_new_tokens_reaches_every_agent_the_judge_included(tmp_path: Path) -> None:
    recipe = load_recipe(None, ["name=j", f"root={tmp_path}", "task.n=4", "task.split=train",
                                "team.aggregation=judge", "team.judge.name=judge",
                                "team.judge.sampling.max_new_tokens=300", "eval.max_new_tokens=17",
                                "eval.systems=[single, team, sc]"])
    capped = {p.label: p.team for p in plan_systems(recipe, check=False)}
    team = capped["team"]
    assert [a.sampling.max_new_tokens for a in team.agents] == [17] * len(team.agents)
    assert team.judge is not None and team.judge.sampling.max_new_tokens == 17
    assert all(a.sampling.max_new_tokens == 17 for t in capped.values() for a in t.agents)


def test_a_merged_system_shows_its_merge_error_beside_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Issue 26: a truncated merge was reported as if it were the merge its method names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pluribus.merge import run_merge

    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(str(tmp_path / f"a{seed}"))
    agent = f"{{model: '{tiny_llama_dir}', sampling: {{max_new_tokens: 4}}}}"
    inputs = ", ".join(f"{{path: '{a}'}}" for a in adapters)
    recipe = load_recipe(None, [
        f"root={tmp_path}", "name=m", "task.source=synthetic", "task.n=2", "task.heldout_fraction=0.5",
        f"team.agents=[{agent}]", "team.rounds=1", "eval.systems=[merged]",
        f"merge.spec={{method: task_arithmetic, rank: 2, inputs: [{inputs}]}}",
    ])
    summary = run_merge(recipe.merge.load(), recipe.layout.merged("merged"))
    payload = run_eval(recipe, progress=False)
    merge = payload["systems"]["merged-greedy"]["merge"]
    assert merge["error"] == summary.error > 0.01 and merge["note"] == "the exact merge's best approximation at rank 2, as asked"
    report = (tmp_path / "m" / "eval" / "report.md").read_text()
    assert (f"merged-greedy is the task_arithmetic merge (adapters -> adapter), relative error vs the exact merge "
            f"{summary.error:.3e}: the exact merge's best approximation at rank 2, as asked.") in report


def test_round_votes_say_what_stopping_after_each_round_would_have_given() -> None:
    from pluribus.eval.scoring import round_votes
    from pluribus.stages.eval import _debate_rounds

    def rec(r0, r1, final):
        return {"team": ["a", "b", "c"], "rounds": [[_t(a, a == "2") for a in r0], [_t(a, a == "2") for a in r1]],
                "final_correct": final, "meta": {}, "cost": {"tokens_in": 60, "tokens_out": 30}}

    # round 0 right by its vote, the debate talked the team out of it; one the debate fixed; one tie in round 0
    # that goes to the first voter
    records = [rec(["2", "2", "3"], ["3", "3", "2"], False), rec(["3", "3", "2"], ["2", "2", "2"], True),
               rec(["2", "3", None], ["3", "3", "3"], False), rec(["2", "2", "2"], ["2", "2", "2"], True)]
    votes = round_votes(records)
    assert [v["round"] for v in votes] == [0, 1]
    assert votes[0]["accuracy"] == 0.75 and votes[0]["only_round"] == 2 and votes[0]["only_final"] == 1
    assert votes[0]["p_value"] == 1.0 and votes[0]["problems"] == 4
    assert votes[0]["tokens"] == 3 * 15 and votes[1]["tokens"] == 6 * 15  # _t's turns: 10 in + 5 out
    assert votes[1]["accuracy"] == 0.5 and votes[1]["only_round"] == votes[1]["only_final"] == 0
    # a round-1 tie goes to the answer with more votes over rounds 0 and 1, as the debate breaks it
    tie = rec(["3", "3", "3"], ["2", "3", None], False)
    assert round_votes([tie, *records])[1]["accuracy"] == 0.4
    # early stopping (rounds differ), or an answer that is not a vote (a judge's verdict, a PRM's choice): no exact
    # what-if; a judge that only steers a majority team keeps it
    assert round_votes([*records, {**records[0], "rounds": records[0]["rounds"][:1]}]) == []
    for aggregation in ("judge", "prm_best", "prm_vote"):
        assert round_votes([{**r, "aggregation": aggregation} for r in records]) == []
    steered = [{**r, "aggregation": "majority", "meta": {"judge": [{"answer": "2"}]}} for r in records]
    assert round_votes(steered) == votes
    # every generation's team gets its rounds; a system that is not a team does not
    debates = _debate_rounds({"team": records, "gen2/team": records[:2], "sc": records, "gen2/team-prm": records})
    assert set(debates) == {"team", "gen2/team"}
    assert debates["gen2/team"]["votes"][0]["problems"] == 2 and debates["gen2/team"]["seats"][0]["seat"] == "a"
    assert debates["team"]["early_stop"]["stopped_early"] == 1  # the problem all three agree on in round 0


def test_the_report_shows_each_generations_team_round_by_round() -> None:
    from pluribus.eval.report import markdown

    votes = [{"round": 0, "problems": 300, "accuracy": 0.39, "tokens": 348.6, "only_round": 47, "only_final": 24,
              "p_value": 0.0086},
             {"round": 1, "problems": 300, "accuracy": 0.313, "tokens": 1379.1, "only_round": 0, "only_final": 0,
              "p_value": 1.0}]
    seats = [{"seat": "solver", "problems": 300, "round0_accuracy": 0.397, "final_accuracy": 0.303,
              "right_to_wrong": 40, "wrong_to_right": 12}]
    task = {"name": "heldout", "task": "synthetic", "split": "heldout", "problems": 300, "team_problems": 300,
            "systems": {}, "comparisons": [],
            "debate_rounds": {"gen2/team": {"votes": votes, "seats": seats, "early_stop": {
                "problems": 300, "observed": False, "stopped_early": 9, "accuracy_full": 0.313,
                "accuracy_early_stop": 0.313, "tokens_full": 1379.1, "tokens_early_stop": 1350.0,
                "tokens_saved": 0.021}}}}
    text = markdown({"run": "r", "tasks": [task]})
    assert "on 300 team problems, 9 would stop before the last round; accuracy 31.3% -> 31.3%" in text
    assert "### `gen2/team`, round by round" in text
    assert "| 0 | 300 | 39.0% | 349 | 47 | 24 | 0.0086 |" in text
    assert "| solver | 300 | 39.7% | 30.3% | 40 | 12 |" in text
