"""train.experts and merge.merges are typed entries, validated once when the recipe loads; they dump as written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pluribus.config import load_recipe, validate_recipe
from pluribus.config.merge import MergeEntry
from pluribus.config.train import ExpertEntry
from pluribus.errors import RecipeError

EXPERTS = "train.experts=[{objective: rsft}, {name: rl, objective: rl, init_adapter: rsft, lr: 5.0e-5, rl: {kl: 0.1}}]"
MERGES = ["train.experts=[{objective: rsft}, {objective: augmented}]", "merge.experts=[rsft, augmented]",
          "merge.merges=[{name: ta}, {name: ties, method: ties, params: {density: 0.5}}]"]


def test_expert_entries_are_resolved_once_and_dump_as_written() -> None:
    recipe = load_recipe(None, ["train.lr=1e-4", "train.lora.r=8", EXPERTS])
    train = recipe.train
    assert all(isinstance(e, ExpertEntry) for e in train.experts)
    first, again = train.trainings(), train.trainings()
    assert [a is b for a, b in zip(first, again, strict=True)] == [True, True]  # no re-validation per call
    rsft, rl = first
    assert (rsft.lr, rsft.lora.r, rl.lr, rl.lora.r, rl.rl.kl, rl.init_adapter) == (1e-4, 8, 5e-5, 8, 0.1, "rsft")
    assert recipe.to_dict()["train"]["experts"] == [
        {"objective": "rsft"}, {"name": "rl", "objective": "rl", "init_adapter": "rsft", "lr": 5e-5, "rl": {"kl": 0.1}}]
    assert validate_recipe(recipe.to_dict()) == recipe  # recipe.yaml reads back to the same recipe


def test_a_copied_section_resolves_its_experts_over_its_own_settings() -> None:
    train = load_recipe(None, [EXPERTS]).train
    lower = train.model_copy(update={"lr": 1e-5})
    assert [t.lr for t in lower.trainings()] == [1e-5, 5e-5]  # the shared lr reaches the expert that has none
    assert [t.lr for t in train.trainings()] == [2e-4, 5e-5]  # the original is unchanged
    renamed = train.model_copy(update={"experts": [{"objective": "augmented"}]})
    assert [t.expert_name for t in renamed.trainings()] == ["augmented"]
    with pytest.raises(RecipeError, match="experts.0: 'lr' = -1"):
        train.model_copy(update={"experts": [{"objective": "rsft", "lr": -1}]})


def test_merge_entries_are_resolved_once_and_dump_as_written() -> None:
    recipe = load_recipe(None, MERGES)
    merge = recipe.merge
    assert all(isinstance(e, MergeEntry) for e in merge.merges)
    assert [a is b for a, b in zip(merge.all(), merge.all(), strict=True)] == [True, True]
    assert [(m.name, m.method, m.params, m.experts) for m in merge.all()] == [
        ("ta", "task_arithmetic", {}, ["rsft", "augmented"]), ("ties", "ties", {"density": 0.5}, ["rsft", "augmented"])]
    assert recipe.to_dict()["merge"]["merges"] == [{"name": "ta"}, {"name": "ties", "method": "ties",
                                                                   "params": {"density": 0.5}}]
    copy = merge.model_copy(update={"method": "linear"})
    assert [m.method for m in copy.all()] == ["linear", "ties"]


@pytest.mark.parametrize(("overrides", "match"), [
    (["train.experts=[3]"], "'train.experts.0' = 3: must be a mapping of settings"),
    (["merge.merges=[3]"], "'merge.merges.0' = 3: must be a mapping of merge settings"),
    (["merge.merges=[{name: a, merges: []}]"], "without merges of its own"),
    (["merge.merges=[{name: a, spec: {method: tie}}]"], "'merge.merges.0.spec' = .*Unknown merge method 'tie'"),
    (MERGES[:2] + ["merge.merges=[{name: ta}, {name: ties, method: ties, params: {drop: 0.5}}]"],
     "'merge.merges.1' = .*merge 'ties': drop has no effect in method 'ties'"),
])
def test_a_bad_entry_is_named(overrides: list[str], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, overrides)


def test_the_recipe_schema_imports_no_merge_code() -> None:
    # the schema validates a merge section by itself; validate_recipe then builds each merge's spec through the
    # merge package (MergeConfig.load), the one place the recipe reads it
    code = ("import sys; from pluribus.config import Recipe, load_recipe; from pluribus.overrides import "
            f"apply_overrides; Recipe.model_validate(apply_overrides({{}}, {MERGES!r})); "
            "print(sorted(m for m in sys.modules if m.startswith('pluribus.merge'))); "
            f"load_recipe(None, {MERGES!r}); print('pluribus.merge.registry' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"]


def test_only_merge_config_load_reads_the_merge_package() -> None:
    import ast
    import inspect
    import textwrap

    from pluribus.config.merge import MergeConfig
    from tests.test_imports import imports, modules

    mods = modules()
    reads = {n: {m for m in imports(n, f, mods, top_level=False) if m.startswith("pluribus.merge")}
             for n, f in mods.items() if n.startswith("pluribus.config")}
    assert {n: r for n, r in reads.items() if r} == {"pluribus.config.merge": {"pluribus.merge.config"}}
    load = ast.parse(textwrap.dedent(inspect.getsource(MergeConfig.load)))
    assert any(isinstance(n, ast.ImportFrom) and n.module == "pluribus.merge.config" for n in ast.walk(load))
    top = {n: imports(n, f, mods, top_level=True) for n, f in mods.items() if n.startswith("pluribus.config")}
    assert not any(m.startswith("pluribus.merge") for r in top.values() for m in r)


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("eval_fraction", 0.1), ("max_length", 128),
                                        ("packing", False), ("too_long", "truncate")])
def test_a_setting_an_rl_training_does_not_read_is_refused_not_ignored(key, value):
    # an rl expert's batch is rl.prompts_per_step; it holds out nothing; a sequence is a prompt and its sample
    entry = f"train.experts=[{{objective: rsft}}, {{name: rl, objective: rl, init_adapter: rsft, {key}: {value}}}]"
    with pytest.raises(RecipeError, match=f"experts.1: {key} have no effect on an rl training"):
        load_recipe(None, ["train.objective=rsft", entry])
    # shared by the section, the rsft expert reads it and the rl expert's default is untouched: accepted
    load_recipe(None, [f"train.{key}={value}", "train.experts=[{objective: rsft}, {name: rl, objective: rl, "
                       "init_adapter: rsft}]"])
