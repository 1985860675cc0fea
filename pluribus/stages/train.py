"""The train stage: one expert of a recipe (its objective's trainer, its data, the adapters it starts from) into adapters/<name>/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pluribus.config import DATASET_OF_OBJECTIVE, Recipe, TrainConfig
from pluribus.device import ran_on
from pluribus.errors import PluribusError
from pluribus.stages import Stage, StageSummary, json_of


def resolve_expert(recipe: Recipe, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with expert names turned into adapter folders: ``init_adapter`` and ``rl.prm``.

    A name of an expert trained earlier in the recipe means ``<run>/adapters/<name>``; anything else is a folder.
    An rl expert without ``rl.prm`` takes the last prm expert before it, else ``<run>/adapters/prm``.
    """
    trainings = recipe.require("train").trainings()
    names = [t.expert_name for t in trainings]
    earlier = names[: names.index(cfg.expert_name)] if cfg.expert_name in names else names
    layout = recipe.layout

    def ref(value: str, field: str) -> str:
        if value in earlier:
            return str(layout.adapter(value))
        if value in names:
            raise PluribusError(f"train expert '{cfg.expert_name}': {field} '{value}' names an expert trained after "
                                "it; list that expert first")
        return value

    update: dict[str, Any] = {}
    if cfg.init_adapter:
        update["init_adapter"] = ref(cfg.init_adapter, "init_adapter")
    if cfg.objective == "rl":
        prm = cfg.rl.prm
        if prm is None:
            prms = [t.expert_name for t in trainings if t.objective == "prm" and t.expert_name in earlier]
            later = [t.expert_name for t in trainings if t.objective == "prm" and t.expert_name not in earlier]
            if not prms and later:
                raise PluribusError(f"train expert '{cfg.expert_name}' (rl) needs a process reward model, and the "
                                    f"prm expert {later[0]} is trained after it; list the prm expert first")
            prm = prms[-1] if prms else str(layout.adapter("prm"))
        update["rl"] = cfg.rl.model_copy(update={"prm": ref(prm, "rl.prm")})
    return cfg.model_copy(update=update)


def expert_inputs(recipe: Recipe, cfg: TrainConfig) -> dict[str, Path]:
    """What a training reads from the run folder: its dataset, and the adapters it starts from or is guided by."""
    resolved = resolve_expert(recipe, cfg)
    inputs = {"dataset": recipe.layout.dataset(DATASET_OF_OBJECTIVE[cfg.objective], cfg.data)}
    if resolved.init_adapter:
        inputs["init_adapter"] = Path(resolved.init_adapter)
    if cfg.objective == "rl" and resolved.rl.prm:
        inputs["prm"] = Path(resolved.rl.prm)
    return inputs


