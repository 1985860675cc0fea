"""An unchanged recipe keeps its settings fingerprints: a change to how the schema is written (its modules, typed
expert and merge entries) must not rerun every user's finished steps. The values were computed at commit 43cfde1,
before the recipe schema became a package."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pluribus.config import load_recipe
from pluribus.run import plan

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
ALWAYS = "319db19c583e7dcc"  # debate, self samples and eval keep answer stores and always run: no settings

PINNED = {
    "debate": ALWAYS, "self": ALWAYS, "build": "48c880d7bc098df2",
    "train:rsft": "9162d004dec4c122", "train:augmented": "b19520d05feb4277", "train:prm": "edbbd0f360a389d3",
    "train:rl": "e90d3de45a537a93", "train:self-rsft": "cb209484345dc99c", "merge:merged": "d11bab559943055c",
    "eval": ALWAYS, "export": "07bd5ddd85cf5810",
}
# quickstart with two merges (merge.merges) and a second generation that seats them
PINNED_MERGES = {
    **{k: v for k, v in PINNED.items() if k != "merge:merged"},
    "merge:ta": "c992e04e843c42fc", "merge:ties": "1e69210a7317fea2",
    **{f"gen2/{k}": v for k, v in PINNED.items() if k.startswith(("debate", "self", "train"))},
    "gen2/build": "10771e976b8e0dbb", "gen2/merge:ta": "c992e04e843c42fc", "gen2/merge:ties": "1e69210a7317fea2",
}
MERGES = ["merge.merges=[{name: ta}, {name: ties, method: ties, weights: null, params: {density: 0.5}}]",
          "generations.count=2", "generations.seats=[rsft, augmented, ta]"]


def settings_prints(overrides: list[str]) -> dict[str, str]:
    recipe = load_recipe(QUICKSTART, overrides)
    return {step.key: hashlib.sha256(json.dumps({"settings": step.settings(), "seed": recipe.seed}, sort_keys=True,
                                                default=str).encode()).hexdigest()[:16] for step in plan(recipe)}


@pytest.mark.parametrize(("overrides", "pinned"), [([], PINNED), (MERGES, PINNED_MERGES)], ids=["quickstart", "merges"])
def test_an_unchanged_recipe_keeps_its_settings_fingerprints(tmp_path: Path, overrides: list[str],
                                                             pinned: dict[str, str]) -> None:
    assert settings_prints([f"root={tmp_path}", *overrides]) == pinned


def test_an_unchanged_recipe_writes_the_same_recipe_yaml(tmp_path: Path) -> None:
    # the run folder's recipe.yaml, as written before the schema became a package (root left as the file says)
    for overrides, pinned in (([], "7b83b44fed58e8ed"), (MERGES, "d8b2618bf40465b8")):
        text = load_recipe(QUICKSTART, ["root=/tmp/r25fp-root", *overrides]).to_yaml()
        assert hashlib.sha256(text.encode()).hexdigest()[:16] == pinned
