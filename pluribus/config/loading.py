"""Reading a recipe: YAML plus dotted overrides, validated into one ``Recipe`` or one ``RecipeError``; writing it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pluribus.config.base import _describe_error
from pluribus.config.recipe import Recipe
from pluribus.errors import RecipeError
from pluribus.io import atomic_write_text, read_yaml
from pluribus.overrides import apply_overrides


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe dict, raising a one-line RecipeError naming every bad field."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe_error(err) for err in e.errors()]
        raise RecipeError("invalid recipe: " + "; ".join(problems)) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from YAML (or start from an empty one) and apply dotted overrides."""
    data: Any = {}
    if path is not None:
        data = read_yaml(path, "recipe file", RecipeError) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file '{Path(path)}' must hold a mapping of sections, got {type(data).__name__}")
    return validate_recipe(apply_overrides(data, overrides or []))


def write_recipe(recipe: Recipe, run_dir: Path | None = None) -> Path:
    """Write the recipe as run to ``<run>/recipe.yaml`` (atomically) and return the path."""
    out = (run_dir or recipe.run_dir) / "recipe.yaml"
    atomic_write_text(out, recipe.to_yaml())
    return out
