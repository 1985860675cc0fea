"""The verifier in the team: step scores into one score, prm_best / prm_vote, the scores kept in the trajectory
(a scripted scorer where the engine takes one; the real tiny PRM is in tests/distill/test_prm_verifier.py)."""

from __future__ import annotations

import math

import pytest

from pluribus.config import AgentConfig, Recipe, TaskConfig, TeamConfig, validate_recipe
from pluribus.data.backends import backend_key
from pluribus.data.debate import build_team, debate_step
from pluribus.data.store import TrajectoryStore
from pluribus.data.verify import choose, solution_score
from pluribus.errors import PluribusError, RecipeError
from pluribus.stages.debate import config_hash, run_debate
from tests.data.test_debate import ScriptedBackend, problems


class ScriptedVerifier:
    """Scores each line of a solution by a table of its texts (0.5 for a line it does not know); records calls."""

    name = "scripted-prm"

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.calls: list[list[tuple[str, list[str]]]] = []

    def score(self, groups):
        self.calls.append(groups)
        return [[[self.table.get(line, 0.5) for line in s.splitlines() if line.strip()] for s in solutions]
                for _, solutions in groups]


def test_solution_score_closed_forms():
    s = [0.9, 0.2, 0.5]
    assert solution_score(s, "min") == pytest.approx(0.2)
    assert solution_score(s, "product") == pytest.approx(0.09)
    assert solution_score(s, "last") == pytest.approx(0.5)
    assert solution_score(s, "mean") == pytest.approx(1.6 / 3)
    assert solution_score([], "product") == 0.0  # no steps: nothing vouches for it
    with pytest.raises(PluribusError, match="unknown step aggregation"):
        solution_score(s, "max")


def test_choose_best_and_weighted_vote():
    answers = ["3", "4", "4", None]
    scores = [0.9, 0.5, 0.3, 1.0]  # the unparsed answer never competes, whatever its score
    assert choose(answers, scores, "prm_best") == 0
    assert choose(answers, scores, "prm_vote") == 0  # 0.9 for "3" against 0.5 + 0.3 for "4"
    assert choose(answers, [0.9, 0.5, 0.45, 1.0], "prm_vote") == 1  # 0.95 for "4": its first voter's answer
    assert choose(["2", "2.0", "3"], [0.4, 0.4, 0.8], "prm_vote") == 0  # one number written twice: one answer, 0.8
    assert choose(["5", "6"], [0.7, 0.7], "prm_best") == 0  # a tie: the lowest index
    assert choose([None, None], [0.1, 0.2], "prm_best") is None


def _three_answers(conv, k):
    """a0 answers 1 (the majority's answer, also a1's), a2 answers 7, in every round."""
    who = conv[0]["content"]
    return "I count.\nSo \\boxed{7}" if who == "a2" else "I guess.\nSo \\boxed{1}"


def _team(aggregation: str, **kw) -> tuple[TeamConfig, dict]:
    be = ScriptedBackend(_three_answers)
    cfg = TeamConfig(agents=[AgentConfig(name=f"a{i}", persona=f"a{i}") for i in range(3)], rounds=2,
                     aggregation=aggregation, verifier="prm" if aggregation.startswith("prm_") else None, **kw)
    return cfg, {backend_key(a): be for a in cfg.agents}


def test_prm_best_picks_the_member_the_verifier_scores_highest_and_keeps_every_score():
    verifier = ScriptedVerifier({"I count.": 0.9, "So \\boxed{7}": 0.8, "I guess.": 0.4})
    cfg, backends = _team("prm_best", verifier_aggregate="min")
    trajs = debate_step(problems(2), build_team(cfg, backends, verifier), run_id="r")
    t = trajs[0]
    # the majority says 1 (a0, a1); the verifier scores a2's solution highest (min 0.8 against 0.4)
    assert [turn.answer for turn in t.rounds[-1]] == ["1", "1", "7"]
    assert t.final_answer == "7" and t.aggregation == "prm_best"
    v = t.meta["verifier"]
    assert v["chosen"] == "a2" and v["name"] == "scripted-prm" and v["aggregate"] == "min"
    assert [m["agent"] for m in v["members"]] == ["a0", "a1", "a2"]
    assert v["members"][2]["step_scores"] == [0.9, 0.8] and v["members"][2]["score"] == pytest.approx(0.8)
    assert v["members"][0]["step_scores"] == [0.4, 0.5] and v["members"][0]["score"] == pytest.approx(0.4)
    # one group per problem, each the last round's three solutions
    assert [len(g) for g in verifier.calls[0]] == [2, 2]
    assert verifier.calls[0][0][1] == [turn.response for turn in t.rounds[-1]]


def test_prm_vote_weighs_answers_and_the_aggregate_setting_counts():
    # a2's solution: 0.9 x 0.8 = 0.72 by product; a0 and a1: 0.4 x 0.5 = 0.2 each, 0.4 together -> 7 wins
    verifier = ScriptedVerifier({"I count.": 0.9, "So \\boxed{7}": 0.8, "I guess.": 0.4})
    cfg, backends = _team("prm_vote", verifier_aggregate="product")
    t = debate_step(problems(1), build_team(cfg, backends, verifier), run_id="r")[0]
    assert t.final_answer == "7"
    assert [m["score"] for m in t.meta["verifier"]["members"]] == pytest.approx([0.2, 0.2, 0.72])
    # by mean a0 and a1 weigh 0.45 each, 0.9 together, against a2's 0.85 -> the majority's 1
    cfg, backends = _team("prm_vote", verifier_aggregate="mean")
    t = debate_step(problems(1), build_team(cfg, backends, verifier), run_id="r")[0]
    assert t.final_answer == "1" and t.meta["verifier"]["chosen"] == "a0"


