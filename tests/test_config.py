"""Recipes: YAML loading, dotted overrides, one-line errors with exit code 2, round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pluribus.config import Recipe, RecipeError, apply_overrides, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again) == recipe


def test_overrides_apply_by_dotted_path() -> None:
    r = load_recipe(None, ["train.lr=1e-4", "team.rounds=3", "team.agents=[{model: a}, {model: b}]",
                           "team.agents.1.sampling.temperature=0.7"])
    assert r.train.lr == 1e-4 and r.team.rounds == 3
    assert [a.model for a in r.team.agents] == ["a", "b"]
    assert r.team.agents[1].sampling.temperature == 0.7


def test_round_trip_of_a_full_recipe() -> None:
    r = load_recipe(None, ["task.source=gsm8k", "team.topology=ring", "train.stage=prm", "eval.n=5"])
    assert validate_recipe(r.to_dict()) == r


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=1e-4"], "unknown key 'train.lrr'"),
        (["team.rounds=two"], "'team.rounds' = \"two\""),
        (["team.topology=mesh"], "'team.topology' = \"mesh\" is not allowed; expected one of 'all', 'ring' or 'star'"),
        (["team.rounds=0"], "greater than or equal to 1"),
        (["nme=x"], "unknown key 'nme'"),
    ],
)
def test_errors_name_the_field_the_value_and_what_is_allowed(overrides: list[str], needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_bad_override_syntax_and_missing_file() -> None:
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("team:\n  rounds: [1,\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)


def test_missing_section_is_named() -> None:
    with pytest.raises(RecipeError, match="no 'merge' section"):
        Recipe().require("merge")


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("team:\n  roundz: 2\n")
    proc = subprocess.run([sys.executable, "-m", "pluribus.cli", "config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown key 'team.roundz'" in lines[0]
