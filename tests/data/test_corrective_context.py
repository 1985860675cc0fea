"""Students that debate: a corrective row under build.corrective_context: debate is the exact debate prompt the
engine asked the agent in the round it corrected itself (peers included), answered by its corrected response."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.config import AgentConfig, BuildConfig, Recipe, TaskConfig, TeamConfig
from pluribus.data.backends import backend_key
from pluribus.data.builders.select import augmented_rows
from pluribus.data.debate import build_team, debate_prompts, debate_step
from pluribus.errors import PluribusError
from tests.data.test_debate import ScriptedBackend, problems

LONG = " ".join(f"w{i}" for i in range(40))  # 40 words: past a peer budget of 16, so peers are trimmed


def _reply(conv, k):
    """a0 is wrong in round 0 and right (after its peers) in round 1; a1 and a2 are right, at length."""
    who, rnd = conv[0]["content"], k
    answer = lambda n: "\\boxed{" + str(n) + "}"  # noqa: E731
    if who == "a0":
        return f"{LONG} {answer(5)}" if rnd == 0 else f"Peers convinced me. {answer(1)}"
    return f"{LONG} {who} {answer(1)}"


def _team(**kw) -> tuple[TeamConfig, ScriptedBackend, dict]:
    be = ScriptedBackend(_reply)
    cfg = TeamConfig(agents=[AgentConfig(name=f"a{i}", persona=f"a{i}") for i in range(3)], rounds=2,
                     peer_token_budget=16, **kw)
    return cfg, be, {backend_key(a): be for a in cfg.agents}


def _row_of_a0(rows):
    [row] = [r for r in rows if r["kind"] == "corrective"]
    assert (row["agent"], row["round"]) == ("a0", 1)
    return row


@pytest.mark.parametrize("topology", ["all", "ring", "star"])
def test_the_corrective_rows_user_turn_is_the_prompt_the_engine_asked(topology):
    cfg, be, backends = _team(topology=topology)
    [traj] = debate_step(problems(1), build_team(cfg, backends), run_id="r")
    assert traj.rounds[1][0].meta["peer_tokens_dropped"]  # the peers were trimmed in the debate
    rows = augmented_rows([traj], target="gold", prompt_template="{question}", k=4, ngram=3, measure="jaccard",
                          max_similarity=0.9, corrective=True, corrective_template="unused",
                          asked=debate_prompts(cfg, backends))
    row = _row_of_a0(rows)
    # round 1 is the backend's second call; a0's conversation is its first
    asked = be.calls[1][0]
    assert asked[0]["content"] == "a0" and asked[-1]["role"] == "user"
    assert row["messages"] == [{"role": "user", "content": asked[-1]["content"]},
                               {"role": "assistant", "content": traj.rounds[1][0].response}]
    peers = traj.rounds[1][0].meta["peers"]
    assert peers == (["a2"] if topology == "ring" else ["a1", "a2"])  # a star without a judge: a0 is its hub
    assert all(f"{p} \\boxed{{1}}" in row["messages"][0]["content"] for p in peers)  # their replies' ends


def test_the_question_context_keeps_todays_transcript():
    cfg, be, backends = _team()
    [traj] = debate_step(problems(1), build_team(cfg, backends), run_id="r")
    rows = augmented_rows([traj], target="gold", prompt_template="Q: {question}", k=4, ngram=3, measure="jaccard",
                          max_similarity=0.9, corrective=True, corrective_template="{first_answer} -> {corrected}")
    row = _row_of_a0(rows)
    assert row["messages"][0]["content"] == "Q: " + traj.question
    assert row["messages"][1]["content"] == "5 -> Peers convinced me. \\boxed{1}"


def test_a_store_of_another_team_is_refused_not_rebuilt_wrong():
    cfg, be, backends = _team()
    [traj] = debate_step(problems(1), build_team(cfg, backends), run_id="r")
    wider = cfg.model_copy(update={"peer_token_budget": 64})  # would show the peers untrimmed
    with pytest.raises(PluribusError, match="the store was debated by another team"):
        augmented_rows([traj], target="gold", prompt_template="{question}", k=4, ngram=3, measure="jaccard",
                       max_similarity=0.9, corrective=True, corrective_template="unused",
                       asked=debate_prompts(wider, backends))


def test_corrective_context_settings_are_checked():
    with pytest.raises(ValueError, match="build.corrective is false"):
        BuildConfig(corrective=False, corrective_context="debate")
    with pytest.raises(ValueError, match="corrective_template is unused"):
        BuildConfig(corrective_context="debate", corrective_template="{corrected}")
    assert BuildConfig().corrective_context == "question"


def test_build_rebuilds_the_prompt_with_each_agents_real_tokenizer(tmp_path: Path, tiny_llama_dir: Path):
    from pluribus.data.builders.datasets import build
    from pluribus.stages.debate import run_debate

    be = ScriptedBackend(_reply)
    agents = [AgentConfig(name=f"a{i}", persona=f"a{i}", model=str(tiny_llama_dir)) for i in range(3)]
    team = TeamConfig(agents=agents, rounds=2)  # a budget of 256 tokens: no peer is trimmed by either tokenizer
    recipe = Recipe(name="r", root=str(tmp_path), task=TaskConfig(n=1), team=team)
    run_debate(recipe, problems=problems(1), backends={backend_key(a): be for a in agents}, progress=False)
    [built] = build(BuildConfig(kinds=["augmented"], corrective_context="debate"), [tmp_path / "r"],
                    team=team, progress=False)
    from datasets import load_dataset

    rows = list(load_dataset("parquet", data_files=str(built.path / "data" / "*.parquet"))["train"])
    row = _row_of_a0(rows)
    assert row["messages"][0]["content"] == be.calls[1][0][-1]["content"]
    assert row["messages"][1]["content"] == "Peers convinced me. \\boxed{1}"


def test_in_a_star_around_a_judge_the_row_shows_the_judges_summary():
    cfg, be, backends = _team(topology="star")
    judge = AgentConfig(name="judge", persona="judge", model="judge-model")
    cfg = cfg.model_copy(update={"judge": judge})
    backends = {**backends, backend_key(judge): be}
    [traj] = debate_step(problems(1), build_team(cfg, backends), run_id="r")
    assert traj.rounds[1][0].meta["peers"] == ["judge"]
    rows = augmented_rows([traj], target="gold", prompt_template="{question}", k=4, ngram=3, measure="jaccard",
                          max_similarity=0.9, corrective=True, corrective_template="unused",
                          asked=debate_prompts(cfg, backends))
    row = _row_of_a0(rows)
    # round 0's agents, the judge of round 0, then round 1: a0's conversation opens the third call
    asked = be.calls[2][0]
    assert asked[0]["content"] == "a0" and row["messages"][0]["content"] == asked[-1]["content"]
    assert "judge \\boxed{1}" in row["messages"][0]["content"]
