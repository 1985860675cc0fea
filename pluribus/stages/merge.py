"""The merge stage: the recipe's merges (or one spec from the CLI) into merged/<name>/, each one step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.config import Recipe
from pluribus.merge.spec import MergeSpec
from pluribus.stages import Stage, StageSummary, json_of


def run(spec: MergeSpec, target: Path, *, overwrite: bool = False, name: str = "merge",
        device: str | None = None, progress: bool = True) -> StageSummary:
    """Merge ``spec`` into ``target`` (``pluribus merge``), summarized by what went in and what came out;
    ``device``: where folding adapters into a model computes, ``progress``: its bar (``pluribus.merge.run_merge``)."""
    from pluribus.merge import run_merge

    lines = run_merge(spec, target, overwrite=overwrite, device=device, progress=progress).lines()
    return StageSummary(name, target, " | ".join(lines), notes=tuple(lines))


def merge_inputs(recipe: Recipe, m: Any) -> dict[str, Path]:
    """The files a merge of the recipe reads: every input (and its adapter), the base, an external merge config."""
    spec = m.load(recipe.layout)
    out: dict[str, Path] = {}
    for i, inp in enumerate(spec.inputs):
        out[f"input {i}"] = Path(inp.path)
        if inp.adapter:
            out[f"input {i} adapter"] = Path(inp.adapter)
    if spec.base:
        out["base"] = Path(spec.base)
    if m.config:
        out["config"] = Path(m.config)  # edited in place, the merge it names is another
    return {k: v for k, v in out.items() if v.exists()}  # hub ids are named by the settings


def merge_settings(recipe: Recipe, m: Any) -> dict[str, Any]:
    """The settings a merge's freshness hashes: the recipe's section and its method's defaults (the registry's
    weight, rank and normalize defaults), so that a changed default reruns a merge that relied on it."""
    from pluribus.merge.registry import METHODS

    method = m.load(recipe.layout).method
    return {"merge": json_of(m), "defaults": METHODS[method].semantics() if method in METHODS else None}


def plan(recipe: Recipe) -> list[Stage]:
    """One step per merge of the recipe, in order."""
    def step(m: Any) -> Stage:
        # overwrite: a rerun reaches this step only when its inputs changed, so the old merge is stale
        return Stage(f"merge:{m.name}",
                     lambda progress, new_run: run(m.load(recipe.layout), recipe.layout.merged(m.name),
                                                   overwrite=True, name=f"merge:{m.name}", device=recipe.device,
                                                   progress=progress),
                     settings=lambda: merge_settings(recipe, m), inputs=lambda: merge_inputs(recipe, m),
                     after=tuple(f"train:{e}" for e in m.experts or []))

    return [step(m) for m in (recipe.merge.all() if recipe.merge else [])]
