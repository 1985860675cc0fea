"""Generations (debate, train, evolve): generation g's recipe from the recipe, and the stop rule between them.

Generation 1 is the recipe's own run, in its own folders. Generation g >= 2 (``generations.count``) is the same
recipe with three changes: its team seats ``generations.seats`` of generation g-1 (agent i keeps its name,
persona and sampling; ``base`` keeps the agent as written); its self baseline samples with generation g-1's self
student (the single-agent distillation iterated, same rows, same training); with ``generations.init: previous``
its policy experts continue generation g-1's adapters. Its process rollouts use generation 1's completer (the base
agent, unless build.completer names one), so every generation's step labels come from the same model. It debates the same training problems, builds, trains and
merges in ``<run>/gen<g>/`` (RunLayout.generation), and its stages are the same stages, run on this recipe.

The stop rule (``generations.stop_if_no_gain``): after generation g, its best student (experts but PRMs, and
merges, greedy, on eval's held-out problems) against generation g-1's (the base single agent for g = 1); when it
is not more accurate, the later generations are skipped. What each check measured is in ``<run>/generations.json``.
"""

from __future__ import annotations

import json
from typing import Any

from pluribus.config import Recipe, TrainConfig
from pluribus.io import atomic_write_text

# the objectives a policy adapter is trained by (a PRM's score head is no policy to continue)
_POLICY = ("rsft", "augmented", "rl")
CRITERION = ("generation g's best student (every expert but PRMs, and every merge, greedy) against generation "
             "g-1's (the base single agent for g = 1), on eval's held-out problems; no gain (not more accurate) "
             "stops the later generations")


def prefix(g: int) -> str:
    """What the names of generation ``g``'s steps and eval systems start with: '' for generation 1 (the run as it
    was), ``gen<g>/`` after (its folder, RunLayout.generation)."""
    return "" if g == 1 else f"gen{g}/"


def count(recipe: Recipe) -> int:
    """How many generations ``recipe`` asks for (1 without a generations section)."""
    return recipe.generations.count if recipe.generations is not None else 1


def self_student(recipe: Recipe) -> str | None:
    """The data: self expert whose samples feed the next generation's self baseline, or None (no baseline)."""
    if recipe.generations is not None and recipe.generations.self_student:
        return recipe.generations.self_student
    selfs = [t.expert_name for t in recipe.train.trainings() if t.data == "self"] if recipe.train else []
    return selfs[0] if selfs else None


def generation_recipe(recipe: Recipe, g: int) -> Recipe:
    """The recipe of generation ``g``: ``recipe`` itself for g = 1, else as the module docstring says. Its
    ``_previous`` is generation g-1's recipe (where its seats' names resolve, pluribus.seats)."""
    if g == 1:
        return recipe
    gens = recipe.require("generations")
    if not 1 <= g <= gens.count:
        raise ValueError(f"generation {g} is outside 1..{gens.count} (generations.count)")
    previous = generation_recipe(recipe, g - 1)
    team = recipe.require("team")
    agents = [a if seat == "base" else a.model_copy(update={"expert": seat, "adapter": None})
              for a, seat in zip(team.agents, gens.seats, strict=True)]
    root = recipe.layout.generation(g).root
    build = recipe.require("build")
    if build.completer is None and "process" in build.kinds:
        from pluribus.data.builders.datasets import default_completer

        # the rollouts that label steps use generation 1's completer (the base agent) in every generation, so
        # the process data of the generations are labelled alike (the default would be the first seat)
        build = build.model_copy(update={"completer": default_completer(build, team)})
    out = recipe.model_copy(update={
        "root": str(root.parent), "name": root.name, "team": team.model_copy(update={"agents": agents}),
        "build": build,
        "train": _continued(recipe.require("train"), previous) if gens.init == "previous" else recipe.train,
        "eval": None, "export": None, "generations": None})
    out._previous = previous
    student = self_student(recipe)
    out._self_agent = team.agents[0].model_copy(update={"expert": student, "adapter": None}) if student else None
    return out


def _continued(train: TrainConfig, previous: Recipe) -> TrainConfig:
    """``train`` with each policy expert that has no init_adapter starting from generation g-1's adapter of its
    name (generations.init: previous)."""
    trainings = train.trainings()
    starts = [str(previous.layout.adapter(t.expert_name)) if t.init_adapter is None and t.objective in _POLICY
              else None for t in trainings]
    if not train.experts:
        return train.model_copy(update={"init_adapter": starts[0]}) if starts[0] else train
    experts = [{**entry.settings, "init_adapter": start} if start else entry
               for entry, start in zip(train.experts, starts, strict=True)]
    return train.model_copy(update={"experts": experts})


# ------------------------------------------------------------------------------------------ the stop rule


def no_gain(best: tuple[str, float], previous: tuple[str, float]) -> bool:
    """Whether generation g, whose best student is ``best`` (label, accuracy), fails to beat generation g-1's
    ``previous``: not strictly more accurate on the same problems."""
    return best[1] <= previous[1]


def record_check(recipe: Recipe, g: int, best: tuple[str, float], previous: tuple[str, float],
                 problems: int) -> dict[str, Any]:
    """Write generation ``g``'s check into ``<run>/generations.json`` (replacing any earlier one of ``g`` and
    dropping those of later generations, which follow from it); returns the entry."""
    path = recipe.layout.generations_record
    saved = json.loads(path.read_text()) if path.is_file() else {}
    checks = {k: v for k, v in (saved.get("checks") or {}).items() if int(k) < g}
    checks[str(g)] = {"generation": g, "problems": problems, "best": best[0], "accuracy": best[1],
                      "previous_best": previous[0], "previous_accuracy": previous[1],
                      "stop": no_gain(best, previous)}
    atomic_write_text(path, json.dumps({"criterion": CRITERION, "checks": checks}, indent=2))
    return checks[str(g)]


def stopped_after(recipe: Recipe) -> int | None:
    """The generation after which ``generations.stop_if_no_gain`` stopped the run (its check recorded no gain),
    or None: every generation runs."""
    if recipe.generations is None or not recipe.generations.stop_if_no_gain:
        return None
    path = recipe.layout.generations_record
    checks = (json.loads(path.read_text()).get("checks") or {}) if path.is_file() else {}
    stops = sorted(int(k) for k, v in checks.items() if v.get("stop") and int(k) < count(recipe))
    return stops[0] if stops else None


def stop_reason(recipe: Recipe, g: int) -> str | None:
    """Why generation ``g``'s steps do not run (a check before it found no gain), else None."""
    h = stopped_after(recipe)
    if h is None or g <= h:
        return None
    c = json.loads(recipe.layout.generations_record.read_text())["checks"][str(h)]
    before = "the base agent" if h == 1 else f"generation {h - 1}'s"
    return (f"generations.stop_if_no_gain: generation {h}'s best student {c['best']} ({c['accuracy']:.1%}) did not "
            f"beat {before} {c['previous_best']} ({c['previous_accuracy']:.1%}) on {c['problems']} "
            "held-out problems")


def last_generation(recipe: Recipe) -> int:
    """The last generation that runs: ``generations.count``, or the one after which the stop rule stopped."""
    h = stopped_after(recipe)
    return h if h is not None else count(recipe)
