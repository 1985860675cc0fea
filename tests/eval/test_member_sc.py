"""member-sc and member-prm-bon: the team's strongest member (by round-0 accuracy in the run's own debate, or
eval.member) sampled at the team's token budget as sc samples the base agent, and the PRM's choice among exactly
those samples; when they run by default; what results.json and the report say of them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pluribus.config import load_recipe
from pluribus.data.store import TrajectoryStore
from pluribus.errors import PluribusError, RecipeError
from pluribus.eval.members import strongest
from pluribus.eval.systems import plan_systems, requested


def _three(tmp_path: Path, *more: str) -> list[str]:
    agents = ", ".join(f"{{name: {n}, adapter: '{tmp_path / n}'}}" for n in "abc")
    return [f"root={tmp_path}", "name=r", "task.source=synthetic", "team.rounds=2", f"team.agents=[{agents}]",
            "eval.temperature=0.9", *more]


def _debate(folder: Path, round0: list[list[bool]], seats: tuple[str, ...] = ("a", "b", "c")) -> None:
    """A debate store whose problem i has seat j right in round 0 as ``round0[i][j]`` (round 1 all wrong)."""
    def turn(seat: str, rnd: int, ok: bool) -> dict:
        return {"agent": seat, "round": rnd, "model": "m", "response": "r", "answer": "4" if ok else "5",
                "correct": ok, "tokens_in": 5, "tokens_out": 5, "seconds": 0.1, "meta": {}}

    records = [{"problem_id": f"t{i}", "question": "q", "gold": "4", "team": list(seats),
                "rounds": [[turn(s, 0, ok) for s, ok in zip(seats, row, strict=True)],
                           [turn(s, 1, False) for s in seats]],
                "final_answer": "5", "final_correct": False, "aggregation": "majority",
                "cost": {"tokens_in": 30, "tokens_out": 30, "seconds": 1.0}, "run_id": "x", "meta": {}}
               for i, row in enumerate(round0)]
    with TrajectoryStore(folder, config_hash="test") as store:
        store.append(records)


def test_the_default_member_is_the_seat_most_accurate_in_round_0_of_the_runs_debate(tmp_path: Path) -> None:
    recipe = load_recipe(None, _three(tmp_path, "eval.systems=[single, team, sc, member-sc]"))
    # seat c is right on 3 of 4 training problems in round 0, a and b on 1 (round 1 is all wrong: not counted)
    _debate(recipe.layout.trajectories(), [[True, False, True], [False, True, True], [False, False, True],
                                           [False, False, False]])
    plans = {p.label: p for p in plan_systems(recipe, check=False)}
    member, sc = plans["member-sc"], plans["sc"]
    assert (member.member.seat, member.member.index) == ("c", 2)
    assert member.member.why == "highest round-0 accuracy in the debate, 75.0% on 4 training problems"
    agent = member.team.agents[0]
    # the seat's own weights, sampled as sc samples the base agent: its prompt, no persona, eval.temperature
    assert (agent.model, agent.adapter) == (recipe.team.agents[2].model, str(tmp_path / "c"))
    assert member.adapter == str(tmp_path / "c") and sc.team.agents[0].adapter is None
    assert agent.persona is None and agent.sampling.temperature == 0.9 == sc.team.agents[0].sampling.temperature
    assert member.team.prompts == sc.team.prompts and (member.team.rounds, len(member.team.agents)) == (1, 1)


def test_equal_seats_go_to_the_first_and_the_target_is_the_debates(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _debate(store, [[False, True, True], [True, False, False]])
    team = load_recipe(None, _three(tmp_path)).team
    assert strongest(store, team, "gold")[0] == 0  # a, b and c one right each: the first seat
    # build.target consensus (no gold): right means the team's final answer ("5"), which only seat c gave
    _debate(tmp_path / "s2", [[True, True, False], [True, False, False]])
    assert strongest(tmp_path / "s2", team, "gold") == (0, "highest round-0 accuracy in the debate, 100.0% on 2 "
                                                            "training problems")
    assert strongest(tmp_path / "s2", team, "consensus") == (
        2, "highest round-0 agreement with the team's final answer in the debate (build.target: consensus), 100.0% on "
           "2 training problems")


def test_eval_member_names_the_seat_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    recipe = load_recipe(None, _three(tmp_path, "eval.systems=[single, team, sc, member-sc]", "eval.member=a"))
    [plan] = [p for p in plan_systems(recipe) if p.system == "member-sc"]  # no debate store needed
    assert (plan.member.seat, plan.member.why, plan.team.agents[0].adapter) == ("a", "eval.member",
                                                                                 str(tmp_path / "a"))
    with pytest.raises(RecipeError, match=r"eval.member 'd' is not a seat of the team; use one of: a, b, c"):
        load_recipe(None, _three(tmp_path, "eval.member=d"))
    with pytest.raises(RecipeError, match="eval.systems has no member-sc"):
        load_recipe(None, _three(tmp_path, "eval.member=a", "eval.systems=[single, team, sc]"))


def test_without_the_debate_store_the_default_member_is_refused_with_the_fix(tmp_path: Path) -> None:
    recipe = load_recipe(None, _three(tmp_path, "eval.systems=[single, team, sc, member-sc]"))
    with pytest.raises(PluribusError, match="holds no debate yet; run the debate first"):
        plan_systems(recipe)
    _debate(recipe.layout.trajectories(), [[True, True]], seats=("x", "y"))  # another team's debate
    with pytest.raises(PluribusError, match="holds no trajectory of this team"):
        plan_systems(recipe)


def test_member_sc_runs_by_default_only_for_a_team_of_different_weights(tmp_path: Path) -> None:
    base = [f"root={tmp_path}", "task.source=synthetic", "team.rounds=2"]
    copies = load_recipe(None, [*base, "team.agents=[{name: a}, {name: b, persona: careful}]",
                                "eval.verifier=prm"])
    assert "member-sc" not in requested(copies) and "member-prm-bon" not in requested(copies)
    mixed = load_recipe(None, [*base, f"team.agents=[{{name: a}}, {{name: b, adapter: '{tmp_path / 'b'}'}}]"])
    assert [s for s in requested(mixed) if s.startswith("member")] == ["member-sc"]  # no PRM: no member-prm-bon
    judged = load_recipe(None, [*base, f"team.agents=[{{name: a}}, {{name: b, adapter: '{tmp_path / 'b'}'}}]",
                                "eval.verifier=prm"])
    assert requested(judged)[:6] == ["single", "sc", "team", "prm-bon", "member-sc", "member-prm-bon"]
    # named, it runs for copies too; eval.member adds it to the defaults
    named = load_recipe(None, [*base, "team.agents=[{name: a}, {name: b}]", "eval.systems=[team, member-sc]"])
    assert [p.label for p in plan_systems(named, check=False)] == ["team", "member-sc"]
    chosen = load_recipe(None, [*base, "team.agents=[{name: a}, {name: b}]", "eval.member=b"])
    assert "member-sc" in requested(chosen)


def test_member_prm_bon_needs_member_sc_and_a_prm(tmp_path: Path) -> None:
    with pytest.raises(PluribusError, match="add 'member-sc'"):
        plan_systems(load_recipe(None, _three(tmp_path, "eval.systems=[team, member-prm-bon]", "eval.verifier=x")),
                     check=False)
    with pytest.raises(PluribusError, match="needs a process reward model"):
        plan_systems(load_recipe(None, _three(tmp_path, "eval.systems=[team, member-sc, member-prm-bon]")),
                     check=False)


def test_member_prm_bon_rechooses_member_scs_voted_samples_not_scs(tmp_path: Path) -> None:
    from pluribus.eval.scoring import budget_vote
    from pluribus.eval.systems import SYSTEMS, TaskRun
    from tests.data.test_verify import ScriptedVerifier
    from tests.eval.test_verifier_eval import _draws, _sample

    prm = tmp_path / "prm"
    prm.mkdir()
    (prm / "adapter_model.safetensors").write_bytes(b"x")
    recipe = load_recipe(None, _three(tmp_path, "eval.systems=[single, team, sc, member-sc, member-prm-bon]",
                                      "eval.member=b", f"eval.verifier={prm}"))
    [plan] = [p for p in plan_systems(recipe, check=False) if p.system == "member-prm-bon"]
    # member-sc's draws: the majority (3) is wrong, the "careful" one right; the 4th is past the budget of 30
    member = [_sample("sc0", "quick\n\\boxed{3}", "3", False), _sample("sc1", "quick\n\\boxed{3}", "3", False),
              _sample("sc2", "careful\n\\boxed{4}", "4", True), _sample("sc3", "careful\n\\boxed{4}", "4", True)]
    base = [_sample(f"sc{i}", "other\n\\boxed{7}", "7", False) for i in range(3)]
    voted = {"member-sc": [budget_vote(_draws("p0", member), 30)[0]], "sc": [budget_vote(_draws("p0", base), 30)[0]]}
    verifier = ScriptedVerifier({"careful": 0.9, "quick": 0.3})
    run = TaskRun(recipe=recipe, cfg=recipe.eval, eval_dir=tmp_path / "eval", problems=[], team_problems=[],
                  answer=lambda *a, **k: [], records=voted, verifiers={plan.verifier: verifier})
    system = SYSTEMS["member-prm-bon"]
    ran = system.run(plan, run, system.store(plan, run.eval_dir))
    [rec] = ran.records
    assert verifier.calls == [[("q p0", [t["response"] for t in member[:3]])]]  # member-sc's voted samples only
    assert [t["agent"] for t in rec["rounds"][0]] == ["sc0", "sc1", "sc2"] and rec["cost"] == voted["member-sc"][0]["cost"]
    assert (rec["final_answer"], rec["meta"]["verifier"]["chosen"], voted["member-sc"][0]["final_answer"]) == ("4", "sc2", "3")
    assert (ran.extra["vote"], ran.extra["member"], ran.extra["member_chosen_by"]) == ("member-sc", "b", "eval.member")


def _lora(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on ``base`` with random (non-zero) weights: it answers unlike the base model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A tiny PRM trained for one step on the tiny Llama (as tests/distill/test_prm_verifier.py's)."""
    from pluribus.config import Recipe, TeamConfig
    from pluribus.distill.prm import train_prm
    from tests.distill.conftest import synthetic_problems, write_parquet
    from tests.distill.test_prm import recipe as prm_recipe

    tmp = tmp_path_factory.mktemp("prm")
    rows = [{"prompt": p["question"], "completions": p["steps"], "labels": [True, i % 2 == 0, i % 2 == 0],
             "scores": [1.0, 0.5, 0.5], "problem_id": p["id"]} for i, p in enumerate(synthetic_problems(8))]
    recipe = prm_recipe(tmp, tiny_llama_dir, max_steps=1, eval_fraction=0.0).model_copy(update={
        "team": TeamConfig(prompts={"question": "Problem: {question}"}),
        "build": Recipe(build={"step_rule": "sentences"}).build})
    return train_prm(recipe, dataset=write_parquet(rows, tmp / "process"), out=tmp / "adapters" / "prm")


