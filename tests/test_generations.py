"""Generations (debate, train, evolve): two generations on the embedded model, generation 2's team seating
generation 1's experts, with no gold answers (build.target: consensus); eval and the report per generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pluribus.config import load_recipe
from pluribus.eval.stats import mcnemar_exact
from pluribus.run import run_recipe

PROMPT = "{question} Answer with \\boxed{N}."


def _payload() -> dict:
    """A scored main task of two generations: per-problem outcomes and accuracies, as the eval stage makes them."""
    def right(*ids: int) -> dict[str, bool]:
        return {f"p{i}": i in ids for i in range(6)}

    outcomes = {"single-greedy": right(0), "sc": right(0, 1), "team": right(0, 1, 2), "rsft-greedy": right(0, 1),
                "self-rsft-greedy": right(1), "gen2/team": right(0, 1, 2, 3), "gen2/sc": right(0, 1),
                "gen2/rsft-greedy": right(0, 1, 2, 3, 4), "gen2/self-rsft-greedy": right(0)}
    systems = {k: {"accuracy": sum(v.values()) / len(v)} for k, v in outcomes.items()}
    return {"systems": systems, "outcomes": outcomes}


def test_the_report_answers_the_question_per_generation(tmp_path: Path) -> None:
    from pluribus.eval.generations import GenerationSystems, answer, family
    from pluribus.eval.report import generations_section, write_generations_plot

    roles = [GenerationSystems(1, "team", ("single-greedy",), "sc", ("rsft-greedy", "self-rsft-greedy"),
                               "self-rsft-greedy"),
             GenerationSystems(2, "gen2/team", ("rsft-greedy", "self-rsft-greedy"), "gen2/sc",
                               ("gen2/rsft-greedy", "gen2/self-rsft-greedy"), "gen2/self-rsft-greedy")]
    gens = answer(roles, _payload())
    g2 = gens["generations"][1]
    team = {c["against"]: c for c in g2["team_comparisons"]}
    # the best member on the team's problems is generation 1's rsft (2 of 6, against self-rsft's 1)
    assert team["best member"]["versus"] == "rsft-greedy" and (team["best member"]["wins"], team["best member"]["losses"]) == (2, 0)
    assert team["sc"]["versus"] == "gen2/sc" and team["sc"]["p_value"] == mcnemar_exact(2, 0) == 0.5
    students = {(c["system"], c["against"]): c for c in g2["student_comparisons"]}
    vs_self = students[("gen2/rsft-greedy", "self baseline")]
    assert vs_self["versus"] == "gen2/self-rsft-greedy" and (vs_self["wins"], vs_self["losses"]) == (4, 0)
    assert vs_self["p_value"] == mcnemar_exact(4, 0) and vs_self["difference"] == pytest.approx(4 / 6)
    assert ("gen2/self-rsft-greedy", "self baseline") not in students  # never against itself
    assert students[("gen2/self-rsft-greedy", "base")]["p_value"] == 1.0
    assert gens["base_accuracy"] == pytest.approx(1 / 6) and family("gen2/rsft-greedy") == "rsft-greedy"
    text = "\n".join(generations_section(gens))
    assert "### Generation 2" in text and "| gen2/rsft-greedy | self baseline: gen2/self-rsft-greedy | 6 | 83.3% " \
        "| 16.7% | +66.7% | 4 | 0 | 0.125 |" in text
    png = write_generations_plot({"generations": gens, "tasks": [{"problems": 6, "team_problems": 6}]}, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_team_as_the_prm_rechooses_it_is_compared_with_the_same_others_as_the_team() -> None:
    """team-prm's rows sit beside the team's, against the best member, sc and prm-bon at the same budget."""
    from pluribus.eval.generations import GenerationSystems, answer
    from pluribus.eval.report import generations_section

    def right(*ids: int) -> dict[str, bool]:
        return {f"p{i}": i in ids for i in range(6)}

    outcomes = {"single-greedy": right(0), "rsft-greedy": right(0, 1), "gen2/team": right(0, 1),
                "gen2/team-prm": right(0, 1, 2, 3, 4), "gen2/sc": right(0), "gen2/prm-bon": right(0, 5)}
    main = {"systems": {k: {"accuracy": sum(v.values()) / 6} for k, v in outcomes.items()}, "outcomes": outcomes}
    role = GenerationSystems(2, "gen2/team", ("rsft-greedy",), "gen2/sc", (), None, verifier="gen2/prm-bon",
                             team_verifier="gen2/team-prm")
    [g] = answer([role], main)["generations"]
    rows = {(c["system"], c["against"]): c for c in g["team_comparisons"]}
    assert set(rows) == {(t, a) for t in ("gen2/team", "gen2/team-prm") for a in ("best member", "sc", "verifier")}
    best = rows[("gen2/team-prm", "best member")]
    assert best["versus"] == "rsft-greedy" and (best["wins"], best["losses"]) == (3, 0)
    assert (rows[("gen2/team-prm", "verifier")]["wins"], rows[("gen2/team-prm", "verifier")]["losses"]) == (4, 1)
    assert g["accuracy"]["gen2/team-prm"] == pytest.approx(5 / 6) and g["accuracy"]["gen2/prm-bon"] == pytest.approx(2 / 6)
    assert "| gen2/team-prm | verifier: gen2/prm-bon | 6 |" in "\n".join(generations_section({"generations": [g]}))


def test_a_seat_eval_did_not_run_alone_is_named_not_taken_for_another(tmp_path: Path) -> None:
    """A base seat on another model than the first agent is not the single agent; a seat eval.systems leaves out
    is in no comparison: the report names both instead of comparing the team with a member it does not have."""
    from pluribus.eval.report import generations_section
    from pluribus.eval.systems import plan_systems
    from pluribus.stages.eval import generation_plans, per_generation

    other = "{name: other, model: tiny-other, sampling: {temperature: 0.7}}"
    recipe = _recipe(tmp_path, f"team.agents=[{{name: first, model: smollm2-135m}}, {other}]",
                     "generations.seats=[rsft, base]", "eval.systems=[single, team, sc, self-rsft]")
    plans = [*plan_systems(recipe, check=False), *generation_plans(recipe, check=False)]
    main = _payload()
    gens = per_generation(recipe, plans, main)
    g1, g2 = gens["generations"]
    assert list(g1["members"]) == ["single-greedy", "other (tiny-other)"] and g1["not_evaluated"] == ["other (tiny-other)"]
    assert list(g2["members"]) == ["rsft-greedy", "other (tiny-other)"]
    # generation 1's rsft is evaluated in this payload, the other model alone is not
    assert g2["not_evaluated"] == ["other (tiny-other)"]
    best = {c["against"]: c for c in g2["team_comparisons"]}["best member"]
    assert best["versus"] == "rsft-greedy"
    text = "\n".join(generations_section(gens))
    assert "Not evaluated alone, so in no comparison (the best member is the best of the others): other " \
        "(tiny-other)." in text


def _recipe(tmp_path: Path, *overrides: str):
    agent = "{model: smollm2-135m, sampling: {temperature: 0.7, max_new_tokens: 24}}"
    return load_recipe(None, [
        "name=gens", f"root={tmp_path}", "seed=0",
        "task.source=synthetic", "task.synthetic.level=quickstart", "task.n=6", "task.heldout_fraction=0.3",
        f"team.agents=[{agent}, {agent}]", "team.rounds=2", f"team.prompts.question='{PROMPT}'",
        "build.kinds=[rsft]", "build.target=consensus", "build.self_samples=2",
        "train.max_steps=1", "train.batch_size=2", "train.eval_fraction=0.0", "train.report_to=[none]",
        "train.kernels=off", "train.lora.r=2", "train.save_steps=1000",
        "train.experts=[{objective: rsft}, {name: self-rsft, objective: rsft, data: self}]",
        "merge.experts=[rsft, self-rsft]", "merge.name=ta",
        "eval.n=3", "eval.team_n=2", "eval.max_new_tokens=16", "eval.sc_max_samples=4",
        "generations.count=2", "generations.seats=[rsft, ta]",
        *overrides,
    ])


@pytest.mark.integration
@pytest.mark.slow
def test_two_generations_the_second_team_seating_the_first_ones_experts(tmp_path: Path, smollm2_dir: Path) -> None:
    recipe = _recipe(tmp_path)
    results = run_recipe(recipe, progress=False)
    first = ["debate", "self", "build", "train:rsft", "train:self-rsft", "merge:ta"]
    assert [r.stage for r in results] == [*first, *(f"gen2/{k}" for k in first), "eval"]
    run = tmp_path / "gens"
    gen2 = run / "gen2"
    for folder in ("trajectories", "self/trajectories", "datasets/rsft", "self/datasets/rsft", "adapters/rsft",
                   "adapters/self-rsft", "merged/ta"):
        assert (gen2 / folder).is_dir(), folder
    # generation 2's team seats generation 1's rsft expert and ta merge; its self samples come from generation 1's
    # self student (the baseline iterated), with as many rows as its team's data
    team = [json.loads(line) for f in (gen2 / "trajectories").glob("shard-*.jsonl") for line in f.read_text().splitlines()]
    assert [t["model"] for t in team[0]["rounds"][0]] == [f"smollm2-135m+{run / 'adapters' / 'rsft'}",
                                                          f"smollm2-135m+{run / 'merged' / 'ta'}"]
    mine = [json.loads(line) for f in (gen2 / "self" / "trajectories").glob("shard-*.jsonl")
            for line in f.read_text().splitlines()]
    assert {t["model"] for t in mine[0]["rounds"][0]} == {f"smollm2-135m+{run / 'adapters' / 'self-rsft'}"}
    rows = json.loads((gen2 / "datasets" / "rsft" / "stats.json").read_text())["counts"]["rows"]
    mine = json.loads((gen2 / "self" / "datasets" / "rsft" / "stats.json").read_text())["counts"]
    assert mine["rows to match"] == rows and mine["rows"] == min(rows, mine["rows before matching"])
    record = json.loads((gen2 / "adapters" / "rsft" / "training_record.json").read_text())
    assert record["recipe"]["train"].get("init_adapter") is None  # generations.init: base (one step from the base)

    payload = json.loads((run / "eval" / "results.json").read_text())
    main = payload["tasks"][0]
    # generation 1's team is two copies of the base model: no member-sc; generation 2's seats two experts: it has one
    assert list(main["systems"]) == ["single-greedy", "sc", "team", "rsft-greedy", "self-rsft-greedy", "ta-greedy",
                                     "gen2/sc", "gen2/team", "gen2/member-sc", "gen2/rsft-greedy",
                                     "gen2/self-rsft-greedy", "gen2/ta-greedy"]
    # its member: the seat most often agreeing with the team in round 0 of generation 2's debate (target consensus)
    from pluribus.eval.members import debate_round0

    seats = debate_round0(team, "consensus")
    best = max(range(2), key=lambda i: (seats[i]["round0_accuracy"], -i))
    member = main["systems"]["gen2/member-sc"]
    assert member["member"] == f"agent{best}" and member["member_weights"]["adapter"] == str(
        [run / "adapters" / "rsft", run / "merged" / "ta"][best])
    assert member["member_chosen_by"] == ("highest round-0 agreement with the team's final answer in the debate "
                                          f"(build.target: consensus), {seats[best]['round0_accuracy']:.1%}"
                                          f" on {len(team)} training problems")
    assert main["systems"]["gen2/team"]["problems"] == 2 and main["systems"]["gen2/rsft-greedy"]["problems"] == 3
    assert "outcomes" not in main
    g1, g2 = payload["generations"]["generations"]
    assert g2["members"] == ["rsft-greedy", "ta-greedy"] and g2["self_baseline"] == "gen2/self-rsft-greedy"
    assert g1["not_evaluated"] == g2["not_evaluated"] == []  # every seat and baseline was evaluated alone
    assert {c["against"] for c in g2["team_comparisons"]} == {"best member", "sc", "member sc"}
    for c in g1["student_comparisons"] + g2["student_comparisons"]:
        assert c["p_value"] == mcnemar_exact(c["wins"], c["losses"])
    assert {(c["system"], c["against"]) for c in g2["student_comparisons"]} == {
        ("gen2/rsft-greedy", "base"), ("gen2/rsft-greedy", "self baseline"), ("gen2/self-rsft-greedy", "base"),
        ("gen2/ta-greedy", "base"), ("gen2/ta-greedy", "self baseline")}
    report = (run / "eval" / "report.md").read_text()
    assert "### Generation 2" in report and (run / "eval" / "generations.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun resumes: every step is current; with the stop rule on, the check after generation 1 reuses eval's
    # stores, is recorded, and generation 2 runs only if generation 1's best student beat the base agent
    again = run_recipe(_recipe(tmp_path, "generations.stop_if_no_gain=true"), progress=False)
    status = {r.stage: r.status for r in again}
    assert all(status[k] == "skipped" for k in first if k not in ("debate", "self"))
    check = json.loads((run / "generations.json").read_text())["checks"]["1"]
    assert check["previous_best"] == "single-greedy" and check["problems"] == 3
    systems = main["systems"]
    best = max(systems[k]["accuracy"] for k in ("rsft-greedy", "self-rsft-greedy", "ta-greedy"))
    assert check["accuracy"] == best and check["stop"] == (best <= systems["single-greedy"]["accuracy"])
    assert "Stop rule (generations.stop_if_no_gain)" in (run / "eval" / "report.md").read_text()
    if check["stop"]:
        assert all(status[f"gen2/{k}"] == "skipped" for k in first)
        assert "gen2/team" not in json.loads((run / "eval" / "results.json").read_text())["systems"]
    else:
        assert status["gen2/build"] == "skipped" and status["gen2/debate"] == "ran"


def test_the_study_recipe_runs_two_generations_in_order() -> None:
    """configs/study.yaml loads, and its plan runs generation 1 as the quickstart does, then the check, then
    generation 2 (whose team seats generation 1's self-rsft, rl and ties), then one eval of both."""
    from pluribus.generations import generation_recipe
    from pluribus.run import plan
    from pluribus.seats import seated_recipe

    root = Path(__file__).resolve().parents[1]
    study = load_recipe(root / "configs" / "study.yaml")
    quickstart = load_recipe(root / "configs" / "quickstart.yaml")
    keys = [s.key for s in plan(study)]
    first = [s.key for s in plan(quickstart)][:-2]  # the quickstart's steps before eval and export
    assert keys[: len(first)] == first and keys[-2:] == ["eval", "export"]
    gen1 = keys[: keys.index("gain:gen1")]
    assert gen1 == [*first, "merge:ties", "merge:pcb"]
    assert keys[len(gen1) + 1: -2] == [f"gen2/{k}" for k in gen1]
    _, seats = seated_recipe(generation_recipe(study, 2), check=False)
    run = study.layout
    assert seats == {"agents.0": run.adapter("self-rsft"), "agents.1": run.adapter("rl"), "agents.2": run.merged("ties")}
    assert study.eval.n >= 300


def test_each_generation_s_team_is_set_against_its_own_member_sc() -> None:
    """The task's team-versus table covers every generation where member-sc ran (gen2's against gen2's), and the
    report describes each generation's PRM choosers."""
    from pluribus.eval.report import _verifier_section
    from pluribus.stages.eval import _team_versus

    def right(*ids: int) -> dict[str, bool]:
        return {f"p{i}": i in ids for i in range(4)}

    outcomes = {"team": right(0), "sc": right(1), "gen2/team": right(0, 1), "gen2/team-prm": right(0, 1, 2),
                "gen2/member-sc": right(3), "gen2/sc": right(), "gen2/member-prm-bon": right(2, 3)}
    rows = _team_versus({k: [] for k in outcomes}, outcomes)
    assert {(r["system"], r["versus"]) for r in rows} == {
        (t, f"gen2/{o}") for t in ("gen2/team", "gen2/team-prm") for o in ("member-sc", "member-prm-bon", "sc")}

    def chooser(vote: str) -> dict:
        return {"verifier": f"prm of {vote}", "verifier_aggregate": "min", "verifier_prompt": "p", "vote": vote,
                "vs_vote": {"problems": 1, "vote_wrong": 0, "verifier_right_when_vote_wrong": 0, "verifier_wrong": 0,
                            "vote_right_when_verifier_wrong": 0, "any_sample_right": 0, "p_value": 1.0}}

    task = {"systems": {"team-prm": chooser("team"), "gen2/prm-bon": chooser("gen2/sc"),
                        "gen2/team-prm": chooser("gen2/team"), "prm-bon": chooser("sc")}}
    text = "\n".join(_verifier_section(task))
    assert [line.split(":")[0] for line in text.split("\n") if line.endswith("(the best any chooser could do).")] == [
        "prm-bon", "team-prm", "gen2/prm-bon", "gen2/team-prm"]
    assert "gen2/prm-bon: on each problem, the very samples gen2/sc voted over" in text