def test_a_verifier_team_without_a_scorer_or_setting_is_refused():
    cfg, backends = _team("prm_best")
    with pytest.raises(PluribusError, match="no verifier was given"):
        build_team(cfg, backends)
    with pytest.raises(ValueError, match="needs team.verifier"):
        TeamConfig(aggregation="prm_best")
    with pytest.raises(ValueError, match="does not use it"):
        TeamConfig(aggregation="majority", verifier="prm")


def test_recipe_refuses_a_verifier_that_names_an_expert_that_is_no_prm():
    train = {"experts": [{"objective": "rsft"}, {"objective": "prm"}]}
    with pytest.raises(RecipeError, match="team.verifier 'rsft' is a rsft expert, not a process reward model"):
        validate_recipe({"team": {"aggregation": "prm_best", "verifier": "rsft"}, "train": train})
    with pytest.raises(RecipeError, match="eval.verifier 'rsft' is a rsft expert"):
        validate_recipe({"eval": {"verifier": "rsft"}, "train": train})
    validate_recipe({"team": {"aggregation": "prm_best", "verifier": "prm"}, "train": train})


def test_the_debate_refuses_its_own_prm_a_missing_one_and_a_causal_adapter(tmp_path):
    cfg, backends = _team("prm_best")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=2), team=cfg,
                    train={"experts": [{"objective": "rsft"}, {"objective": "prm"}]})
    with pytest.raises(PluribusError, match="a cycle"):
        run_debate(recipe, problems=problems(2), backends=backends, progress=False)
    from pluribus.stages.debate import plan

    with pytest.raises(PluribusError, match="a cycle"):
        plan(recipe)  # `pluribus run` refuses before its first step
    elsewhere = recipe.model_copy(update={"train": None, "team": cfg.model_copy(update={"verifier": str(tmp_path / "no")})})
    with pytest.raises(PluribusError, match="neither an expert of the run nor an adapter folder"):
        run_debate(elsewhere, problems=problems(2), backends=backends, progress=False)
    causal = tmp_path / "rsft"
    causal.mkdir()
    (causal / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "CAUSAL_LM"}')
    (causal / "adapter_model.safetensors").write_bytes(b"weights")
    policy = elsewhere.model_copy(update={"team": cfg.model_copy(update={"verifier": str(causal)})})
    with pytest.raises(PluribusError, match="task type CAUSAL_LM, not a process reward model"):
        run_debate(policy, problems=problems(2), backends=backends, progress=False)
    assert not (tmp_path / "r" / "trajectories").exists()  # nothing written


def test_majority_stores_keep_their_hash():
    # the verifier settings exist only where they are used: every store written before them still resumes
    plain = Recipe(name="r", task=TaskConfig(n=2), team=TeamConfig(agents=[AgentConfig(name="a")]))
    dumped = plain.team.model_dump(mode="json")
    assert dumped["verifier"] is None and dumped["verifier_aggregate"] == "min"
    import hashlib
    import json

    from pluribus.config import without_engine_settings
    from pluribus.stages.debate import _CURRENT_EXCLUDE

    team = without_engine_settings(plain.team.model_dump(mode="json", exclude=_CURRENT_EXCLUDE))
    del team["verifier"], team["verifier_aggregate"]
    payload = {"task": plain.task.model_dump(mode="json", exclude={"n"}), "team": team, "seed": 0,
               "batch": [32, 32]}
    assert config_hash(plain) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_run_debate_stores_the_scores_and_resumes(tmp_path):
    folder = tmp_path / "prm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "TOKEN_CLS"}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")  # what keys the store (never loaded here)
    cfg, backends = _team("prm_best")
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=3),
                    team=cfg.model_copy(update={"verifier": str(folder)}))
    verifier = ScriptedVerifier({"I count.": 0.9, "So \\boxed{7}": 0.8, "I guess.": 0.4})
    s = run_debate(recipe, problems=problems(3), backends=backends, progress=False, verifier=verifier)
    assert s.problems == 3
    # the summary's seats: a0 and a1 answer 1 (right on p0 of 3, in both rounds), a2 answers 7 (never right)
    rows = dict(s.rows())
    assert rows["seat a0: round 0 -> last round"] == "33.3% -> 33.3% (0 right -> wrong, 0 wrong -> right)"
    assert rows["seat a2: round 0 -> last round"] == "0.0% -> 0.0% (0 right -> wrong, 0 wrong -> right)"
    records = list(TrajectoryStore(tmp_path / "r" / "trajectories").iter_records())
    assert all(r["meta"]["verifier"]["chosen"] == "a2" and r["final_answer"] == "7" for r in records)
    assert math.isclose(records[0]["meta"]["verifier"]["members"][1]["score"], 0.4)
    calls = len(verifier.calls)
    run_debate(recipe, problems=problems(3), backends=backends, progress=False, verifier=verifier)
    assert len(verifier.calls) == calls  # nothing left to debate: nothing scored again
    # another PRM (other contents) is another store
    before = config_hash(recipe)
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    assert config_hash(recipe) != before
    with pytest.raises(PluribusError, match="--new-run"):
        run_debate(recipe, problems=problems(3), backends=backends, progress=False, verifier=verifier)
