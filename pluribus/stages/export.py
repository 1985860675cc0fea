"""The export stage: a Hub-ready folder of an adapter or model (weights, tokenizer, card), pushed when asked."""

from __future__ import annotations

from pathlib import Path

from pluribus.config import Recipe
from pluribus.stages import Stage, StageSummary, json_of


def publish(source: str | Path, out: str | Path, *, repo_id: str | None = None, private: bool = True,
            token_env: str | None = None, datasets: list[str] | None = None, eval_results: str | Path | None = None,
            title: str | None = None, overwrite: bool = False) -> StageSummary:
    """Write ``out`` from ``source`` (``pluribus export``) and push it to ``repo_id`` when one is given.

    A bad repo id or a missing token fails before the folder is written."""
    from pluribus.hub import check_push, export_folder, push_folder

    if repo_id:
        check_push(repo_id, token_env)
    folder = export_folder(source, out, datasets=datasets or [], eval_results=eval_results, title=title,
                           overwrite=overwrite)
    if not repo_id:
        return StageSummary("export", folder, f"Hub-ready folder {folder}", notes=(f"exported: {folder}",))
    url = push_folder(folder, repo_id, private=private, token_env=token_env)
    return StageSummary("export", folder, f"pushed to {url}", notes=(f"exported: {folder}", f"pushed: {url}"))


def export_source(recipe: Recipe) -> Path:
    """What export publishes by default: the first merge, else the first expert that is not a PRM."""
    cfg = recipe.require("export")
    if cfg.source:
        return Path(cfg.source)
    if recipe.merge is not None:
        return recipe.layout.merged(recipe.merge.all()[0].name)
    experts = [t for t in recipe.train.trainings() if t.objective != "prm"] if recipe.train else []
    return recipe.layout.adapter(experts[0].expert_name if experts else "rsft")


def _results(recipe: Recipe) -> Path | None:
    results = recipe.layout.eval / "results.json"
    return results if results.is_file() else None


def run(recipe: Recipe) -> StageSummary:
    """The recipe's export section: its source (default ``export_source``), eval results when there are some."""
    cfg = recipe.require("export")
    return publish(export_source(recipe), recipe.layout.export, repo_id=cfg.repo_id, private=cfg.private,
                   token_env=cfg.token_env, datasets=cfg.datasets, eval_results=_results(recipe), title=recipe.name,
                   overwrite=cfg.overwrite)


def plan(recipe: Recipe) -> list[Stage]:
    """The export step: it follows the export section, its source and the eval results it cites."""
    if recipe.export is None:
        return []
    def inputs() -> dict[str, Path]:
        results = _results(recipe)
        return {"source": export_source(recipe), **({"eval": results} if results else {})}

    return [Stage("export", lambda progress, new_run: run(recipe), settings=lambda: json_of(recipe.export),
                  inputs=inputs)]
