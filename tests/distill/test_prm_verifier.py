"""The real (tiny) PRM as the team's verifier and as eval's prm-bon chooser: it asks what it learned (its
training record's prompt and step rule), and the team's answer is the member it scores highest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pluribus.config import AgentConfig, Recipe, TaskConfig, TeamConfig, load_recipe
from pluribus.data.backends import backend_key
from pluribus.data.debate import build_team, debate_step
from pluribus.data.store import TrajectoryStore
from pluribus.distill.prm import PRMScorer, prm_reading, score_steps, train_prm
from pluribus.stages.debate import run_debate
from tests.data.test_debate import ScriptedBackend, problems
from tests.distill.test_prm import recipe as prm_recipe

SOLUTIONS = {"a0": "2 + 1 = 3.\nSo \\boxed{3}", "a1": "I add them: 9.\nThen 9 - 1 = 8.\nSo \\boxed{8}",
             "a2": "1 + 1 = 2.\nSo \\boxed{2}"}


def _reply(conv, k):
    return SOLUTIONS[conv[0]["content"]]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, student_dir) -> Path:
    from tests.distill.conftest import synthetic_problems, write_parquet

    tmp = tmp_path_factory.mktemp("prm")
    rows = [{"prompt": p["question"], "completions": p["steps"], "labels": [True, i % 2 == 0, i % 2 == 0],
             "scores": [1.0, 0.5, 0.5], "problem_id": p["id"]} for i, p in enumerate(synthetic_problems(8))]
    data = write_parquet(rows, tmp / "process")
    # the recipe it trains under says how its rows were asked: this question prompt, steps by sentences
    recipe = prm_recipe(tmp, student_dir, max_steps=1, eval_fraction=0.0).model_copy(update={
        "team": TeamConfig(prompts={"question": "Problem: {question}"}),
        "build": Recipe(build={"step_rule": "sentences"}).build})
    return train_prm(recipe, dataset=data, out=tmp / "adapters" / "prm")


def test_the_scorer_asks_the_prm_what_its_training_record_says(prm_dir):
    scorer = PRMScorer(prm_dir)
    fmt = scorer.prm.step_format
    # the recipe's step rule; its question prompt is not the template, since the rows were the bare questions
    assert (fmt.prompt_template, fmt.step_rule) == ("{question}", "sentences")
    assert "recorded" in prm_reading(prm_dir)["source"]
    question, solution = "What is 2 + 1?", "2 + 1 = 3. So the answer is 3."
    assert scorer.steps(solution) == ["2 + 1 = 3.", "So the answer is 3."]
    [[got]] = scorer.score([(question, [solution])])
    [want] = score_steps(scorer.prm, [(fmt.prompt(question), scorer.steps(solution))])
    assert got == want
    assert scorer.score([(question, ["", solution])])[0][0] == []  # no step: nothing scored


@pytest.mark.slow
def test_prm_best_with_the_real_prm_picks_the_member_it_scores_highest(prm_dir, tmp_path):
    be = ScriptedBackend(_reply)
    agents = [AgentConfig(name=n, persona=n) for n in SOLUTIONS]
    cfg = TeamConfig(agents=agents, rounds=1, aggregation="prm_best", verifier=str(prm_dir), verifier_aggregate="min")
    backends = {backend_key(a): be for a in agents}
    scorer = PRMScorer(prm_dir)
    t = debate_step(problems(1), build_team(cfg, backends, scorer), run_id="r")[0]
    # the PRM's own scores of each member's solution, asked as it was trained
    items = [(scorer.prm.step_format.prompt(t.question), scorer.steps(SOLUTIONS[n])) for n in SOLUTIONS]
    want = score_steps(scorer.prm, items)
    got = [m["step_scores"] for m in t.meta["verifier"]["members"]]
    assert got == want
    best = max(range(3), key=lambda i: (min(want[i]), -i))
    assert t.meta["verifier"]["chosen"] == list(SOLUTIONS)[best]
    assert t.final_answer == t.rounds[-1][best].answer
    # through the stage: the recipe's verifier folder is loaded, scored and kept in the store
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=1), team=cfg)
    run_debate(recipe, problems=problems(1), backends=backends, progress=False)
    [stored] = list(TrajectoryStore(tmp_path / "r" / "trajectories").iter_records())
    assert stored["meta"]["verifier"]["chosen"] == list(SOLUTIONS)[best]
    assert stored["meta"]["verifier"]["name"] == str(prm_dir)
    assert [m["step_scores"] for m in stored["meta"]["verifier"]["members"]] == want


@pytest.mark.slow
def test_eval_prm_bon_reads_sc_samples_and_reports(prm_dir, tiny_llama_dir, tmp_path):
    from pluribus.stages.eval import run_eval

    agent = f"{{model: '{tiny_llama_dir}', sampling: {{max_new_tokens: 6}}}}"
    recipe = load_recipe(None, [
        f"root={tmp_path}", "name=e", "task.source=synthetic", "task.n=4", "task.heldout_fraction=0.5",
        f"team.agents=[{agent}, {agent}]", "team.rounds=2", "eval.systems=[single, team, sc, prm-bon, team-prm]",
        f"eval.verifier={prm_dir}", "eval.sc_max_samples=5"])
    payload = run_eval(recipe, progress=False)
    sc, bon = payload["systems"]["sc"], payload["systems"]["prm-bon"]
    assert bon["problems"] == sc["problems"] and bon["tokens_per_problem"] == sc["tokens_per_problem"]
    assert bon["vs_vote"]["problems"] == sc["problems"]
    assert {c["system"]: c["baseline"] for c in payload["comparisons"]}["prm-bon"] == "single-greedy"
    # its choices are among sc's stored draws, the first ones sc voted over (its budget), in order
    out = tmp_path / "e" / "eval"
    draws = {json.loads(line)["problem_id"]: json.loads(line) for f in (out / "sc").glob("k*/trajectories/*.jsonl")
             for line in f.read_text().splitlines()}
    [choices] = list((out / "prm-bon").glob("*/choices.jsonl"))
    for line in choices.read_text().splitlines():
        rec = json.loads(line)
        used = rec["rounds"][0]
        assert [t["response"] for t in used] == [t["response"] for t in draws[rec["problem_id"]]["rounds"][0][:len(used)]]
        assert [t["agent"] for t in used] == [f"sc{i}" for i in range(len(used))]
        assert [m["agent"] for m in rec["meta"]["verifier"]["members"]] == [t["agent"] for t in used]
        if any(t["answer"] is not None for t in used):  # a random model rarely writes a parsable answer
            assert rec["meta"]["verifier"]["chosen"] in [t["agent"] for t in used]
        else:
            assert rec["meta"]["verifier"]["chosen"] is None and rec["final_answer"] is None
    report = (out / "report.md").read_text()
    assert "prm-bon: on each problem, the very samples sc voted over" in report
    assert "step accuracy" in report or "not measured" in report
    assert "Each seat of the team" in report
    assert [s["seat"] for s in payload["tasks"][0]["debate_rounds"]["team"]["seats"]] == ["agent0", "agent1"]
    # team-prm: the team's transcripts, re-chosen by the PRM at the team's cost
    team, again = payload["systems"]["team"], payload["systems"]["team-prm"]
    assert again["tokens_per_problem"] == team["tokens_per_problem"] and again["vote"] == "team"
    [choices] = list((out / "team-prm").glob("*/choices.jsonl"))
    stored = {json.loads(line)["problem_id"]: json.loads(line) for f in (out / "team").glob("**/*.jsonl")
              for line in f.read_text().splitlines()}
    for line in choices.read_text().splitlines():
        rec = json.loads(line)
        assert rec["rounds"] == stored[rec["problem_id"]]["rounds"]
    assert "team-prm: on each problem, the team's own last round" in report
