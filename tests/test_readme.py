"""The README's recipe snippets are recipes: each YAML block validates (so the onboarding text cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pluribus.config import validate_recipe

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_recipe_snippets() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_yaml_snippet_is_a_valid_recipe(block: str) -> None:
    recipe = validate_recipe(yaml.safe_load(block))
    assert recipe.to_dict()  # parsed, typed, and every name it uses resolves (experts, merges, systems)
