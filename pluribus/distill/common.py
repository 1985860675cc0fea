"""What every trainer shares: datasets in, the student with LoRA/QLoRA, Trainer arguments, progress, the output.

Each stage (``sft.py``, ``prm.py``, ``rl.py``) composes these pieces in its own ``train_*`` function:
load rows -> load the student -> attach LoRA -> build a ``transformers.Trainer`` -> train -> save the adapter
folder with ``training_record.json``. Nothing here is a framework; each function does one job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pluribus.config import DATASET_OF_OBJECTIVE, Recipe, TrainConfig
from pluribus.errors import OutputExistsError, PluribusError

logger = logging.getLogger("pluribus.distill")

# The fields a row of each dataset kind must have: TRL's own formats (conversational ``messages``, stepwise
# supervision). What pluribus's builders add beside them (problem_id, agent, round, kind, scores, debate) is
# optional on input, so a user's TRL dataset trains as it is (``load_rows`` fills in what training reads).
DATASET_COLUMNS = {
    "rsft": ("messages",),
    "augmented": ("messages",),
    "process": ("prompt", "completions", "labels"),
}
RECORD_NAME = "training_record.json"


# ------------------------------------------------------------------------------------------- datasets


def dataset_files(path: str | Path) -> list[Path]:
    """The parquet / jsonl files of a dataset folder (or the file itself), sorted; a PluribusError if none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PluribusError(f"dataset '{path}' does not exist; build it first (`pluribus build`) or pass --dataset")
    # a built dataset keeps its rows in data/ and other formats of the same rows beside it (math_shepherd/,
    # prompt_completion/): read the rows once, in the format their kind trains on
    root = path / "data" if (path / "data").is_dir() else path
    files = sorted(p for p in root.rglob("*") if p.suffix in {".parquet", ".jsonl"} and not p.name.startswith("."))
    if not files:
        raise PluribusError(f"dataset folder '{path}' holds no .parquet or .jsonl files")
    return files


def _corrupt(f: Path, why: str) -> PluribusError:
    return PluribusError(f"dataset file '{f}' is corrupt or truncated ({why}); rebuild the dataset "
                         "(`pluribus build --overwrite`) or remove that file")


def _count_rows(files: list[Path]) -> int:
    """Rows over all files, from parquet footers and jsonl line counts; an unreadable file is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        try:
            if f.suffix == ".parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            else:
                with f.open(encoding="utf-8") as fh:
                    total += sum(1 for line in fh if line.strip())
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise _corrupt(f, f"{type(e).__name__}: {e}") from None
    return total


def _find_corrupt(files: list[Path]) -> PluribusError | None:
    """After datasets failed to load the files: the error naming the first one that does not parse, if any."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        if f.suffix == ".parquet":
            try:
                pq.read_table(f)
            except (pa.ArrowException, OSError) as e:
                return _corrupt(f, f"{type(e).__name__}: {e}")
            continue
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return _corrupt(f, f"line {n} is not valid JSON: {e.msg}")
                if not isinstance(row, dict):
                    return _corrupt(f, f"line {n} is a JSON {type(row).__name__}, not an object")
    return None