def _stored(folder: Path) -> dict[str, dict]:
    return {(r := json.loads(line))["problem_id"]: r for f in folder.glob("trajectories/*.jsonl")
            for line in f.read_text().splitlines()}


@pytest.mark.slow
def test_member_sc_samples_the_members_weights_at_the_teams_budget_and_prm_bon_rechooses_them(
        tiny_llama_dir: Path, tiny_prm: Path, tmp_path: Path) -> None:
    from pluribus.adapter import adapter_fingerprint
    from pluribus.data.answers import vote_key
    from pluribus.distill.prm import PRMScorer
    from pluribus.eval.scoring import budget_vote, tokens
    from pluribus.stages.eval import run_eval

    b, c = _lora(tiny_llama_dir, tmp_path / "b", 1), _lora(tiny_llama_dir, tmp_path / "c", 2)
    sampling = "sampling: {max_new_tokens: 6}"
    agents = (f"[{{name: a, model: '{tiny_llama_dir}', {sampling}}}, {{name: b, model: '{tiny_llama_dir}', "
              f"adapter: '{b}', {sampling}}}, {{name: c, model: '{tiny_llama_dir}', adapter: '{c}', {sampling}}}]")
    recipe = load_recipe(None, [
        f"root={tmp_path}", "name=e", "task.source=synthetic", "task.n=3", "task.heldout_fraction=0.5",
        f"team.agents={agents}", "team.rounds=1", "eval.systems=[single, team, sc, member-sc, member-prm-bon]",
        f"eval.verifier={tiny_prm}", "eval.sc_max_samples=8"])
    # the run's debate (training problems): c is right on 2 of 2 in round 0
    _debate(recipe.layout.trajectories(), [[False, True, True], [True, False, True]])
    payload = run_eval(recipe, progress=False)
    row, bon = payload["systems"]["member-sc"], payload["systems"]["member-prm-bon"]
    assert (row["member"], bon["member"]) == ("c", "c")
    assert row["member_chosen_by"] == "highest round-0 accuracy in the debate, 100.0% on 2 training problems"
    assert row["member_weights"] == {"model": str(tiny_llama_dir), "adapter": str(c)}
    out = tmp_path / "e" / "eval"
    k = row["samples_drawn"]
    draws = _stored(out / "member-sc" / adapter_fingerprint(c) / f"k{k}")  # named by the member's weights
    budget = {pid: tokens(r) for pid, r in _stored(out / "team").items()}
    assert set(draws) == set(budget) and len(draws) == row["problems"] == 3
    for d in draws.values():  # k samples of the member's own weights (sc's draws are the base model's)
        assert [t["agent"] for t in d["rounds"][0]] == [f"sc{i}" for i in range(k)]
        assert {t["model"] for t in d["rounds"][0]} == {f"{tiny_llama_dir}+{c}"}
    # member-prm-bon's records are member-sc's votes re-chosen: the samples each vote used, at the team's budget
    chosen = [json.loads(line) for line in next((out / "member-prm-bon").glob("*/choices.jsonl")).read_text()
              .splitlines()]
    correct, used_counts = 0, []
    for rec in chosen:
        used, stored = rec["rounds"][0], draws[rec["problem_id"]]["rounds"][0]
        assert used == stored[: len(used)]  # the very samples (ids, texts), in their order
        spent, team = sum(t["tokens_in"] + t["tokens_out"] for t in used), budget[rec["problem_id"]]
        # sc's rule: stop at the budget, or before the sample that would land farther from it
        assert len(used) == len(stored) or spent >= team or spent + sum(
            stored[len(used)][x] for x in ("tokens_in", "tokens_out")) - team > team - spent
        assert (rec["cost"]["tokens_in"] + rec["cost"]["tokens_out"], len(used)) == (
            spent, budget_vote(draws[rec["problem_id"]], team)[1])
        votes = Counter(vote_key(t["answer"]) for t in used if t["answer"] is not None)
        top = [t for t in used if t["answer"] is not None and votes[vote_key(t["answer"])] == max(votes.values())]
        correct += bool(top and top[0]["correct"])  # the majority over its stored samples (first seen on ties)
        used_counts.append(len(used))
        scores = {m["agent"]: m["score"] for m in rec["meta"]["verifier"]["members"]}
        assert list(scores) == [t["agent"] for t in used]
        parsed = [t["agent"] for t in used if t["answer"] is not None]
        assert rec["meta"]["verifier"]["chosen"] == (max(parsed, key=lambda a: scores[a]) if parsed else None)
    assert row["correct"] == correct and row["mean_samples_used"] == pytest.approx(sum(used_counts) / 3)
    # the team's budget was spent (sized from the member's own round-0 tokens), by fewer samples than drawn
    assert row["budget_reached"] == 1.0 and min(used_counts) < k
    # the real PRM scored exactly those samples
    scorer = PRMScorer(tiny_prm)
    want = scorer.score([(r["question"], [t["response"] for t in r["rounds"][0]]) for r in chosen])
    got = [[m["step_scores"] for m in r["meta"]["verifier"]["members"]] for r in chosen]
    assert [[pytest.approx(s, abs=1e-5) for s in group] for group in want] == got
    assert bon["tokens_per_problem"] == row["tokens_per_problem"] and bon["vote"] == "member-sc"
    versus = {c["versus"]: c for c in payload["tasks"][0]["team_versus"]}
    assert set(versus) == {"member-sc", "member-prm-bon", "sc"} and versus["member-sc"]["problems"] == 3
    report = (out / "report.md").read_text()
    assert f"member-sc: the team's seat `c` (model `{tiny_llama_dir}`, adapter `{c}`; chosen by highest" in report
    assert "member-prm-bon: on each problem, the very samples member-sc voted over" in report
    assert "The team (as team.aggregation chooses its answer, and team-prm: the PRM's choice among its transcripts) " \
        "against its strongest" in report and "| team | member, vote: member-sc |" in report


