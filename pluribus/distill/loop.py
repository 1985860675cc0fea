"""The training loop's pieces around ``transformers.Trainer``: its arguments, progress bar, finite-loss guard, report."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from pluribus.config import TrainConfig
from pluribus.errors import PluribusError


def training_arguments(cfg: TrainConfig, output_dir: Path, *, seed: int, has_eval: bool, device: Any = None,
                       **overrides: Any) -> Any:
    """``transformers.TrainingArguments`` for a stage; ``overrides`` win (a stage sets what it must).

    ``device`` (``pluribus.device.training_device``; None: auto) is where the Trainer places the model:
    ``use_cpu`` on the CPU (also on a machine with a GPU), its accelerator otherwise; bf16 where that device
    computes it."""
    from transformers import TrainingArguments

    from pluribus import device as devices

    device = devices.training_device(None) if device is None else device

    report = [r for r in cfg.report_to if r != "none"] or "none"
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": cfg.lr,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the total steps
        "weight_decay": cfg.weight_decay,
        "lr_scheduler_type": cfg.scheduler,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": cfg.eval_steps,
        "report_to": report,
        "bf16": cfg.bf16 and devices.supports_bf16(device),
        "remove_unused_columns": False,
        "logging_nan_inf_filter": False,  # a NaN loss must show as NaN (FiniteGuard stops on it), not as 0.0
        "disable_tqdm": True,  # the rich bar below replaces it
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": device.type == "cpu",
    }
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    kwargs.update({ckpt: cfg.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}})
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    if args.device.type == "cuda" and args.parallel_mode.name == "NOT_DISTRIBUTED":
        # one process trains on the policy's one GPU: Trainer would replicate the model over every visible GPU
        # (nn.DataParallel), which the RL sampler and the packed loss do not run under
        args._n_gpu = 1
    return args


def rich_progress_callback() -> Any:
    """A TrainerCallback drawing one rich progress bar over optimizer steps with the latest loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task = None
            self.metrics = ""

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.progress = Progress(
                # on a narrow screen rich squeezes the first column ("t..."): the metrics give way instead
                TextColumn("[bold]train", table_column=Column(no_wrap=True, min_width=5)), BarColumn(),
                MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               metrics="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step, metrics=self.metrics)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # the end-of-training summary (train_runtime, ...) is the CLI's to print, not the bar's last line
            if self.progress is not None and logs and "train_runtime" not in logs:
                shown = {k: v for k, v in logs.items() if isinstance(v, float | int) and k != "epoch"}
                self.metrics = " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:5])
                self.progress.update(self.task, metrics=self.metrics)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return RichProgress()


def finite_guard() -> Any:
    """A TrainerCallback that stops training when a logged loss is NaN/Inf (or, before a checkpoint is written,
    a trainable weight is) and then raises a PluribusError naming the step, so nothing NaN is ever saved.

    List it after ``rich_progress_callback()``: it raises in ``on_train_end``, once the progress bar is closed.
    """
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        def __init__(self) -> None:
            self.problem: str | None = None

        def _stop(self, control: Any, problem: str) -> None:
            self.problem = self.problem or problem
            control.should_save = False
            control.should_training_stop = True

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None:
                from pluribus.weights import first_nonfinite

                found = first_nonfinite((n, p) for n, p in model.named_parameters() if p.requires_grad)
                if found is not None:
                    self._stop(control, f"trainable weight '{found[0]}' became NaN/Inf at step {state.global_step}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if "loss" in key and isinstance(value, float | int) and not math.isfinite(value):
                    self._stop(control, f"the {key.replace('_', ' ')} became {value} at step {state.global_step}")
                    break

        def on_train_end(self, args, state, control, **kwargs):
            if self.problem is not None:
                with contextlib.suppress(OSError):  # the checkpoints folder, if this run left it empty
                    Path(args.output_dir).rmdir()
                raise PluribusError(
                    f"training diverged: {self.problem}; no adapter was saved. Lower train.lr "
                    f"(now {args.learning_rate:g}) or check the data (e.g. empty or extreme examples)"
                )

    return FiniteGuard()


def log_at_save() -> Any:
    """A TrainerCallback that logs the loss at every checkpoint step, so the checkpoint's log_history covers
    each step before it and a resumed run can report the whole run's ``train_loss`` (``train_and_report``)."""
    from transformers import TrainerCallback

    class LogAtSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True

    return LogAtSave()


def callbacks(*, progress: bool) -> list[Any]:
    """The callbacks every stage's Trainer gets: the rich progress bar (unless ``progress`` is off: `--no-progress`),
    the NaN/Inf guard, a log at each save."""
    return [*([rich_progress_callback()] if progress else []), finite_guard(), log_at_save()]


def train_and_report(trainer: Any, checkpoint: str | None) -> dict[str, Any]:
    """``trainer.train(resume_from_checkpoint=checkpoint)``'s metrics, with ``train_loss`` over the whole run.

    Trainer averages the loss over the steps of this call only; resumed, the steps before the checkpoint come
    from its log_history: ``sum_i loss_i * (step_i - step_{i-1})`` over the logged windows up to the checkpoint
    step (``log_at_save`` makes them reach it). A checkpoint whose logs stop short keeps Trainer's figure, and
    ``train_loss_steps`` says how many steps that figure covers. An accelerate config whose engine (FSDP,
    DeepSpeed) accelerate did not set up is refused first (``distributed.check_engine``).
    """
    from pluribus.distill import distributed

    try:
        distributed.check_engine(trainer.accelerator)
    except PluribusError:
        with contextlib.suppress(OSError):  # Trainer made the (empty) checkpoints folder: leave nothing behind
            Path(trainer.args.output_dir).rmdir()
        raise
    start = 0
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        start = int(state.get("global_step", 0))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    end = trainer.state.global_step
    if not start or "train_loss" not in metrics:
        return metrics
    before, last = 0.0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and entry.get("step", 0) <= start:
            before += float(entry["loss"]) * (entry["step"] - last)
            last = entry["step"]
    if last != start:
        metrics["train_loss_steps"] = end - start
        return metrics
    metrics["train_loss"] = (before + metrics["train_loss"] * (end - start)) / max(end, 1)
    metrics["train_loss_steps"] = end
    return metrics


def quiet_printer(trainer: Any) -> None:
    """Drop Trainer's plain-text log printer (it comes with disable_tqdm); the rich bar shows the metrics."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
