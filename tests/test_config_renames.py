"""Renamed recipe keys: the old name keeps working with a one-line hint; both names at once are refused."""

from __future__ import annotations

import logging

import pytest

from pluribus.config import RLSettings, load_recipe
from pluribus.errors import RecipeError


def test_build_max_problems_is_build_n(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pluribus.config"):
        recipe = load_recipe(None, ["build.max_problems=3"])
    assert recipe.build.n == 3 and "n" in recipe.to_dict()["build"] and "max_problems" not in recipe.to_dict()["build"]
    assert caplog.messages == ["recipe: 'build.max_problems' is now 'build.n' (the old name still works; rename it)"]
    with pytest.raises(RecipeError, match="'build.max_problems' and 'build.n' are one setting; give only build.n"):
        load_recipe(None, ["build.max_problems=3", "build.n=2"])


def test_rl_sampling_is_a_sampling_config(caplog: pytest.LogCaptureFixture) -> None:
    assert RLSettings().sampling.temperature == 1.0  # RL samples; the team's default is greedy
    assert RLSettings(sampling={"top_p": 0.5}).sampling.temperature == 1.0
    with caplog.at_level(logging.WARNING, logger="pluribus.config"):
        recipe = load_recipe(None, ["train.rl.temperature=0.7", "train.rl.max_new_tokens=12"])
    assert (recipe.train.rl.sampling.temperature, recipe.train.rl.sampling.max_new_tokens) == (0.7, 12)
    assert len(caplog.messages) == 2 and "'train.rl.temperature' is now 'train.rl.sampling.temperature'" in caplog.text
    with pytest.raises(RecipeError, match="temperature must be > 0"):
        load_recipe(None, ["train.rl.sampling.temperature=0"])
    with pytest.raises(RecipeError, match="seed has no effect here"):
        load_recipe(None, ["train.rl.sampling.seed=3"])
    with pytest.raises(RecipeError, match="give only train.rl.sampling.top_p"):
        load_recipe(None, ["train.rl.top_p=0.9", "train.rl.sampling.top_p=0.8"])