def train_stage(recipe: Recipe, *, expert: str | None = None, dataset: str | Path | None = None,
                out: str | Path | None = None, resume: bool | str | None = None, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Train one expert of ``recipe.train`` (the only one, or the one named ``expert``); returns its adapter folder.

    rsft | augmented -> SFT, prm -> the process reward model, rl -> process-aware RL. An existing adapter folder
    is replaced only with ``overwrite`` (or when ``resume`` continues its run); ``progress`` off draws no bar.
    """
    from pluribus.distill.distributed import check_launch

    check_launch()
    section = recipe.require("train")
    trainings = section.trainings()
    if expert is None:
        if len(trainings) > 1:
            names = ", ".join(t.expert_name for t in trainings)
            raise PluribusError(f"the train section has {len(trainings)} experts ({names}); name one with --expert "
                                "or run them all with `pluribus train RECIPE --all`")
        cfg = trainings[0]
    else:
        cfg = section.expert(expert)
    cfg = resolve_expert(recipe, cfg)
    if dataset is None:
        dataset = recipe.layout.dataset(DATASET_OF_OBJECTIVE[cfg.objective], cfg.data)
    if out is None:
        out = recipe.layout.adapter(cfg.expert_name)
    one = recipe.model_copy(update={"train": cfg})
    if cfg.objective in {"rsft", "augmented"}:
        from pluribus.distill.sft import train_sft as run
    elif cfg.objective == "prm":
        from pluribus.distill.prm import train_prm as run
    else:
        from pluribus.distill.rl import train_rl as run
    return run(one, dataset=dataset, out=out, resume=resume, overwrite=overwrite, progress=progress)


# ------------------------------------------------------------------------------------------ the protocol


def run(recipe: Recipe, *, expert: str | None = None, dataset: str | Path | None = None,
        out: str | Path | None = None, resume: bool | str | None = None, overwrite: bool = False,
        progress: bool = True) -> StageSummary:
    """One expert of ``recipe`` trained (``pluribus train``), summarized by its losses and final metrics.

    Under several processes every rank trains; rank 0 alone wrote the adapter, and only its summary has lines."""
    from pluribus.distill.distributed import is_main

    folder = train_stage(recipe, expert=expert, dataset=dataset, out=out, resume=resume, overwrite=overwrite,
                         progress=progress)
    name = expert or recipe.require("train").trainings()[0].expert_name
    if not is_main():
        return StageSummary(f"train:{name}", folder, "")
    record = json.loads((folder / "training_record.json").read_text())
    metrics = record.get("metrics", {})
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                      if ("loss" in k or k.startswith(("eval_step", "final_"))) and isinstance(v, int | float))
    if record.get("objective") == "prm":
        quality = record.get("prm_metrics") or {}
        shown += "".join(f"  {k}={quality[k]:.3f}" for k in ("auroc", "f1", "first_error_accuracy")
                         if isinstance(quality.get(k), float))
    where = {k: w for k, w in (("policy", record.get("ran_on")), ("PRM", record.get("data", {}).get("prm_ran_on")))
             if w}  # where the Trainer trained, and (rl) where its PRM scored
    ran = f"ran on {ran_on(where)}" if where else ""
    line = "  ".join(x for x in (shown, ran) if x)  # `pluribus run` prints a training's line alone
    notes = [f"adapter: {folder}", line]
    if record.get("objective") == "prm":
        notes.append(prm_quality(record.get("prm_metrics")))
    return StageSummary(f"train:{name}", folder, line, notes=tuple(notes))


def prm_quality(m: dict[str, Any] | None) -> str:
    """A PRM's held-out quality in one line (its record's ``prm_metrics``)."""
    if not m:
        return "PRM quality: not measured (no held-out rows: set train.eval_fraction > 0 for the prm expert)"

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return (f"PRM on {m['n_rows']} held-out rows ({m['n_steps']} steps): step AUROC {f(m['auroc'])}, "
            f"F1 {f(m['f1'])} (a step is right when its score > {m['threshold']:g}), first-error accuracy "
            f"{f(m['first_error_accuracy'])} ({f(m.get('first_error_accuracy_erroneous'))} on the "
            f"{m.get('n_erroneous_rows', '?')} rows with a wrong step, {f(m.get('first_error_accuracy_correct'))} on "
            "the all-correct ones)")


def plan(recipe: Recipe) -> list[Stage]:
    """One step per expert, in the recipe's order; each follows its own settings and the files it reads, and runs
    after the trainings whose adapters it reads (``after``: run.plan keeps them before it when a debate that seats
    it pulls it forward)."""
    trainings = recipe.train.trainings() if recipe.train else []

    def earlier(cfg: TrainConfig) -> tuple[str, ...]:
        try:
            resolved = resolve_expert(recipe, cfg)  # the one rule for what it reads (init_adapter, rl's PRM)
        except PluribusError:
            return ()  # the step says why when it runs
        read = {resolved.init_adapter, resolved.rl.prm if cfg.objective == "rl" else None}
        return tuple(f"train:{t.expert_name}" for t in trainings if str(recipe.layout.adapter(t.expert_name)) in read)

    def step(cfg: TrainConfig) -> Stage:
        # overwrite: a rerun reaches this step only when its inputs changed, so the old adapter is stale
        return Stage(f"train:{cfg.expert_name}",
                     lambda progress, new_run: run(recipe, expert=cfg.expert_name, overwrite=True, progress=progress),
                     settings=lambda: json_of(cfg), inputs=lambda: expert_inputs(recipe, cfg), after=earlier(cfg))

    return [step(cfg) for cfg in trainings]
