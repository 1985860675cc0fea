"""The eval stage: every system of the recipe on the same held-out problems (and each transfer task), reported."""

from __future__ import annotations

from typing import Any

from pluribus.config import Recipe
from pluribus.stages import Stage, StageSummary

COLUMNS = ("system", "accuracy", "95% interval", "vs single (p)", "first answer", "wrong first corrected",
           "tokens/problem", "s/problem")


def summary_of(recipe: Recipe, payload: dict[str, Any]) -> StageSummary:
    """The main task's systems as a table; robustness lines and the report's path after it."""
    versus = {c["system"]: c for c in payload.get("comparisons", [])}
    rows = []
    for name, r in payload["systems"].items():
        c = versus.get(name)
        rows.append((name, f"{r['accuracy']:.1%}", f"{r['accuracy_low']:.0%}-{r['accuracy_high']:.0%}",
                     f"+{c['wins']}/-{c['losses']} ({c['p_value']:.2g})" if c else "",
                     f"{r['first_answer_accuracy']:.1%}", f"{r['wrong_first_corrected']:.1%}",
                     f"{r['tokens_per_problem']:.0f}", f"{r['seconds_per_problem']:.2f}"))
    notes = [f"{name} under {kind}: {r['accuracy']:.1%} ({r['change']:+.1%} vs clean; {r['lost']} lost, "
             f"{r['gained']} gained)" for name, kinds in (payload.get("robustness") or {}).items()
             for kind, r in kinds.items()]
    main = payload["tasks"][0]
    line = ", ".join(f"{name} {r['accuracy']:.1%}" for name, r in main["systems"].items())
    eval_dir = recipe.layout.eval
    return StageSummary("eval", eval_dir / "results.json", line, COLUMNS, tuple(rows),
                        notes=(*notes, f"report: {eval_dir / 'report.md'}"))


def run(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> StageSummary:
    """``pluribus eval``: each system's answers stored (resumable), scored, compared and reported."""
    from pluribus.eval.evaluate import run_eval

    return summary_of(recipe, run_eval(recipe, progress=progress, new_run=new_run))


def plan(recipe: Recipe) -> list[Stage]:
    """The eval step: it keeps answer stores per system, so it always runs and generates only what is missing."""
    if recipe.eval is None:
        return []
    return [Stage("eval", lambda progress, new_run: run(recipe, progress=progress, new_run=new_run),
                  keeps_store=True)]
