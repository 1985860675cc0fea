"""The toy system always-zero: planned from eval.systems, run by the eval stage without a model, scored."""

from __future__ import annotations

from pathlib import Path

from pluribus.config import load_recipe
from pluribus.eval.systems import plan_systems
from pluribus.stages.eval import _eval_tasks, evaluate_task


def test_always_zero_answers_zero_to_every_problem(tmp_path: Path) -> None:
    recipe = load_recipe(None, [f"root={tmp_path}", "task.source=synthetic", "task.n=8", "task.heldout_fraction=0.5",
                                "team.rounds=1", "eval.systems=[always-zero]"])
    plans = plan_systems(recipe, check=False)
    assert [(p.label, p.system) for p in plans] == [("always-zero", "always-zero")]
    name, task, folder = _eval_tasks(recipe, recipe.eval)[0]
    out = evaluate_task(recipe, plans, name, task, folder, progress=False, new_run=False, robustness=False)
    row = out["systems"]["always-zero"]
    zeros = sum(o for o in out["outcomes"]["always-zero"].values())
    assert row["problems"] == out["problems"] == 8 and row["correct"] == zeros and row["tokens_per_problem"] == 0
