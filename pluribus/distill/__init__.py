"""LoRA/QLoRA trainers: reasoning SFT, trajectory-augmented SFT, process reward model, process-aware RL."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train_stage(recipe: Any, *, dataset: str | Path | None = None, out: str | Path | None = None,
                resume: bool | str | None = None, overwrite: bool = False) -> Path:
    """Run ``recipe.train.stage`` (rsft | augmented -> sft, prm, rl) and return the adapter folder.

    An existing adapter folder is replaced only with ``overwrite`` (or when ``resume`` continues its run).
    """
    stage = recipe.require("train").stage
    if stage in {"rsft", "augmented"}:
        from pluribus.distill.sft import train_sft as run
    elif stage == "prm":
        from pluribus.distill.prm import train_prm as run
    else:
        from pluribus.distill.rl import train_rl as run
    return run(recipe, dataset=dataset, out=out, resume=resume, overwrite=overwrite)
