"""Teams of experts: a team agent seats an expert or a merge of the run by name; the recipe check refuses an unknown
name, a PRM and a cycle; `pluribus run` trains what a debate seats before it, and a retrained expert reruns the
debate that seats it and nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pluribus.config import validate_recipe
from pluribus.errors import RecipeError

TRAIN = {"experts": [{"objective": "rsft"}, {"name": "self-rsft", "objective": "rsft", "data": "self"},
                     {"objective": "prm"}, {"name": "rl", "objective": "rl", "init_adapter": "rsft"}]}
MERGE = {"experts": ["rsft", "rl"], "name": "ta"}


def _recipe(**sections: Any) -> Any:
    base: dict[str, Any] = {"name": "t", "task": {"n": 4}, "team": {"agents": [{"name": "a"}, {"name": "b"}]},
                            "train": TRAIN, "merge": MERGE}
    return validate_recipe({**base, **sections})


def _seated(*agents: dict[str, Any], **sections: Any) -> Any:
    return _recipe(team={"agents": list(agents)}, **sections)


def test_a_seat_names_an_expert_or_a_merge_of_the_run() -> None:
    recipe = _seated({"name": "a"}, {"name": "b", "expert": "rl"}, {"name": "c", "expert": "ta"})
    assert [a.expert for a in recipe.team.agents] == [None, "rl", "ta"]
    # a recipe without seats dumps as before (its stores' and steps' hashes are unchanged)
    assert "expert" not in recipe.team.agents[0].model_dump()
    with pytest.raises(RecipeError, match=r"team.agents.1.expert 'rll' is not an expert or merge of this run; use one "
                       r"of: rsft, self-rsft, rl, ta"):
        _seated({"name": "a"}, {"name": "b", "expert": "rll"})
    with pytest.raises(RecipeError, match=r"team.judge.expert 'prm' is a process reward model"):
        _recipe(team={"agents": [{"name": "a"}], "aggregation": "judge", "judge": {"expert": "prm"}})
    with pytest.raises(RecipeError, match=r"expert 'rl' and adapter '/x' both name the agent's weights"):
        _seated({"name": "b", "expert": "rl", "adapter": "/x"})
    with pytest.raises(RecipeError, match=r"runs on its base model smollm2-135m, not team.agents.0.model 'other'"):
        _seated({"name": "b", "expert": "rl", "model": "other"})
    # the run's recipe.yaml spells out the default model of a seat whose expert has another base: it loads again
    other_base = _seated({"name": "b", "expert": "rl"}, train={**TRAIN, "model": "tiny"})
    assert validate_recipe(other_base.to_dict()).team.agents[0].expert == "rl"
    with pytest.raises(RecipeError, match=r"merge of a config file or inline spec.*seat its folder instead"):
        _seated({"expert": "cfg"}, merge={"name": "cfg", "spec": {"method": "linear", "inputs": [
            {"path": "/a", "weight": 0.5}, {"path": "/b", "weight": 0.5}]}})


def test_a_seat_trained_on_its_own_teams_debate_is_a_cycle_that_generations_break() -> None:
    with pytest.raises(RecipeError, match=r"team.agents.1.expert 'self-rsft' trains on data built from this team's "
                       r"own debate: a cycle within one generation; use generations"):
        _seated({"name": "a"}, {"name": "b", "expert": "self-rsft"}, build={"kinds": ["rsft", "process"]})
    gens = {"count": 2, "seats": ["self-rsft", "ta"]}
    recipe = _recipe(build={"kinds": ["rsft", "process"]}, generations=gens)
    assert recipe.generations.seats == ["self-rsft", "ta"]
    for seats, message in ((["rsft"], r"generations.seats has 1 seats for a team of 2 agents"),
                           (["rsft", "nope"], r"generations.seats.1 'nope' is not an expert or merge of this run; "
                                              r"use one of: rsft, self-rsft, rl, ta, or base"),
                           (["prm", "base"], r"generations.seats.0 'prm' is a process reward model")):
        with pytest.raises(RecipeError, match=message):
            _recipe(build={"kinds": ["rsft"]}, generations={"count": 2, "seats": seats})
    # only a team's agents and judge take seats; elsewhere the name would be ignored
    with pytest.raises(RecipeError, match=r"build.completer.expert 'rsft': only team agents and the judge seat"):
        _recipe(build={"kinds": ["process"], "completer": {"expert": "rsft", "sampling": {"temperature": 0.7}}})
    with pytest.raises(RecipeError, match=r"seats, stop_if_no_gain act on generations 2 and later, and count is 1"):
        _recipe(build={"kinds": ["rsft"]}, eval={"n": 3},
                generations={"count": 1, "seats": ["rsft", "ta"], "stop_if_no_gain": True})
    one = _recipe(build={"kinds": ["rsft"]}, generations={"count": 1})
    assert validate_recipe(one.to_dict()).generations == one.generations  # as written in the run's recipe.yaml
    with pytest.raises(RecipeError, match=r"count > 1 needs seats"):
        _recipe(build={"kinds": ["rsft"]}, generations={"count": 2})
    with pytest.raises(RecipeError, match=r"generations.count 2 needs the sections \['build'\]"):
        _recipe(generations=gens)
    with pytest.raises(RecipeError, match=r"stop_if_no_gain compares generations on eval's held-out problems; add "
                       r"an eval section"):
        _recipe(build={"kinds": ["rsft"]}, generations={**gens, "stop_if_no_gain": True})
    # an openai agent answers with its server's model: a seat there would silently not be the expert
    served = {"name": "b", "backend": "openai", "base_url": "http://127.0.0.1:8000/v1"}
    with pytest.raises(RecipeError, match=r"generations.seats.1 'ta' would sit on team.agents.1, an openai agent"):
        _recipe(team={"agents": [{"name": "a"}, served]}, build={"kinds": ["rsft"]}, generations=gens)
    assert _recipe(team={"agents": [{"name": "a"}, served]}, build={"kinds": ["rsft"]},
                   generations={"count": 2, "seats": ["ta", "base"]}).generations.seats == ["ta", "base"]
    # generation 2's self baseline samples generation 1's self student on the first agent's settings
    with pytest.raises(RecipeError, match=r"generation g's self baseline samples generation g-1's self student "
                       r"\(self-rsft\) on team.agents.0, an openai agent"):
        _recipe(team={"agents": [served, {"name": "a"}]}, build={"kinds": ["rsft"]},
                generations={"count": 2, "seats": ["base", "ta"]})
    # the comparisons per generation (and the stop rule) are of greedy students
    with pytest.raises(RecipeError, match=r"generations compares each generation.s students greedy .*; add greedy "
                       r"to eval.modes"):
        _recipe(build={"kinds": ["rsft"]}, generations=gens, eval={"modes": ["sampled"]})


def test_the_debate_runs_after_the_experts_and_merges_its_team_seats() -> None:
    from pluribus.run import plan

    # no build section: the experts train on datasets already in the run, so seating them is no cycle
    recipe = _seated({"name": "a"}, {"name": "b", "expert": "ta"}, {"name": "c", "expert": "self-rsft"})
    keys = [s.key for s in plan(recipe)]
    assert keys == ["train:rsft", "train:prm", "train:rl", "merge:ta", "train:self-rsft", "debate", "self"]


def test_a_seat_resolves_to_the_run_folder_through_the_layout(tmp_path: Path) -> None:
    from pluribus.errors import PluribusError
    from pluribus.seats import base_agent, seated

    recipe = _seated({"name": "a"}, {"name": "b", "expert": "rl"}, {"name": "c", "expert": "ta"}, root=str(tmp_path))
    with pytest.raises(PluribusError, match=r"seats 'rl', but '.*adapters/rl' holds no adapter or model yet"):
        seated(recipe.team, recipe)
    team, folders = seated(recipe.team, recipe, check=False)
    assert folders == {"agents.1": recipe.layout.adapter("rl"), "agents.2": recipe.layout.merged("ta")}
    assert (team.agents[1].adapter, team.agents[1].model, team.agents[1].expert) == (
        str(recipe.layout.adapter("rl")), "smollm2-135m", None)
    merged = recipe.layout.merged("ta")
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")  # a full merged model: the seat runs it, no adapter
    team, _ = seated(recipe.team, recipe, check=False)
    assert (team.agents[2].model, team.agents[2].adapter) == (str(merged), None)
    assert base_agent(recipe.team.agents[2], recipe).model == "smollm2-135m"
    from pluribus.seats import base_team

    assert base_team(recipe.team, recipe).agents[0] == recipe.team.agents[0]  # an unseated first agent is kept
    alone = base_team(_seated({"name": "a", "expert": "ta"}, root=str(tmp_path)).team, recipe).agents[0]
    assert (alone.name, alone.model, alone.adapter, alone.expert) == ("a", "smollm2-135m", None, None)
    # the self baseline samples the first agent's base model, also when that agent seats an expert
    from pluribus.stages.selfsamples import self_team

    first = _seated({"name": "a", "expert": "rl"}, {"name": "b"}, root=str(tmp_path))
    assert {(a.model, a.adapter, a.expert) for a in self_team(first).agents} == {("smollm2-135m", None, None)}


def test_each_generation_has_its_own_folders_and_seats_the_previous_ones_experts(tmp_path: Path) -> None:
    from pluribus.generations import generation_recipe
    from pluribus.layout import RunLayout
    from pluribus.seats import seated_recipe, source_of

    layout = RunLayout(tmp_path / "r")
    assert layout.generation(1) is layout  # generation 1 is the run as it was: its folders stay where they are
    gen2 = layout.generation(2)
    assert gen2.trajectories() == tmp_path / "r" / "gen2" / "trajectories"
    assert gen2.trajectories("self") == tmp_path / "r" / "gen2" / "self" / "trajectories"
    assert gen2.dataset("rsft") == tmp_path / "r" / "gen2" / "datasets" / "rsft"
    assert gen2.adapter("rsft") == tmp_path / "r" / "gen2" / "adapters" / "rsft"
    assert gen2.merged("ta") == tmp_path / "r" / "gen2" / "merged" / "ta"
    with pytest.raises(ValueError, match="count from 1"):
        layout.generation(0)

    recipe = _recipe(root=str(tmp_path), name="r", build={"kinds": ["rsft", "process"], "target": "consensus"},
                     generations={"count": 3, "seats": ["base", "ta"], "init": "previous"})
    g2, g3 = generation_recipe(recipe, 2), generation_recipe(recipe, 3)
    assert g2.layout == gen2 and g3.layout == layout.generation(3)
    assert source_of(g3) is not None and source_of(g3).layout == gen2
    assert [a.expert for a in g2.team.agents] == [None, "ta"]
    assert g2.build.target == "consensus" and g2.task == recipe.task
    # every generation's process rollouts come from generation 1's first agent (the base), not from a seat
    assert g2.build.completer.name == "a" and g2.build.completer.expert is None and recipe.build.completer is None
    _, folders = seated_recipe(g3, check=False)
    assert folders == {"agents.1": gen2.merged("ta")}  # generation 3 seats generation 2's merge
    # the self baseline iterated: generation g's self samples come from generation g-1's self student
    assert g3._self_agent.expert == "self-rsft"
    from pluribus.stages.selfsamples import self_recipe

    _, self_seat = seated_recipe(self_recipe(g3), check=False)
    assert set(self_seat.values()) == {gen2.adapter("self-rsft")}
    # init: previous continues generation g-1's policy adapters (not the PRM's, not rl's own init)
    starts = {t.expert_name: t.init_adapter for t in g3.train.trainings()}
    assert starts == {"rsft": str(gen2.adapter("rsft")), "self-rsft": str(gen2.adapter("self-rsft")), "prm": None,
                      "rl": "rsft"}
    from pluribus.run import plan

    keys = [s.key for s in plan(recipe)]
    assert keys[:6] == ["debate", "self", "build", "train:rsft", "train:self-rsft", "train:prm"]
    assert keys[keys.index("merge:ta") + 1:] == [
        "gen2/debate", "gen2/self", "gen2/build", "gen2/train:rsft", "gen2/train:self-rsft", "gen2/train:prm",
        "gen2/train:rl", "gen2/merge:ta", "gen3/debate", "gen3/self", "gen3/build", "gen3/train:rsft",
        "gen3/train:self-rsft", "gen3/train:prm", "gen3/train:rl", "gen3/merge:ta"]


def test_the_stop_rule_skips_the_generations_after_one_without_gain(tmp_path: Path, monkeypatch) -> None:
    """The check is recorded; the generations after one that did not beat its predecessor are skipped, saying why."""
    from pluribus import run
    from pluribus.generations import last_generation, no_gain, record_check, stop_reason, stopped_after
    from pluribus.stages import Stage, StageSummary
    from pluribus.stages.generations import _with_skip

    assert no_gain(("a", 0.30), ("b", 0.30)) and no_gain(("a", 0.2), ("b", 0.3)) and not no_gain(("a", 0.31), ("b", 0.3))
    recipe = _recipe(root=str(tmp_path), build={"kinds": ["rsft"]}, eval={"n": 3},
                     generations={"count": 3, "seats": ["rsft", "rl"], "stop_if_no_gain": True})
    assert stopped_after(recipe) is None and last_generation(recipe) == 3
    ran: list[str] = []

    def step(key: str, g: int, result: tuple[float, float] | None = None) -> Stage:
        def go(progress: bool, new_run: bool) -> StageSummary:
            ran.append(key)
            if result:  # a check: generation g's best student against generation g-1's
                record_check(recipe, g, (f"gen{g}/rsft", result[0]), ("prev", result[1]), 3)
            return StageSummary(key, None, key)
        return _with_skip(Stage(key, go, keeps_store=True), recipe, g)

    steps = [step("gain:gen1", 1, (0.5, 0.3)), step("gen2/debate", 2), step("gain:gen2", 2, (0.4, 0.5)),
             step("gen3/debate", 3)]
    monkeypatch.setattr(run, "plan", lambda r: steps)
    results = run.run_recipe(recipe, progress=False)
    assert ran == ["gain:gen1", "gen2/debate", "gain:gen2"]
    assert [(r.stage, r.status) for r in results][-1] == ("gen3/debate", "skipped")
    assert "generation 2's best student gen2/rsft (40.0%) did not beat generation 1's prev (50.0%)" in results[-1].summary
    saved = json.loads(recipe.layout.generations_record.read_text())
    assert "criterion" in saved and [c["stop"] for c in saved["checks"].values()] == [False, True]
    assert stopped_after(recipe) == 2 and last_generation(recipe) == 2 and stop_reason(recipe, 2) is None
    # without the setting the record stops nothing
    off = recipe.model_copy(update={"generations": recipe.generations.model_copy(update={"stop_if_no_gain": False})})
    assert stopped_after(off) is None and last_generation(off) == 3


def test_a_store_debated_by_earlier_weights_of_its_seats_is_moved_aside(tmp_path: Path) -> None:
    """Same family (the team with its seats by role), another hash (their contents changed): stale, archived;
    another family (the team itself changed) is refused as before, unless --new-run."""
    from pluribus.data.store import TrajectoryStore
    from pluribus.errors import PluribusError

    folder = tmp_path / "trajectories"
    with TrajectoryStore(folder, "hash-a", family="team-1") as store:
        store.append([{"problem_id": "p0"}])
        first = store.run_id
    with TrajectoryStore(folder, "hash-b", family="team-1") as store:
        assert store.done_ids() == set() and store.manifest["family"] == "team-1"
        assert store.manifest["previous_runs"][-1]["run_id"] == first
        store.append([{"problem_id": "p0"}])
    assert (tmp_path / f"trajectories.prev-{first}" / "shard-00000.jsonl").is_file()
    with pytest.raises(PluribusError, match="--new-run"):
        TrajectoryStore(folder, "hash-c", family="team-2")
    with TrajectoryStore(folder, "hash-b", family="team-1") as store:
        assert store.done_ids() == {"p0"}  # unchanged weights: it resumes


def test_a_seat_is_keyed_by_its_weights_not_its_bookkeeping(tmp_path: Path) -> None:
    """The store of a seated debate follows what answers (as eval's stores do): a retraining that leaves the weights
    as they were (a new training_record.json) keeps its answers; other weights do not."""
    from pluribus.seats import fingerprints

    folder = tmp_path / "adapters" / "rsft"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"w1")
    (folder / "training_record.json").write_text('{"finished_at": "1"}')
    before = fingerprints({"agents.0": folder})
    (folder / "training_record.json").write_text('{"finished_at": "2"}')
    assert fingerprints({"agents.0": folder}) == before
    (folder / "adapter_model.safetensors").write_bytes(b"w2")
    assert fingerprints({"agents.0": folder}) != before


# ------------------------------------------------------------------------------------------ real runs


def _write_rsft(folder: Path) -> None:
    folder.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"}]}
            for i in range(4)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_a_retrained_expert_reruns_the_debate_that_seats_it_and_nothing_else(tmp_path: Path,
                                                                            tiny_llama_dir: Path) -> None:
    from pluribus.config import load_recipe
    from pluribus.run import run_recipe

    model = str(tiny_llama_dir)
    sampling = "{max_new_tokens: 4}"

    def recipe(*overrides: str) -> Any:
        return load_recipe(None, [
            "name=seat", f"root={tmp_path}", "task.source=synthetic", "task.synthetic.level=quickstart", "task.n=2",
            f"team.agents=[{{name: base, model: '{model}', sampling: {sampling}}}, "
            f"{{name: seated, expert: a, sampling: {sampling}}}]", "team.rounds=1",
            f"train.model={model}", "train.experts=[{name: a}, {name: b}]", "train.max_steps=1",
            "train.batch_size=2", "train.eval_fraction=0.0", "train.report_to=[none]", "train.kernels=off",
            "train.lora.r=2", "train.save_steps=1000", "train.bf16=false",
            "train.warmup_ratio=0.0", *overrides])  # no warmup: its one step changes the weights

    first = recipe()
    _write_rsft(first.layout.dataset("rsft"))
    store = first.layout.trajectories()

    def run_id() -> str:
        return json.loads((store / "manifest.json").read_text())["run_id"]

    results = run_recipe(first, progress=False)
    assert [(r.stage, r.status) for r in results] == [("train:a", "ran"), ("debate", "ran"), ("train:b", "ran")]
    turns = [json.loads(line) for line in (store / "shard-00000.jsonl").read_text().splitlines()]
    # the seat answered with expert a's adapter on its base model
    assert len(turns) == 2 and [t["model"] for t in turns[0]["rounds"][0]] == [
        model, f"{model}+{first.layout.adapter('a')}"]
    before = run_id()

    # expert b retrains; no debate seats it: the debate's store is left as it was
    again = {r.stage: r.status for r in run_recipe(recipe("train.experts.1.lr=1e-3"), progress=False)}
    assert again == {"train:a": "skipped", "debate": "ran", "train:b": "ran"}
    assert run_id() == before and not list(tmp_path.glob("seat/trajectories.prev-*"))

    # expert a retrains: the debate that seats it is debated afresh (the old answers moved aside), b is untouched
    third = {r.stage: r.status for r in run_recipe(recipe("train.experts.1.lr=1e-3", "train.experts.0.lr=1e-3"),
                                                   progress=False)}
    assert third == {"train:a": "ran", "debate": "ran", "train:b": "skipped"}
    assert run_id() != before and (tmp_path / "seat" / f"trajectories.prev-{before}" / "manifest.json").is_file()
    assert len((store / "shard-00000.jsonl").read_text().splitlines()) == 2