def load_rows(path: str | Path, kind: str) -> Any:
    """Load a dataset of ``kind`` (rsft | augmented | process) as a ``datasets.Dataset`` and check its fields.

    TRL's formats are read as they are: a conversational ``messages`` dataset, a prompt-completion one (made
    into ``messages``), a stepwise-supervision one (``prompt``, ``completions``, ``labels``). What pluribus's
    builders add is filled in where absent: ``problem_id`` from a hash of the question, ``scores`` from the labels.
    Raises PluribusError when the dataset is missing, empty, or lacks a required field.
    """
    from datasets import load_dataset

    files = dataset_files(path)
    fmt = "parquet" if files[0].suffix == ".parquet" else "json"
    if any((f.suffix == ".parquet") != (fmt == "parquet") for f in files):
        raise PluribusError(f"dataset '{path}' mixes parquet and jsonl files; keep one format per folder")
    if _count_rows(files) == 0:
        raise PluribusError(f"dataset '{path}' is empty; the builder kept no rows (check its filters)")
    try:
        ds = load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets wraps a parse failure in its own error types; name the bad file instead
        bad = _find_corrupt(files)
        if bad is not None:
            raise bad from None
        raise PluribusError(f"dataset '{path}' cannot be loaded ({type(e).__name__}: {e}); its files may "
                            "disagree on columns or types, rebuild it with `pluribus build --overwrite`") from None
    if len(ds) == 0:
        raise PluribusError(f"dataset '{path}' is empty; the builder kept no rows (check its filters)")
    if kind != "process" and "messages" not in ds.column_names and {"prompt", "completion"} <= set(ds.column_names):
        chats = [_prompt_completion_as_messages(r) for r in ds]  # no ds.map: its progress bar ignores --no-progress
        ds = ds.add_column("messages", chats).remove_columns(["prompt", "completion"])
    missing = [f for f in DATASET_COLUMNS[kind] if f not in ds.column_names]
    if missing:
        raise PluribusError(
            f"dataset '{path}' is not a '{kind}' dataset: missing field(s) {missing}; "
            f"it has {ds.column_names}, a '{kind}' row needs {list(DATASET_COLUMNS[kind])}"
            + (" (or TRL's prompt + completion)" if kind != "process" else "")
        )
    if "problem_id" not in ds.column_names:
        ds = ds.add_column("problem_id", [_question_id(r, kind) for r in ds])
    if kind == "process" and "scores" not in ds.column_names:  # hard labels only: the soft target is the label
        ds = ds.add_column("scores", [[float(x) for x in r["labels"]] for r in ds])
    return ds


def _prompt_completion_as_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """TRL's prompt-completion row (strings or message lists) as one chat: the loss is on the completion alone
    either way, since SFT labels the assistant turns only."""
    prompt, completion = row["prompt"], row["completion"]
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return head + tail


def _question_id(row: dict[str, Any], kind: str) -> str:
    """A row's problem, where the data names none: a hash of its question (the first user turn), so that
    ``split_eval`` keeps rows of one question on one side."""
    if kind == "process":
        prompt = row["prompt"]
        question = prompt if isinstance(prompt, str) else next(
            (m.get("content", "") for m in prompt if m.get("role") == "user"), json.dumps(prompt))
    else:
        question = next((m.get("content", "") for m in row["messages"] if m.get("role") == "user"),
                        json.dumps(row["messages"]))
    return "q-" + hashlib.sha256(str(question).encode()).hexdigest()[:12]


def fingerprint(path: str | Path) -> dict[str, Any]:
    """sha256 of each file of a dataset, so a training record names exactly the data it saw."""
    out = {}
    for f in dataset_files(path):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[str(f)] = h.hexdigest()
    return out


