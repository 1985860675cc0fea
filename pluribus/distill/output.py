"""An expert's output: its folder and checkpoints, resume, the adapter saved atomically, and training_record.json."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from pluribus.config import DATASET_OF_OBJECTIVE, Recipe, TrainConfig
from pluribus.distill.data import fingerprint
from pluribus.distill.student import base_identity
from pluribus.errors import OutputExistsError, PluribusError

logger = logging.getLogger("pluribus.distill")

RECORD_NAME = "training_record.json"


def checkpoints_dir(out: Path) -> Path:
    """Where a stage's Trainer checkpoints live: beside the final adapter folder, never inside it."""
    return out.with_name(out.name + ".checkpoints")


_CHECKPOINT_FILES = (("adapter_config.json",), ("adapter_model.safetensors", "adapter_model.bin"),
                     ("trainer_state.json",))


def _missing(ckpt: Path) -> str | None:
    """What a checkpoint folder lacks to be resumed from (a crash while it was saved leaves it partial), or
    None. trainer_state.json is written last, so a readable one means the rest is whole."""
    for names in _CHECKPOINT_FILES:
        if not any((ckpt / n).is_file() for n in names):
            return names[0]
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "a readable trainer_state.json"
    return None if isinstance(state, dict) else "a readable trainer_state.json"


def _checkpoint(out: Path, resume: bool | str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``resume`` names (the latest complete one under the stage's checkpoints, or a given
    path) and its adapter config, or a PluribusError; reads only small files, so it runs before the model is
    loaded."""
    from pluribus.adapter import read_adapter_config

    if isinstance(resume, str) and resume not in {"latest", "true", "True"}:
        ckpt = Path(resume)
        if not (ckpt / "adapter_config.json").is_file():
            raise PluribusError(f"--resume: '{ckpt}' is not an adapter checkpoint (no adapter_config.json)")
        if (lacks := _missing(ckpt)) is not None:
            raise PluribusError(f"--resume: checkpoint '{ckpt}' is incomplete (no {lacks}; was it killed while "
                                "saving?); resume from an earlier checkpoint or start without --resume")
    else:
        found = sorted((p for p in checkpoints_dir(out).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                       key=lambda p: int(p.name.split("-")[-1]))
        if not found:
            raise PluribusError(f"--resume: no checkpoint under '{checkpoints_dir(out)}'; start without --resume")
        while found and (lacks := _missing(found[-1])) is not None:
            logger.warning("--resume: skipping '%s', an incomplete checkpoint (no %s; killed while saving?)",
                           found[-1], lacks)
            found.pop()
        if not found:
            raise PluribusError(f"--resume: no complete checkpoint under '{checkpoints_dir(out)}' (each was cut "
                                "off while saving); start without --resume")
        ckpt = found[-1]
    return ckpt, read_adapter_config(ckpt)


def _finished_at(ckpt: Path, cfg: TrainConfig) -> int | None:
    """The step a checkpoint ended its training at, when ``cfg`` asks for no more steps or epochs, else None."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    step, planned = state.get("global_step", 0), state.get("max_steps", 0)
    if not (isinstance(step, int) and isinstance(planned, int) and planned > 0 and step >= planned):
        return None
    # a larger max_steps (or more epochs) continues a finished run: that is what --resume is for
    more = cfg.max_steps > step if cfg.max_steps > 0 else cfg.epochs > state.get("num_train_epochs", cfg.epochs)
    return None if more else step


def resume_checkpoint(out: Path, resume: bool | str | None, model: Any) -> str | None:
    """The checkpoint to resume from (see ``_checkpoint``), or None.

    Refuses (PluribusError) a checkpoint whose adapter was trained on another base model.
    """
    if not resume:
        return None
    ckpt, config = _checkpoint(out, resume)
    theirs = config.get("base_model_name_or_path") or ""
    theirs = str(Path(theirs).resolve()) if theirs and Path(theirs).exists() else theirs
    ours = base_identity(model)
    if theirs != ours:
        raise PluribusError(
            f"--resume: checkpoint '{ckpt}' holds an adapter of base '{theirs}', but train.model is '{ours}'; "
            "resume with the same base model or start a new run"
        )
    return str(ckpt)


def check_output(out: Path, *, overwrite: bool, resume: bool | str | None, cfg: TrainConfig | None = None) -> None:
    """Before any training: refuse an existing ``out`` unless ``overwrite``, or ``resume`` (continuing a run
    replaces its own adapter); with ``resume``, its checkpoint must exist and be readable, and (given ``cfg``)
    not already be the end of a training whose adapter is in ``out``."""
    if out.exists() and not overwrite and not resume:
        raise OutputExistsError(out, ", --resume to continue the training that wrote it, or --out another folder")
    if resume:
        ckpt, _ = _checkpoint(out, resume)
        # without out, resuming a finished checkpoint still saves its adapter (killed right after the last save)
        if cfg is not None and out.exists() and (step := _finished_at(ckpt, cfg)) is not None:
            raise PluribusError(f"--resume: training already finished at step {step} ('{ckpt}'); nothing to "
                                f"resume. The adapter is in '{out}'; raise train.max_steps (or train.epochs) to "
                                "train further, or pass --overwrite without --resume to train again")


def save_output(model: Any, tokenizer: Any, out: Path, record: dict[str, Any], overwrite: bool = False) -> Path:
    """Write the PEFT adapter (safetensors), the tokenizer and ``training_record.json`` atomically to ``out``.

    An existing ``out`` is refused unless ``overwrite`` (see ``check_output``, which runs before training).
    In several processes rank 0 writes and every rank returns once the folder is in place.
    """
    from pluribus.distill import distributed
    from pluribus.hub import is_prm, local_card, prm_section
    from pluribus.io import atomic_dir

    if not distributed.is_main():  # several processes: rank 0 writes, the others wait until the folder is whole
        distributed.barrier()
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str))
        # PEFT's own card names the base by its local path (invalid on the Hub): ours by Hub id, and says how to publish
        base = record.get("base_model_path") or record.get("base_model")
        prm = is_prm(record)  # a token classifier: its card says so, and how to score with it
        (tmp / "README.md").write_text(local_card("adapter", base, f"pluribus {record.get('expert', 'adapter')} adapter",
                                                  "adapter", tags=[str(record.get("objective", ""))], folder=out.name,
                                                  body=prm_section(record) if prm else None,
                                                  pipeline_tag="token-classification" if prm else "text-generation"))
    distributed.barrier()
    return out


