"""`pluribus run RECIPE`: every stage the recipe has a section for, in pipeline order, resumable.

debate (task + team) -> build -> train -> merge -> eval -> export. Each stage reads what the previous one wrote
in ``runs/<name>/``. A finished stage is recorded in ``<run>/stages.json`` with the hash of the recipe sections
it depends on; a rerun skips it while that hash is unchanged and its output exists (the debate and eval stores
resume on their own, so they always run and only generate what is missing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pluribus.config import Recipe, write_recipe
from pluribus.errors import PluribusError
from pluribus.io import atomic_write_text

# The recipe sections each stage's output depends on: a change to any of them reruns the stage.
DEPENDS = {
    "debate": ("task", "team"),
    "build": ("task", "team", "build"),
    "train": ("task", "team", "build", "train"),
    "merge": ("train", "merge"),
    "eval": ("task", "team", "train", "merge", "eval"),
    "export": ("train", "merge", "eval", "export"),
}


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ran | skipped
    seconds: float
    summary: str


STORES = ("debate", "eval")  # the stages that take new_run


def _stages_file(recipe: Recipe) -> Path:
    return recipe.run_dir / "stages.json"


def _done(recipe: Recipe) -> dict[str, Any]:
    path = _stages_file(recipe)
    return json.loads(path.read_text()) if path.is_file() else {}


def _mark(recipe: Recipe, stage: str, output: Path | None) -> None:
    done = _done(recipe)
    done[stage] = {"hash": recipe.section_hash(*DEPENDS[stage]), "output": str(output) if output else None,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(_stages_file(recipe), json.dumps(done, indent=2))


def _is_current(recipe: Recipe, stage: str) -> bool:
    entry = _done(recipe).get(stage)
    return bool(entry and entry["hash"] == recipe.section_hash(*DEPENDS[stage])
                and entry["output"] and Path(entry["output"]).exists())


# ------------------------------------------------------------------------------------------ the stages


def _debate(recipe: Recipe, progress: bool, new_run: bool = False) -> tuple[Path, str]:
    from pluribus.data.debate import run_debate

    s = run_debate(recipe, progress=progress, new_run=new_run)
    return recipe.run_dir / "trajectories", (
        f"{s.problems} problems; round-0 accuracy {s.round0_accuracy:.1%}, team {s.team_accuracy:.1%}; "
        f"{s.corrected} corrected, {s.lost} lost")


def _build(recipe: Recipe, progress: bool) -> tuple[Path, str]:
    from pluribus.data.build import build_recipe

    built = build_recipe(recipe, None, overwrite=True, progress=progress)
    return recipe.run_dir / "datasets", ", ".join(f"{b.kind}: {b.rows} rows" for b in built)


def _train(recipe: Recipe, progress: bool) -> tuple[Path, str]:
    from pluribus.distill import train_stage

    # overwrite: a rerun reaches this stage only when its inputs changed, so the old adapter is stale
    folder = train_stage(recipe, overwrite=True)
    metrics = json.loads((folder / "training_record.json").read_text()).get("metrics", {})
    shown = {k: v for k, v in metrics.items() if "loss" in k and isinstance(v, int | float)}
    return folder, "  ".join(f"{k}={v:.4g}" for k, v in shown.items())


def _merge(recipe: Recipe, progress: bool) -> tuple[Path, str]:
    from pluribus.merge import run_recipe_merge

    # overwrite: a rerun reaches this stage only when its inputs changed, so the old merge is stale
    summary = run_recipe_merge(recipe, overwrite=True)
    return recipe.run_dir / "merged" / recipe.require("merge").name, " | ".join(summary.lines())


def _eval(recipe: Recipe, progress: bool, new_run: bool = False) -> tuple[Path, str]:
    from pluribus.eval.evaluate import run_eval

    payload = run_eval(recipe, progress=progress, new_run=new_run)
    return recipe.run_dir / "eval" / "results.json", ", ".join(
        f"{name} {r['accuracy']:.1%}" for name, r in payload["systems"].items())


def _export(recipe: Recipe, progress: bool) -> tuple[Path, str]:
    from pluribus.hub import check_push, export_folder, push_folder

    cfg = recipe.require("export")
    if cfg.repo_id:
        check_push(cfg.repo_id, cfg.token_env)  # before the folder is written
    if cfg.source:
        source = Path(cfg.source)
    elif recipe.merge is not None:
        source = recipe.run_dir / "merged" / recipe.merge.name
    else:
        source = recipe.run_dir / "adapters" / (recipe.train.stage if recipe.train else "rsft")
    results = recipe.run_dir / "eval" / "results.json"
    out = export_folder(source, recipe.run_dir / "export", datasets=cfg.datasets,
                        eval_results=results if results.is_file() else None, title=f"{recipe.name}",
                        overwrite=cfg.overwrite)
    if cfg.repo_id:
        return out, f"pushed to {push_folder(out, cfg.repo_id, private=cfg.private, token_env=cfg.token_env)}"
    return out, f"Hub-ready folder {out}"


STAGES: list[tuple[str, Callable[[Recipe], bool], Callable[[Recipe, bool], tuple[Path, str]]]] = [
    ("debate", lambda r: r.task is not None and r.team is not None, _debate),
    ("build", lambda r: r.build is not None, _build),
    ("train", lambda r: r.train is not None, _train),
    ("merge", lambda r: r.merge is not None, _merge),
    ("eval", lambda r: r.eval is not None, _eval),
    ("export", lambda r: r.export is not None, _export),
]
ALWAYS_RESUME = {"debate", "eval"}


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True, new_run: bool = False,
               console: Console | None = None) -> list[StageResult]:
    """Run every stage the recipe has a section for, in order; returns what each stage did.

    ``new_run`` is passed to the stages that keep answer stores (debate, eval): stores written with other
    settings are moved aside instead of refused."""
    console = console or Console(stderr=True)
    if not any(wanted(recipe) for _, wanted, _ in STAGES):
        raise PluribusError("nothing to run: the recipe has no stage sections (team/build/train/merge/eval/export)")
    if recipe.export is not None and recipe.export.repo_id:
        from pluribus.hub import check_push

        check_push(recipe.export.repo_id, recipe.export.token_env)  # not after hours of training
    recipe.run_dir.mkdir(parents=True, exist_ok=True)  # an unusable root fails here, before any stage
    from pluribus.threads import apply_threads

    apply_threads(recipe.threads)  # before the first stage loads a model
    results = []
    for name, wanted, stage in STAGES:
        if not wanted(recipe):
            continue
        if not force and name not in ALWAYS_RESUME and _is_current(recipe, name):
            results.append(StageResult(name, "skipped", 0.0, "up to date (--force reruns it)"))
            console.print(f"[bold]{name}[/]: up to date, skipped")
            continue
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        output, summary = stage(recipe, progress, new_run=True) if new_run and name in STORES else stage(recipe, progress)
        write_recipe(recipe)  # once a stage has accepted it: a refused config must not replace the run's recipe
        _mark(recipe, name, output)
        results.append(StageResult(name, "ran", time.perf_counter() - t0, summary))
        console.print(f"[bold]{name}[/]: {escape(summary)}", highlight=False)
    return results
