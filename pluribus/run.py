"""`pluribus run RECIPE`: every stage the recipe has a section for, in pipeline order, resumable.

debate (task + team) -> self samples (if an expert learns from them) -> build -> train (each expert, in
order) -> merge (each merge) -> eval -> export: the steps of pluribus.stages, each reading what the previous ones
wrote in ``runs/<name>/``. A finished step is recorded in ``<run>/stages.json`` with a fingerprint of every setting
that changes its output (the seed included), of the contents of every file it read (the store, the datasets, the
adapters it starts from) and the pluribus version that ran it; a rerun skips it only while all match and its
output exists, and says why it reran.
The steps that keep answer stores (debate, self samples, eval) always run and generate only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pluribus import __version__
from pluribus.config import Recipe, write_recipe
from pluribus.errors import PluribusError
from pluribus.io import atomic_write_text, content_fingerprint, make_dirs
from pluribus.stages import Stage, StageSummary


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ran | skipped
    seconds: float
    summary: str


def plan(recipe: Recipe) -> list[Stage]:
    """The steps ``recipe`` asks for, in pipeline order (each after the steps it names in ``after``); with
    generations, generation g's steps (``gen<g>/...``) after generation g-1's and before eval."""
    from pluribus.stages import build, debate, eval, export, generations, merge, selfsamples, train

    first = [step for stage in (debate, selfsamples, build, train, merge) for step in stage.plan(recipe)]
    return ordered([*first, *generations.plan(recipe), *eval.plan(recipe), *export.plan(recipe)])


def ordered(steps: list[Stage]) -> list[Stage]:
    """``steps`` in the given order, except that a step's ``after`` (the steps making what it reads, e.g. the
    experts a team seats) are pulled forward to run before it. Raises PluribusError on a cycle (the recipe's
    seat check refuses those first)."""
    by_key = {s.key: s for s in steps}
    out: list[Stage] = []
    placed: set[str] = set()

    def place(step: Stage, waiting: tuple[str, ...]) -> None:
        if step.key in placed:
            return
        if step.key in waiting:
            raise PluribusError(f"the steps {' -> '.join([*waiting, step.key])} wait on each other; a team may "
                                "not seat an expert trained on its own debate (use generations)")
        for key in step.after:
            if key in by_key:
                place(by_key[key], (*waiting, step.key))
        out.append(step)
        placed.add(step.key)

    for step in steps:
        place(step, ())
    return out


# ------------------------------------------------------------------------------------------ freshness


def fingerprint(step: Stage, seed: int) -> dict[str, Any]:
    """What the step's output depends on: its settings and the seed, the contents of its inputs, this version."""
    settings = json.dumps({"settings": step.settings(), "seed": seed}, sort_keys=True, default=str)
    return {"settings": hashlib.sha256(settings.encode()).hexdigest()[:16],
            "inputs": {role: content_fingerprint(p) for role, p in sorted(step.inputs().items())},
            "pluribus": __version__}


def _done(recipe: Recipe) -> dict[str, Any]:
    path = recipe.layout.stages
    return json.loads(path.read_text()) if path.is_file() else {}


