"""build given a recipe: the store must hold that recipe's config, and only the recipe's task is built from."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pluribus.config import Recipe, write_recipe
from pluribus.data.tasks import load_problems
from pluribus.errors import PluribusError
from pluribus.stages.build import build_recipe
from pluribus.stages.debate import config_hash
from tests.data.test_builders import RIGHT, make_run, traj, turn


def recipe_of(tmp_path: Path, n: int = 12, **team) -> Recipe:
    return Recipe(name="run", root=str(tmp_path), task={"source": "synthetic", "n": n},
                  team={"agents": [{"name": "a"}, {"name": "b"}], "rounds": 1, **team},
                  build={"kinds": ["rsft"]})


def stored_run(tmp_path: Path, recipe: Recipe) -> Path:
    ids = [p.id for p in load_problems(recipe.task)]
    trajs = [traj(pid, [[turn("a", 0, RIGHT, "12", True), turn("b", 0, RIGHT, "12", True)]]) for pid in ids]
    run = make_run(tmp_path / "run", trajs, config_hash=config_hash(recipe))
    write_recipe(recipe)
    return run


def test_build_refuses_a_recipe_the_store_was_not_written_with(tmp_path):
    recipe = recipe_of(tmp_path)
    stored_run(tmp_path, recipe)
    other = recipe_of(tmp_path, rounds=3)
    with pytest.raises(PluribusError, match=r"the store '.*trajectories' was written by another task, team or seed "
                                            r"\(config hash \w+\) than this recipe's \(\w+\); build with the recipe"):
        build_recipe(other, progress=False)
    with pytest.raises(PluribusError, match="another task, team or seed"):
        build_recipe(recipe.model_copy(update={"seed": 7}), progress=False)
    # from the store alone, its saved recipe is the one compared: an override of the team is refused as well
    with pytest.raises(PluribusError, match="another task, team or seed"):
        build_recipe(None, ["team.rounds=2"], stores=[tmp_path / "run"], progress=False)
    assert not (tmp_path / "run" / "datasets").exists()
    assert build_recipe(recipe, progress=False)[0].stats["counts"]["trajectories used"] == 12


def test_build_uses_only_the_problems_the_recipes_task_selects(tmp_path, caplog):
    stored_run(tmp_path, recipe_of(tmp_path, n=12))
    with caplog.at_level(logging.WARNING, logger="pluribus.data"):
        built = build_recipe(recipe_of(tmp_path, n=6), progress=False)[0]
    assert built.stats["counts"]["trajectories used"] == 6 and built.stats["counts"]["problems with rows"] == 6
    assert built.stats["counts"]["stored trajectories outside the recipe's task (left out)"] == 6
    assert "the recipe's task selects 6 of the store's 12 problems" in caplog.text


def test_cli_build_of_a_recipe_another_store_wrote_is_refused(tmp_path):
    from pluribus.cli import app

    stored_run(tmp_path, recipe_of(tmp_path))
    path = tmp_path / "other.yaml"
    path.write_text(recipe_of(tmp_path, rounds=3).to_yaml())
    res = CliRunner().invoke(app, ["build", str(path), "--no-progress"])
    assert isinstance(res.exception, PluribusError) and "another task, team or seed" in str(res.exception)
    assert "\n" not in str(res.exception)