def training_record(
    recipe: Recipe, cfg: TrainConfig, model: Any, dataset: str | Path | None, metrics: dict[str, Any],
    counts: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The small record export puts in the model card: recipe, base, dataset fingerprints, final metrics; and
    ``history``, the Trainer's log_history (the logged steps: loss, learning rate, rewards), the curves that
    `pluribus view` draws."""
    import pluribus
    from pluribus.device import where
    from pluribus.distill import distributed

    for key, value in metrics.items():
        if "loss" in key and isinstance(value, float) and not math.isfinite(value):
            raise PluribusError(f"training diverged: the final {key.replace('_', ' ')} is {value}; no adapter was "
                                f"saved. Lower train.lr (now {cfg.lr:g}) or check the data")
    return {
        "objective": cfg.objective,
        "expert": cfg.expert_name,
        "base_model": cfg.model,
        "base_model_path": base_identity(model),
        "recipe": recipe.to_dict(),
        "dataset": {"path": str(dataset), "files": fingerprint(dataset)} if dataset else None,
        "data": counts or {},
        "processes": distributed.world_size(),  # data-parallel: a step saw batch_size x grad_accum x processes
        "ran_on": where(model),  # the device and dtype the Trainer trained on (pluribus.device)
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
        "log_history": [{k: v for k, v in h.items() if isinstance(v, int | float | str)} for h in history or []],
        "pluribus_version": getattr(pluribus, "__version__", "0"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def default_paths(recipe: Recipe, objective: str, dataset: str | Path | None,
                  out: str | Path | None) -> tuple[Path, Path]:
    """(dataset, output adapter folder) of a training: the run folder's defaults unless given."""
    cfg = recipe.require("train")
    layout = recipe.layout
    ds = Path(dataset) if dataset else layout.dataset(DATASET_OF_OBJECTIVE[objective], cfg.data)
    return ds, Path(out) if out else layout.adapter(cfg.expert_name)