def test_the_teams_comparisons_include_member_sc_and_member_prm_bon_where_they_ran() -> None:
    from pluribus.eval.generations import GenerationSystems, answer
    from pluribus.eval.report import generations_section
    from pluribus.eval.stats import mcnemar_exact

    def right(*ids: int) -> dict[str, bool]:
        return {f"p{i}": i in ids for i in range(8)}

    outcomes = {"single-greedy": right(0), "team": right(0, 1, 2, 3, 4), "sc": right(0, 1),
                "member-sc": right(0, 5, 6), "member-prm-bon": right(1, 2, 3, 4, 5)}
    main = {"systems": {k: {"accuracy": sum(v.values()) / 8} for k, v in outcomes.items()}, "outcomes": outcomes}
    roles = [GenerationSystems(1, "team", ("single-greedy",), "sc", (), None, member_sc="member-sc",
                               member_verifier="member-prm-bon")]
    [g] = answer(roles, main)["generations"]
    rows = {c["against"]: c for c in g["team_comparisons"]}
    assert list(rows) == ["best member", "sc", "member sc", "member verifier"]
    # team 5 of 8 against member-sc 3 of 8: the team alone on 1, 2, 3, 4, member-sc alone on 5, 6
    assert (rows["member sc"]["wins"], rows["member sc"]["losses"]) == (4, 2)
    assert rows["member sc"]["p_value"] == mcnemar_exact(4, 2)
    assert (rows["member verifier"]["wins"], rows["member verifier"]["losses"]) == (1, 1)
    assert g["accuracy"]["member-sc"] == 3 / 8
    text = "\n".join(generations_section({"generations": [g]}))
    assert f"| team | member sc: member-sc | 8 | 62.5% | 37.5% | +25.0% | 4 | 2 | {mcnemar_exact(4, 2):.3g} |" in text
