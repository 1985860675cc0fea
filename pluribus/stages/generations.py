"""The steps of generations 2..K (pluribus.generations) for `pluribus run`, and the check between generations.

Generation g's steps are the debate, self samples, build, train and merge steps of generation g's recipe, keyed
``gen<g>/<step>`` in the run's one stages.json, so a rerun resumes each generation as it resumes the first. With
``generations.stop_if_no_gain`` a ``gain:gen<g>`` step after each generation g < K measures its best student
against generation g-1's (through eval's own stores, so eval reuses those answers) and records it; the steps of
the generations after a check that found no gain are skipped, saying why.
"""

from __future__ import annotations

from dataclasses import replace

from pluribus.config import Recipe
from pluribus.generations import count, generation_recipe, prefix, record_check, stop_reason
from pluribus.stages import Stage, StageSummary


def _prefixed(step: Stage, g: int, keys: set[str]) -> Stage:
    """``step`` of generation ``g``: its key and the keys it waits on (those of its own generation) prefixed."""
    def prefixed(k: str) -> str:
        return f"{prefix(g)}{k}"

    def run(progress: bool, new_run: bool) -> StageSummary:
        summary = step.run(progress, new_run)
        return replace(summary, stage=prefixed(summary.stage))

    return replace(step, key=prefixed(step.key), run=run, after=tuple(prefixed(a) for a in step.after if a in keys))


def plan(recipe: Recipe) -> list[Stage]:
    """Generation 2..K's steps in order, each generation after the check of the one before (when the recipe
    stops on no gain)."""
    from pluribus.stages import build, debate, merge, selfsamples, train

    k = count(recipe)
    stops = recipe.generations is not None and recipe.generations.stop_if_no_gain
    steps: list[Stage] = []
    for g in range(1, k + 1):
        if g > 1:
            gen = generation_recipe(recipe, g)
            own = [s for stage in (debate, selfsamples, build, train, merge) for s in stage.plan(gen)]
            keys = {s.key for s in own}
            steps += [_with_skip(_prefixed(s, g, keys), recipe, g) for s in own]
        if stops and g < k:
            steps.append(_with_skip(gain_step(recipe, g), recipe, g))
    return steps


def _with_skip(step: Stage, recipe: Recipe, g: int) -> Stage:
    """``step`` skipped (saying why) when the check of a generation before ``g`` found no gain."""
    return replace(step, skip=lambda: stop_reason(recipe, g))


def gain_step(recipe: Recipe, g: int) -> Stage:
    """The check after generation ``g``: its best student against generation g-1's, recorded; it keeps eval's
    stores (always runs, answers only what they lack)."""
    def run(progress: bool, new_run: bool) -> StageSummary:
        from pluribus.stages.eval import students_accuracy

        best, problems = students_accuracy(recipe, g, progress=progress, new_run=new_run)
        previous, _ = students_accuracy(recipe, g - 1, progress=progress, new_run=new_run)
        c = record_check(recipe, g, best, previous, problems)
        verdict = "no gain: the later generations are skipped" if c["stop"] else "a gain: the next generation runs"
        before = "the base agent" if g == 1 else f"generation {g - 1}'s best student"
        line = (f"generation {g}'s best student {c['best']} {c['accuracy']:.1%} vs {before} "
                f"{c['previous_best']} {c['previous_accuracy']:.1%} on {problems} held-out problems: {verdict}")
        return StageSummary(f"gain:gen{g}", recipe.layout.generations_record, line)

    return Stage(f"gain:gen{g}", run, keeps_store=True)
