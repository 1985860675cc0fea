"""A recipe checked before anything loads: every model it names resolves (``pluribus config``)."""

from __future__ import annotations

from pluribus.config import Recipe
from pluribus.errors import PluribusError, RecipeError


def check_recipe_models(recipe: Recipe) -> None:
    """Fail as the stages would on a model that does not resolve (a typo, a missing folder), naming the field.

    Nothing is loaded, dequantized or downloaded: an alias only needs its package, an existing .gguf file and
    a hub id (org/name) are taken as given. Models behind the openai backend live on a server and are skipped.
    """
    from pluribus.gguf import find_alias_file
    from pluribus.modelref import ModelRef
    from pluribus.models import resolve_model

    agents = [(f"team.agents.{i}", a) for i, a in enumerate(recipe.team.agents)] if recipe.team else []
    if recipe.team and recipe.team.judge:
        agents.append(("team.judge", recipe.team.judge))
    if recipe.build and recipe.build.completer:
        agents.append(("build.completer", recipe.build.completer))
    refs = [(f"{where}.model", a.model) for where, a in agents if a.backend != "openai"]
    if recipe.train:
        refs.append(("train.model", recipe.train.model))
    for field, name in refs:
        ref = ModelRef.parse(name)
        try:
            if ref.form == "alias":
                find_alias_file(name)
            elif ref.form not in ("hub", "gguf"):
                resolve_model(name)
        except PluribusError as e:
            raise RecipeError(f"'{field}': {e}") from None