def _mark(recipe: Recipe, step: Stage, prints: dict[str, Any], output: Path | None) -> None:
    done = _done(recipe)
    done[step.key] = {**prints, "output": str(output) if output else None,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(recipe.layout.stages, json.dumps(done, indent=2))


def stale_reason(recipe: Recipe, step: Stage, prints: dict[str, Any]) -> str | None:
    """Why ``step`` must run (never ran, settings or an input changed, output gone), or None when it is current;
    ``prints`` is its ``fingerprint`` now."""
    entry = _done(recipe).get(step.key)
    if not entry or "settings" not in entry:
        return "never ran"
    if entry["settings"] != prints["settings"]:
        return "its settings changed"
    if entry.get("pluribus") != prints["pluribus"]:
        # another version may compute the same settings differently (a fixed bug, a new default)
        before = entry.get("pluribus")
        return f"it ran with pluribus {before}, this is {__version__}" if before else \
            f"it ran with a pluribus before {__version__}"
    old, new = entry.get("inputs", {}), prints["inputs"]
    changed = sorted(role for role in set(old) | set(new) if old.get(role) != new.get(role))
    if changed:
        return f"{', '.join(changed)} changed"
    if not entry.get("output") or not Path(entry["output"]).exists():
        return "its output is missing"
    return None


def step_of(recipe: Recipe, key: str) -> Stage | None:
    """The step ``key`` of ``recipe``'s plan (``build``, ``train:rsft``...), or None when the recipe has none."""
    return next((step for step in plan(recipe) if step.key == key), None)


def record_step(recipe: Recipe, key: str, output: Path | None) -> None:
    """Record step ``key`` as run now, as `pluribus run` does: a stage's CLI command that made exactly what the
    step makes calls this, so `run` and the commands after it see the same freshness."""
    step = step_of(recipe, key)
    if step is not None and not step.keeps_store:
        _mark(recipe, step, fingerprint(step, recipe.seed), output)


def staleness(recipe: Recipe, key: str) -> str | None:
    """Why step ``key``'s output is not current for ``recipe`` (``stale_reason``), or None when it is."""
    step = step_of(recipe, key)
    if step is None:
        return f"the recipe has no {key} step"
    return stale_reason(recipe, step, fingerprint(step, recipe.seed))


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True, new_run: bool = False,
               console: Console | None = None) -> list[StageResult]:
    """Run every step the recipe has a section for, in order; returns what each step did.

    ``new_run`` is passed to the steps that keep answer stores (debate, self samples, eval): stores written with
    other settings are moved aside instead of refused. Each step's summary is printed as its CLI command prints it."""
    console = console or Console(stderr=True)
    steps = plan(recipe)
    if not steps:
        raise PluribusError("nothing to run: the recipe has no stage sections (team/build/train/merge/eval/export)")
    if recipe.export is not None and recipe.export.repo_id:
        from pluribus.hub import check_push

        check_push(recipe.export.repo_id, recipe.export.token_env)  # not after hours of training
    make_dirs(recipe.run_dir)  # an unusable root fails here, before any stage
    from pluribus.threads import apply_threads

    apply_threads(recipe.threads)  # before the first stage loads a model
    results = []
    for step in steps:
        if (why := step.skip()) is not None:
            results.append(StageResult(step.key, "skipped", 0.0, why))
            console.print(f"[bold]{escape(step.key)}[/]: skipped ({escape(why)})")
            continue
        if not step.keeps_store:
            # now: the inputs are what the steps before it just wrote
            reason = "--force" if force else stale_reason(recipe, step, fingerprint(step, recipe.seed))
            if reason is None:
                results.append(StageResult(step.key, "skipped", 0.0, "up to date (--force reruns it)"))
                console.print(f"[bold]{escape(step.key)}[/]: up to date, skipped")
                continue
            console.rule(f"[bold]{escape(step.key)}[/] [dim](runs: {escape(reason)})")
        else:
            console.rule(f"[bold]{escape(step.key)}")
        t0 = time.perf_counter()
        summary: StageSummary = step.run(progress, new_run)
        write_recipe(recipe)  # once a stage has accepted it: a refused config must not replace the run's recipe
        if not step.keeps_store:
            # the inputs as read (a store step before it may have grown them)
            _mark(recipe, step, fingerprint(step, recipe.seed), summary.output)
        results.append(StageResult(step.key, "ran", time.perf_counter() - t0, summary.line))
        if summary.columns:
            summary.print(console, console)  # the table its CLI command prints (datasets, systems)
        else:
            summary.print(console, console, notes=False)  # its notes are its line
        console.print(f"[bold]{escape(step.key)}[/]: {escape(summary.line)}", highlight=False)
    return results
