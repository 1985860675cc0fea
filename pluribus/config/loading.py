"""Reading a recipe: YAML plus dotted overrides, validated into one ``Recipe`` or one ``RecipeError``; writing it back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pluribus.config.base import _describe_error
from pluribus.config.recipe import Recipe
from pluribus.errors import PluribusError, RecipeError
from pluribus.io import atomic_write_text, read_yaml
from pluribus.overrides import apply_overrides


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe dict, raising a one-line RecipeError naming every bad field."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe_error(err) for err in e.errors()]
        raise RecipeError("invalid recipe: " + "; ".join(problems)) from None
    _merges_build(recipe)
    return recipe


def _merges_build(recipe: Recipe) -> None:
    """Refuse now, not after hours of training, a merge whose spec the merge stage would refuse (an unknown method,
    an option the method does not read, a value out of range): each merge of experts or of an inline spec builds
    its spec here, through the merge package (``MergeConfig.load``). A merge config file is read when it runs."""
    merges = recipe.merge.all() if recipe.merge is not None else []
    for i, m in enumerate(merges):
        if m.config is not None:
            continue
        try:
            m.load(recipe.layout)
        except PluribusError as e:
            where = "merge" if not recipe.merge.merges else f"merge.merges.{i}"  # type: ignore[union-attr]
            raise RecipeError(f"invalid recipe: '{where}{'.spec' if m.spec is not None else ''}' = {{...}}: {e}") \
                from None


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
