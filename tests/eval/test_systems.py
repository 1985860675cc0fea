"""The registry of eval systems: the recipe schema and the registry name the same systems, a miss lists the valid
names, the defaults and the run order come from the registered classes, and every plan finds its system."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.config import SYSTEMS as SCHEMA_NAMES
from pluribus.config import load_recipe
from pluribus.errors import PluribusError
from pluribus.eval.systems import SYSTEMS, System, plan_systems, register_system, requested, system, system_of


def test_the_recipe_schema_and_the_registry_name_the_same_systems() -> None:
    # config cannot import the registry (the schema sits below the systems, tests/test_imports.py): one list each
    assert set(SYSTEMS) == set(SCHEMA_NAMES)


def test_a_miss_names_every_valid_system_and_the_runs_experts_and_merges(tmp_path: Path) -> None:
    with pytest.raises(PluribusError) as miss:
        system("nope")
    assert str(miss.value) == f"unknown eval system 'nope'; use {', '.join(SYSTEMS)}, an expert (none) or a merge (none)"
    assert {"single", "sc", "team", "prm-bon", "team-prm", "experts", "merged", "distilled"} <= set(SYSTEMS)
    recipe = load_recipe(None, [f"root={tmp_path}", "train.experts=[{objective: rsft}, {objective: augmented}]",
                                "merge.experts=[rsft, augmented]", "merge.merges=[{name: ta}]"])
    assert system("augmented", recipe) is SYSTEMS["experts"] and system("ta", recipe) is SYSTEMS["merged"]
    with pytest.raises(PluribusError, match=r"an expert \(rsft, augmented\) or a merge \(ta\)"):
        system("tie", recipe)


def test_the_defaults_are_the_registered_systems_the_recipe_has_sections_for(tmp_path: Path) -> None:
    base = [f"root={tmp_path}", "task.source=synthetic"]
    alone = load_recipe(None, [*base, "team.rounds=1", "team.agents=[{name: a}]"])
    assert requested(alone) == ["single"]
    full = load_recipe(None, [*base, "team.rounds=2", "team.agents=[{name: a}, {name: b}]",
                              "train.experts=[{objective: rsft}, {objective: prm}]", "merge.experts=[rsft]"])
    assert requested(full) == ["single", "sc", "team", "prm-bon", "team-prm", "experts", "merged"]
    asked = load_recipe(None, [*base, "eval.systems=[team, single]"])
    assert requested(asked) == ["team", "single"]  # as asked, in the recipe's order


def test_every_plan_finds_its_system_and_the_order_puts_what_others_read_first(tmp_path: Path) -> None:
    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "team.rounds=2",
                                "team.agents=[{name: a}, {name: b}]", "eval.modes=[greedy, sampled]",
                                "train.experts=[{objective: rsft}, {objective: prm}]", "merge.experts=[rsft]"])
    plans = plan_systems(recipe, check=False)
    assert [p.label for p in plans] == ["single-greedy", "single-sampled", "sc", "team", "prm-bon", "team-prm",
                                        "rsft-greedy", "rsft-sampled", "merged-greedy", "merged-sampled"]
    assert all(system_of(p).kind == p.system for p in plans)
    ran = [p.label for p in sorted(plans, key=lambda p: system_of(p).order)]
    assert ran.index("single-greedy") < ran.index("team") < ran.index("sc") < ran.index("prm-bon")
    assert ran.index("team") < ran.index("team-prm")


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="'single' is registered twice"):
        register_system("single")(type("Again", (System,), {}))
    assert type(SYSTEMS["single"]).__name__ == "Single"
