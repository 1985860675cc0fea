"""The single-agent baseline's data from the CLI: `pluribus selfsamples`, `pluribus build` making the self datasets
as `pluribus run` does, and `pluribus train` refusing an expert with data: self whose datasets are not current."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pluribus.config import Recipe, write_recipe
from pluribus.data.builders.datasets import PARQUET
from pluribus.data.tasks import load_problems
from pluribus.errors import PluribusError
from pluribus.stages.debate import config_hash
from pluribus.stages.selfsamples import self_recipe
from tests.data.test_builders import RIGHT, make_run, traj, turn


def baseline_recipe(tmp_path: Path) -> Recipe:
    return Recipe(name="run", root=str(tmp_path), task={"source": "synthetic", "n": 6},
                  team={"agents": [{"name": "a"}, {"name": "b"}], "rounds": 1}, build={"kinds": ["rsft"]},
                  train={"experts": [{"name": "rsft"}, {"name": "self-rsft", "data": "self"}]})


def stored(tmp_path: Path, recipe: Recipe, team: bool = True) -> Path:
    """The team's store (unless ``team`` is False) and the single agent's (two samples a problem), all right."""
    ids = [p.id for p in load_problems(recipe.task)]
    if team:
        make_run(tmp_path / "run", [traj(pid, [[turn("a", 0, RIGHT, "12", True), turn("b", 0, RIGHT, "12", True)]])
                                    for pid in ids], config_hash=config_hash(recipe))
    make_run(tmp_path / "run" / "self", [traj(pid, [[turn("self0", 0, RIGHT, "12", True),
                                                     turn("self1", 0, RIGHT, "12", True)]]) for pid in ids],
             config_hash=config_hash(self_recipe(recipe)))
    write_recipe(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    return path


def _user_turns(folder: Path) -> set[str]:
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=str(folder / PARQUET), split="train")
    return {r["messages"][0]["content"] for r in rows}


def test_cli_build_makes_and_refreshes_the_single_agents_datasets(tmp_path):
    from pluribus.cli import _self_data_current, app

    recipe = baseline_recipe(tmp_path)
    path = stored(tmp_path, recipe)
    cli = CliRunner()
    # nothing built yet: training the baseline is refused with the command to run
    with pytest.raises(PluribusError, match=r"expert 'self-rsft' trains on the single agent's datasets .*never ran\); "
                                            r"run `pluribus build RECIPE`"):
        _self_data_current(recipe, "self-rsft")
    _self_data_current(recipe, "rsft")  # the team's expert is not concerned

    res = cli.invoke(app, ["build", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    assert (run / "self" / "datasets" / "rsft" / PARQUET).is_file()
    assert "self/rsft" in res.output
    _self_data_current(recipe, "self-rsft")  # current now

    # another prompt: the team's rows and the self rows must both change, and until rebuilt training is refused
    changed = recipe.model_copy(update={"build": recipe.build.model_copy(
        update={"prompt_template": "Solve: {question}"})})
    with pytest.raises(PluribusError, match=r"its settings changed\); run `pluribus selfsamples RECIPE`, then "
                                            r"`pluribus build RECIPE --overwrite`"):
        _self_data_current(changed, "self-rsft")
    path.write_text(changed.to_yaml())
    # the single agent was asked the old prompt: its samples are refused until drawn again
    res = cli.invoke(app, ["build", str(path), "--overwrite", "--no-progress"])
    assert isinstance(res.exception, PluribusError), res.output
    assert "run `pluribus selfsamples RECIPE --new-run`" in str(res.exception)
    import shutil

    shutil.rmtree(tmp_path / "run" / "self" / "trajectories")
    stored(tmp_path, changed, team=False)  # sampled again with the new prompt (the team's store is the same)
    res = cli.invoke(app, ["build", str(path), "--overwrite", "--no-progress"])
    assert res.exit_code == 0, res.output
    for folder in (run / "datasets" / "rsft", run / "self" / "datasets" / "rsft"):
        assert all(u.startswith("Solve: ") for u in _user_turns(folder)), folder
    _self_data_current(changed, "self-rsft")

    # the CLI's train refuses through the same check, in one line (the first prompt again: stale)
    path.write_text(recipe.to_yaml())
    res = cli.invoke(app, ["train", str(path), "--expert", "self-rsft"])
    assert isinstance(res.exception, PluribusError) and "\n" not in str(res.exception)
    assert "its settings changed" in str(res.exception)


def test_cli_build_says_to_sample_when_the_self_store_is_missing(tmp_path):
    from pluribus.cli import _self_data_current, app

    recipe = baseline_recipe(tmp_path)
    path = stored(tmp_path, recipe)
    import shutil

    shutil.rmtree(tmp_path / "run" / "self")
    with pytest.raises(PluribusError, match=r"run `pluribus selfsamples RECIPE`, then `pluribus build RECIPE`"):
        _self_data_current(recipe, "self-rsft")
    res = CliRunner().invoke(app, ["build", str(path), "--no-progress"])
    assert isinstance(res.exception, PluribusError)
    assert "run `pluribus selfsamples RECIPE` first" in str(res.exception)


def test_selfsamples_command_samples_the_single_agent(tmp_path, tiny_llama_dir):
    from pluribus.cli import app

    recipe = Recipe(name="run", root=str(tmp_path), task={"source": "synthetic", "n": 2},
                    team={"agents": [{"name": "a", "model": str(tiny_llama_dir),
                                      "sampling": {"max_new_tokens": 4}}], "rounds": 1},
                    build={"kinds": ["rsft"], "self_samples": 2},
                    train={"experts": [{"name": "self-rsft", "data": "self", "model": str(tiny_llama_dir)}]})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    res = CliRunner().invoke(app, ["selfsamples", str(path), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = [line for f in sorted((tmp_path / "run" / "self" / "trajectories").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    assert len(lines) == 2  # one trajectory a problem, its two samples as agents self0, self1
    # a recipe without an expert learning from them has nothing to sample
    path.write_text(recipe.model_copy(update={"train": None}).to_yaml())
    res = CliRunner().invoke(app, ["selfsamples", str(path), "--no-progress"])
    assert isinstance(res.exception, PluribusError) and "no expert of the recipe has data: self" in str(res.exception)