def split_eval(ds: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Hold out ``fraction`` of the rows for the eval loss; grouped by problem so no problem is on both sides."""
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    ids = sorted(set(ds["problem_id"]))
    n_eval = max(1, round(len(ids) * fraction))
    if n_eval >= len(ids):
        return ds, None
    rank = {pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest() for pid in ids}
    held = set(sorted(ids, key=rank.__getitem__)[:n_eval])
    flags = [pid in held for pid in ds["problem_id"]]
    return (ds.select([i for i, f in enumerate(flags) if not f]), ds.select([i for i, f in enumerate(flags) if f]))


# ---------------------------------------------------------------------------------------------- model


def load_student(
    cfg: TrainConfig, *, head: str = "causal", trust_remote_code: bool = False, seed: int = 0
) -> tuple[Any, Any]:
    """Load the student (``head`` causal or token-cls with one logit) in bf16, or 4-bit NF4 for QLoRA.

    The tokenizer gets a pad token (eos) when it has none and pads on the right (training). The global RNG is
    seeded with ``seed`` first: the new score head and the LoRA A matrices are drawn from it, so one recipe
    gives one initial adapter whatever ran before in the process (the Trainer seeds only later).
    """
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from pluribus.models import check_finite_model, load_tokenizer, resolve_model

    set_seed(seed)
    folder = resolve_model(cfg.model)
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if cfg.bf16 else torch.float32,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": "sdpa",
    }
    if cfg.lora.quantize == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PluribusError(
                "train.lora.quantize=nf4 (QLoRA) needs bitsandbytes: run `pip install 'bitsandbytes>=0.45'`"
            ) from None
        from pluribus.models import nf4_config

        kwargs["quantization_config"] = nf4_config("nf4")
        kwargs["device_map"] = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if head == "causal":
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    else:
        model = score_head_model(folder, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    check_finite_model(model, folder)
    if cfg.lora.quantize == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.use_cache = False
    return model, tokenizer


def score_head_model(folder: str | Path, **kwargs: Any) -> Any:
    """The base as a token classifier with one logit (the PRM), without transformers' report of the new head."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    # the score head is new by design: the load report listing its weights as MISSING is no news to the user
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForTokenClassification.from_pretrained(folder, num_labels=1, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def linear_module_names(model: Any) -> list[str]:
    """Distinct suffix names of the model's linear layers (incl. 4-bit ones), e.g. ['down_proj', 'q_proj', ...]."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: Any, targets: str | Sequence[str]) -> str | list[str]:
    """'all-linear' as is; a list is checked against the model's linear layers (a PluribusError lists them)."""
    if targets == "all-linear":
        return "all-linear"
    available = linear_module_names(model)
    matched = [t for t in targets if any(n == t or re.fullmatch(t, n) for n in available)]
    unmatched = [t for t in targets if t not in matched]
    if not matched or unmatched:
        raise PluribusError(
            f"train.lora.target_modules {list(unmatched or targets)} match no linear layer of this model; "
            f"its linear modules are {available} (or use 'all-linear')"
        )
    return list(targets)


def attach_lora(model: Any, cfg: TrainConfig, task_type: str) -> Any:
    """Wrap ``model`` with a trainable LoRA (``cfg.lora``) or continue ``cfg.init_adapter``; returns the PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.init_adapter:
        from pluribus.models import check_adapter

        check_adapter(cfg.init_adapter, base_identity(model))
        return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    targets = resolve_targets(model, cfg.lora.target_modules)
    if targets == "all-linear" and task_type != "CAUSAL_LM":
        # PEFT's all-linear skips only a causal LM's output layer; a classification head is trained whole
        targets = [n for n in linear_module_names(model) if n not in {"score", "classifier", "lm_head"}]
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.rslora,
        target_modules=targets,
        task_type=task_type,
    )
    peft_model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        # LoRA leaves the embeddings frozen; checkpointed blocks need an input that requires grad.
        peft_model.enable_input_require_grads()
    return peft_model


def patch_kernels(model: Any, mode: str) -> Any:
    """Swap in pluribus's fused kernels (``pluribus.kernels.patch_model``) unless mode is 'off'; returns the handle."""
    if mode == "off":
        return None
    from pluribus.kernels import patch_model

    return patch_model(model, mode)


# ------------------------------------------------------------------------------------- trainer pieces


def training_arguments(cfg: TrainConfig, output_dir: Path, *, seed: int, has_eval: bool, **overrides: Any) -> Any:
    """``transformers.TrainingArguments`` for a stage; ``overrides`` win (a stage sets what it must)."""
    import torch
    from transformers import TrainingArguments

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
        "bf16": cfg.bf16 and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()),
        "remove_unused_columns": False,
        "logging_nan_inf_filter": False,  # a NaN loss must show as NaN (FiniteGuard stops on it), not as 0.0
        "disable_tqdm": True,  # the rich bar below replaces it
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "use_cpu": not torch.cuda.is_available(),
    }
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    kwargs.update({ckpt: cfg.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}})
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


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
                from pluribus.models import first_nonfinite

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


def callbacks() -> list[Any]:
    """The callbacks every stage's Trainer gets: the rich progress bar, the NaN/Inf guard, a log at each save."""
    return [rich_progress_callback(), finite_guard(), log_at_save()]


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


# ------------------------------------------------------------------------------------- resume / output


def checkpoints_dir(out: Path) -> Path:
    """Where a stage's Trainer checkpoints live: beside the final adapter folder, never inside it."""
    return out.with_name(out.name + ".checkpoints")


def base_identity(model: Any) -> str:
    """The base model a PEFT adapter is trained on, as PEFT records it (``base_model_name_or_path``)."""
    name = getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return str(Path(name).resolve()) if name and Path(name).exists() else str(name)


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
    from pluribus.models import read_adapter_config

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
    from pluribus.hub import local_card
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
        (tmp / "README.md").write_text(local_card("adapter", base, f"pluribus {record.get('expert', 'adapter')} adapter",
                                                  "adapter", tags=[str(record.get("objective", ""))], folder=out.name))
    distributed.barrier()
    return out


def training_record(
    recipe: Recipe, cfg: TrainConfig, model: Any, dataset: str | Path | None, metrics: dict[str, Any],
    counts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The small record export puts in the model card: recipe, base, dataset fingerprints, final metrics."""
    import pluribus
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
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
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
