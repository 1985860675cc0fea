"""Process reward model: LoRA + a one-logit token-classification head read at the last token of each step.

A row ``{prompt, completions: [step, ...], labels: [bool, ...], scores: [float, ...]}`` is rendered as the chat
prompt followed by the steps, each followed by the step separator; the head's logit at each step's last token
(the separator's last) is trained with binary cross-entropy against the step's label (``train.prm.labels``: hard =
the bool, soft = the Monte-Carlo score in [0, 1]); every other position is ignored. ``sigmoid(logit)`` is the
step's score.

What the PRM learned to read is one record, ``StepFormat`` (prompt template, step rule, separator): it comes with
the process dataset (``stats.json``), goes into the PRM's ``training_record.json`` as ``step_format``, and
``load_prm`` gives it back. ``score_solutions`` is the one way to score a solution with a trained PRM (``pluribus
score``, RL's reward, TRL's reward, eval): it builds exactly training's input. ``prm_metrics`` gives held-out
step AUROC, F1 and first-error accuracy (``prm_metrics`` in the record). ``PRMScorer`` scores
solutions by question for the team's verifier and eval's prm-bon (its groups scored apart, so a score never
depends on what it was batched with).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from pluribus import device as devices
from pluribus.config import BuildConfig, Recipe, TrainConfig
from pluribus.data.builders.steps import StepFormat
from pluribus.data.verify import solution_score
from pluribus.distill import distributed, output
from pluribus.distill.data import load_rows, split_eval
from pluribus.distill.loop import callbacks, quiet_printer, train_and_report, training_arguments
from pluribus.distill.student import attach_lora, load_student, patch_kernels, score_head_model
from pluribus.errors import PluribusError

IGNORE = -100.0
logger = logging.getLogger("pluribus.distill")


def _prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_steps(tokenizer: Any, prompt: str | list[dict[str, str]], steps: list[str],
                 separator: str = "\n") -> tuple[list[int], list[int]]:
    """(input_ids, positions): the templated prompt, then each trimmed step + ``separator``; positions = each
    step's last token (the separator's last).

    Steps are tokenized one by one so every step ends on its own token, whatever the tokenizer merges.
    """
    head = tokenizer.apply_chat_template(_prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    positions = []
    for i, step in enumerate(steps):
        piece = tokenizer(step.strip() + separator, add_special_tokens=False)["input_ids"]
        if not piece:  # its score would be read on the token before: another step's
            raise PluribusError(f"step {i} ({step!r}) with the separator {separator!r} is empty: no token to read its "
                                "score at; drop empty steps or set a non-empty build.step_separator")
        ids = ids + piece
        positions.append(len(ids) - 1)
    return ids, positions


def prepare_examples(ds: Any, tokenizer: Any, cfg: TrainConfig,
                     separator: str = "\n") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenize process rows into ``{input_ids, labels}`` (float targets at step ends, IGNORE elsewhere); each step
    is followed by ``separator`` (the step format's)."""
    examples, counts = [], {"rows": len(ds), "kept": 0, "too_long": 0, "dropped": 0, "truncated": 0, "steps": 0}
    for i, row in enumerate(ds):
        steps, hard, soft = row["completions"], row["labels"], row["scores"]
        if not (len(steps) == len(hard) == len(soft)) or not steps:
            raise PluribusError(
                f"process row {i} (problem {row['problem_id']}) has {len(steps)} steps, {len(hard)} labels and "
                f"{len(soft)} scores; each step needs one label and one score"
            )
        targets = [float(x) for x in (soft if cfg.prm.labels == "soft" else hard)]
        ids, positions = encode_steps(tokenizer, row["prompt"], steps, separator)
        if len(ids) > cfg.max_length:
            counts["too_long"] += 1
            keep = [k for k, p in enumerate(positions) if p < cfg.max_length]
            if cfg.too_long == "drop" or not keep:
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
            ids, positions, targets = ids[: cfg.max_length], positions[: len(keep)], targets[: len(keep)]
        labels = [IGNORE] * len(ids)
        for p, t in zip(positions, targets, strict=True):
            labels[p] = t
        examples.append({"input_ids": ids, "labels": labels, "hard": [bool(h) for h in hard[: len(positions)]]})
        counts["kept"] += 1
        counts["steps"] += len(positions)
    if not examples:
        raise PluribusError(f"no PRM example is left: all {counts['rows']} rows exceed train.max_length={cfg.max_length}")
    return examples, counts


class PadCollator:
    """Right-pad ``{input_ids, labels}`` rows; labels pad with IGNORE."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = [list(f["input_ids"]) + [self.pad_token_id] * (width - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        labels = [list(f["labels"]) + [IGNORE] * (width - len(f["labels"])) for f in features]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels, dtype=torch.float32)}


def prm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean binary cross-entropy of the step-end logits against their (hard or soft) targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    labels = batch["labels"]
    at = labels != IGNORE
    return F.binary_cross_entropy_with_logits(logits[at].float(), labels[at])


class PRMTrainer(Trainer):
    """``transformers.Trainer`` with ``prm_loss`` (a step mean per micro-batch; Trainer divides by GA)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = prm_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = prm_loss(model, inputs)
        return loss.detach(), None, None


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class PRM:
    """A trained process reward model, loaded: the token classifier, its tokenizer, and the input format it
    learned (``step_format``, from its training record)."""

    model: Any
    tokenizer: Any
    step_format: StepFormat


@torch.no_grad()
def score_steps(prm: PRM, items: Sequence[tuple[str | list[dict[str, str]], Sequence[str]]],
                batch_size: int = 8) -> list[list[float]]:
    """For each ``(prompt, steps)`` in training's form (a process row's ``prompt`` and ``completions``), the PRM's
    score ``sigmoid(logit)`` at each step's last token; an item without steps gets ``[]``."""
    model, tokenizer, sep = prm.model, prm.tokenizer, prm.step_format.step_separator
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in items]
    todo = [i for i, (_, steps) in enumerate(items) if steps]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        chunk = [encode_steps(tokenizer, items[i][0], list(items[i][1]), sep) for i in rows]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (row, _) in enumerate(chunk):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.squeeze(-1).float()
        probs = torch.sigmoid(logits).cpu()
        for r, (i, (_, pos)) in enumerate(zip(rows, chunk, strict=True)):
            out[i] = probs[r, pos].tolist()
    model.train(was_training)
    return out


def score_solutions(prm: PRM, questions: Sequence[str | list[dict[str, str]]], solutions: Sequence[str], *,
                    rendered: bool = False, batch_size: int = 8) -> list[list[float]]:
    """The PRM's score of each step of each solution, on exactly the input it was trained on.

    ``solutions[i]`` is split into steps by the PRM's step rule (``prm.step_format.split``); ``questions[i]`` is
    filled into its prompt template, unless ``rendered`` (it already is the prompt training saw: a process row's
    ``prompt``, RL's prompt, a TRL prompt) or it is a list of chat messages (used as they are). Each step is
    followed by the PRM's separator. Returns one list of scores in (0, 1) per solution (``[]`` when the step rule
    finds no step). Used by ``pluribus score``, RL's reward and ``pluribus.distill.reward.PRMReward``.
    """
    if len(questions) != len(solutions):
        raise ValueError(f"{len(questions)} questions for {len(solutions)} solutions; give one question per solution")
    fmt = prm.step_format
    items = [(q if rendered or not isinstance(q, str) else fmt.prompt(q), fmt.split(sol))
             for q, sol in zip(questions, solutions, strict=True)]
    return score_steps(prm, items, batch_size)


def aggregate_steps(scores: Sequence[float], how: str) -> float:
    """One number from a solution's step scores: min, mean, product or last (0.0 for a solution without steps);
    the team's verifier aggregates with the same rule (pluribus.data.verify.solution_score)."""
    return solution_score(scores, how)


def recorded_step_format(adapter: str | Path) -> StepFormat:
    """The step format a PRM adapter was trained with, from its ``training_record.json``.

    A record from before pluribus recorded it gives its recipe's build settings and question prompt, and the
    newline separator that training always used then (said in a warning); no record at all, the default format.
    """
    from pluribus.distill.output import RECORD_NAME
    from pluribus.io import read_text_file

    path = Path(adapter) / RECORD_NAME
    if not path.is_file():
        logger.warning("PRM '%s' has no %s: scoring with the default step format (the question as the prompt, one "
                       "step a line, a newline after each)", adapter, RECORD_NAME)
        return StepFormat()
    try:
        record = json.loads(read_text_file(path, "training record"))
    except ValueError as e:
        raise PluribusError(f"training record '{path}' is not valid JSON ({e}); retrain the PRM") from None
    if isinstance(record, dict) and isinstance(record.get("step_format"), dict):
        return StepFormat.from_dict(record["step_format"], f"training record '{path}'")
    from pluribus.data.prompts import resolve_prompts

    recipe = (record.get("recipe") or {}) if isinstance(record, dict) else {}
    build, team = recipe.get("build") or {}, recipe.get("team") or {}
    fmt = StepFormat(build.get("prompt_template") or resolve_prompts(team.get("prompts") or {})["question"],
                     build.get("step_rule", "lines"), build.get("step_regex"), "\n")
    logger.warning("PRM '%s' was trained before its record held its step format; scoring with its recipe's: %s",
                   adapter, fmt.to_dict())
    return fmt


def load_prm(adapter: str | Path, *, trust_remote_code: bool = False, device: Any = None, progress: bool = True) -> PRM:
    """Load a trained PRM (base from the adapter's config + the LoRA and score head) and its step format, on
    ``device`` (a setting or a torch.device, through ``pluribus.device``; None: auto), in bf16 where it computes it;
    ``progress``: the bar of a first dequantization of a GGUF base."""
    from peft import PeftModel

    from pluribus.adapter import check_adapter
    from pluribus.models import load_tokenizer, resolve_model
    from pluribus.weights import check_finite_model

    cfg = check_adapter(adapter)
    if cfg.get("task_type") != "TOKEN_CLS":
        kind = f"{cfg.get('peft_type') or 'PEFT'} adapter of task type {cfg.get('task_type') or 'none'}"
        raise PluribusError(f"adapter '{adapter}' is a {kind}, not a PRM (task type TOKEN_CLS, with a score head), "
                            "so it was not made by `pluribus train RECIPE --objective prm`; pass a PRM adapter, or "
                            "train one that way")
    fmt = recorded_step_format(adapter)
    base = cfg.get("base_model_name_or_path") or ""
    base_folder = resolve_model(base, progress=progress)
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(Path(adapter) if has_tokenizer else base_folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target = devices.resolve(device) if device is None or isinstance(device, str) else device
    model = score_head_model(base_folder, dtype=devices.dtype_for(target, "bfloat16"), use_safetensors=True,
                             trust_remote_code=trust_remote_code)
    check_finite_model(model, base_folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model = devices.place(model, target)  # after the adapter: its LoRA and score head go where the base goes
    model.eval()
    return PRM(model, tokenizer, fmt)


# ------------------------------------------------------------------------------------------- metrics


def prm_reading(adapter: str | Path) -> dict[str, Any]:
    """What a PRM's ``training_record.json`` says of it, for eval's report: ``source``, the step format it is asked
    in (``load_prm``: its recorded one, else its recipe's, else the default), and its held-out quality
    (``metrics``: ``prm_metrics``; ``step_metrics``: the ``eval_step_*`` of records from before those)."""
    from pluribus.distill.output import RECORD_NAME

    path = Path(adapter) / RECORD_NAME
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise PluribusError(f"the PRM's training record '{path}' is unreadable ({e}); retrain the PRM") from None
    record = record if isinstance(record, dict) else {}
    out: dict[str, Any] = {"source": f"the step format recorded in {path}" if isinstance(record.get("step_format"), dict)
                           else f"its recipe's prompt and step rule ({path} predates recorded step formats)"
                           if record.get("recipe") else "the default step format (no training record)"}
    out["metrics"] = record.get("prm_metrics") if isinstance(record.get("prm_metrics"), dict) else None
    trained = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    # what train_prm measured on its held-out rows before prm_metrics existed (evaluate_prm's keys)
    out["step_metrics"] = {name: trained[key] for name, key in (("auroc", "eval_step_auroc"), ("f1", "eval_step_f1"),
                           ("accuracy", "eval_step_accuracy"), ("n_steps", "eval_steps")) if key in trained}
    return out


class PRMScorer:
    """A trained PRM that asks exactly what it learned (``load_prm``'s step format, through ``score_solutions``):
    the one scorer of the team's verifier (pluribus.data.verify.Verifier) and of eval's prm-bon.

    Each ``(question, solutions)`` group is scored in fixed chunks of its own, so a score never depends on the
    other problems scored with it."""

    def __init__(self, adapter: str | Path, *, trust_remote_code: bool = False, batch_size: int = 8,
                 device: Any = None) -> None:
        self.name = str(adapter)
        self.prm = load_prm(adapter, trust_remote_code=trust_remote_code, device=device)
        self.batch_size = batch_size

    def steps(self, solution: str) -> list[str]:
        return self.prm.step_format.split(solution)

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[list[float]]]:
        return [score_solutions(self.prm, [question] * len(solutions), solutions, batch_size=self.batch_size)
                if solutions else [] for question, solutions in groups]


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def step_metrics(scores: list[float], labels: list[bool], threshold: float = 0.5) -> dict[str, float | None]:
    """Step accuracy, F1 (positive = a correct step) and AUROC of PRM scores against hard labels."""
    pred = [s > threshold for s in scores]
    tp = sum(p and y for p, y in zip(pred, labels, strict=True))
    fp = sum(p and not y for p, y in zip(pred, labels, strict=True))
    fn = sum(not p and y for p, y in zip(pred, labels, strict=True))
    acc = sum(p == y for p, y in zip(pred, labels, strict=True)) / max(1, len(labels))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"step_accuracy": acc, "step_f1": f1, "step_auroc": auroc(scores, labels), "steps": len(labels)}


def first_error(labels: Sequence[bool]) -> int | None:
    """The index of the first wrong step, None when every step is right."""
    return next((i for i, ok in enumerate(labels) if not ok), None)


def predicted_first_error(scores: Sequence[float], threshold: float) -> int | None:
    """ProcessBench's reading of a PRM: the first step scored at or below ``threshold``, None when none is."""
    return next((i for i, s in enumerate(scores) if s <= threshold), None)


def prm_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]],
                threshold: float = 0.5) -> dict[str, Any]:
    """How good a PRM is on labelled rows (hard labels), the ``prm_metrics`` of its training record.

    - ``auroc``: over all steps, P(a right step scores above a wrong one), ties half (None without both kinds);
    - ``f1`` and ``step_accuracy``: a step is predicted right when its score > ``threshold``; F1 of the right steps;
    - ``first_error_accuracy``: the share of rows where ``predicted_first_error`` (the first step scored
      <= threshold, or none) equals ``first_error`` (the first step labelled wrong, or none): on a row with a wrong
      step it must name exactly that step, on an all-correct row it must score every step above the threshold.
      ``first_error_accuracy_erroneous`` / ``_correct`` are the two kinds of rows apart, and ``processbench_f1``
      their harmonic mean (ProcessBench's score); None where a kind has no row.
    """
    flat_s = [float(x) for row in scores for x in row]
    flat_y = [bool(y) for row in labels for y in row]
    steps = step_metrics(flat_s, flat_y, threshold)
    hits = [(first_error(y) is not None, predicted_first_error(s, threshold) == first_error(y))
            for s, y in zip(scores, labels, strict=True)]

    def share(kind: bool | None) -> float | None:
        chosen = [hit for erroneous, hit in hits if kind is None or erroneous == kind]
        return sum(chosen) / len(chosen) if chosen else None

    wrong, right = share(True), share(False)
    return {"auroc": steps["step_auroc"], "f1": steps["step_f1"], "step_accuracy": steps["step_accuracy"],
            "first_error_accuracy": share(None), "first_error_accuracy_erroneous": wrong,
            "first_error_accuracy_correct": right,
            "processbench_f1": 2 * wrong * right / (wrong + right) if wrong is not None and right is not None
            and wrong + right > 0 else None,
            "n_steps": len(flat_y), "n_rows": len(hits), "n_erroneous_rows": sum(e for e, _ in hits),
            "threshold": threshold}


def evaluate_prm(prm: PRM, rows: Any, threshold: float = 0.5) -> dict[str, Any]:
    """``prm_metrics`` of a PRM on process rows (their prompts and steps as training reads them, hard labels)."""
    scores = score_steps(prm, [(r["prompt"], list(r["completions"])) for r in rows])
    return prm_metrics(scores, [[bool(y) for y in r["labels"]] for r in rows], threshold)


# ------------------------------------------------------------------------------------------ training


def _fills(template: str, prompt: str) -> bool:
    """Whether ``prompt`` is ``template`` with one text in place of every ``{question}``."""
    parts = template.split("{question}")
    if len(parts) < 2:
        return False
    pattern = re.escape(parts[0]) + "(?P<q>.*)" + "".join(re.escape(p) + "(?P=q)" for p in parts[1:-1]) \
        + re.escape(parts[-1])
    return re.fullmatch(pattern, prompt, flags=re.DOTALL) is not None


def _dataset_step_format(dataset: str | Path) -> StepFormat | None:
    stats = Path(dataset) / "stats.json"
    if not stats.is_file():
        return None
    recorded = json.loads(stats.read_text(encoding="utf-8")).get("step_format")
    return StepFormat.from_dict(recorded, f"dataset '{dataset}'") if isinstance(recorded, dict) else None


def training_step_format(dataset: str | Path, rows: Any, recipe: Recipe) -> tuple[StepFormat, str]:
    """The step format a PRM trains with, and where it came from (``dataset`` | ``recipe`` | ``rows``).

    A pluribus process dataset records it (``stats.json``): that one, refused when the recipe's build section
    says otherwise. Any other dataset (a user's, a Hub one, an older build): the recipe's step rule and separator
    (``build``, or its defaults), and the recipe's question prompt as the template when every row's prompt is
    that prompt filled in; else the rows' prompts are taken as the questions themselves (template ``{question}``).
    """
    from pluribus.data.prompts import question_prompt

    build = recipe.build or BuildConfig()
    ours = StepFormat(question_prompt(recipe.build, recipe.team), build.step_rule, build.step_regex,
                      build.step_separator)
    recorded = _dataset_step_format(dataset)
    if recorded is not None:
        theirs = recorded.to_dict()
        differ = [k for k, v in ours.to_dict().items() if theirs[k] != v]
        if recipe.build is not None and differ:
            k = differ[0]
            name = "question prompt (build.prompt_template, else team.prompts.question)" \
                if k == "prompt_template" else f"build.{k}"
            raise PluribusError(f"dataset '{dataset}' was built with {k} {theirs[k]!r}, but the recipe's "
                                f"{name} is {ours.to_dict()[k]!r}; rebuild it (`pluribus build RECIPE "
                                "--overwrite`) or train with the recipe that built it")
        return recorded, "dataset"
    if all(isinstance(p, str) and _fills(ours.prompt_template, p) for p in rows["prompt"]):
        return ours, "recipe"
    return StepFormat("{question}", ours.step_rule, ours.step_regex, ours.step_separator), "rows"


def train_prm(
    recipe: Recipe, *, dataset: str | Path | None = None, out: str | Path | None = None,
    resume: bool | str | None = None, overwrite: bool = False, progress: bool = True,
) -> Path:
    """Train the ``prm`` stage of ``recipe`` on a process dataset and return the adapter folder; ``progress``:
    its rich bar over optimizer steps (off: no bar, ``--no-progress``)."""
    from datasets import Dataset

    cfg: TrainConfig = recipe.require("train")
    ds_path, out = output.default_paths(recipe, "prm", dataset, out)
    output.check_output(out, overwrite=overwrite, resume=resume, cfg=cfg)

    # 1. process rows (a folder, a file or a Hub id), the step format they are read with, a held-out split by problem
    rows = load_rows(ds_path, "process", shepherd_tag=(recipe.build or BuildConfig()).shepherd_tag)
    fmt, fmt_from = training_step_format(ds_path, rows, recipe)
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, recipe.seed)

    # 2. the student as a one-logit token classifier, LoRA + a trainable head (PEFT TOKEN_CLS saves `score`)
    device = devices.training_device(recipe.device, processes=distributed.world_size())
    model, tokenizer = load_student(cfg, head="token-cls", trust_remote_code=recipe.trust_remote_code, seed=recipe.seed,
                                    device=device, progress=progress)
    model = attach_lora(model, cfg, "TOKEN_CLS")
    kernels = patch_kernels(model, cfg.kernels)

    # 3. step-end targets, each step followed by the format's separator
    train_ex, counts = prepare_examples(train_rows, tokenizer, cfg, fmt.step_separator)
    eval_ex = prepare_examples(eval_rows, tokenizer, cfg, fmt.step_separator)[0] if eval_rows is not None else None

    # 4. Trainer with the step BCE loss
    args = training_arguments(cfg, output.checkpoints_dir(out), seed=recipe.seed, has_eval=bool(eval_ex),
                              device=device, prediction_loss_only=True)
    trainer = PRMTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_ex),
        eval_dataset=Dataset.from_list(eval_ex) if eval_ex else None,
        data_collator=PadCollator(tokenizer.pad_token_id), callbacks=callbacks(progress=progress),
    )
    quiet_printer(trainer)
    metrics = train_and_report(trainer, output.resume_checkpoint(out, resume, model))
    if kernels is not None:
        kernels.unpatch()

    # 5. held-out AUROC / F1 / first-error accuracy, then the adapter folder + record (with the step format)
    quality = None
    if eval_rows is not None:
        metrics.update(trainer.evaluate())  # every process: the eval loss is gathered over them
        if distributed.is_main():  # the step metrics go to the record, which rank 0 alone writes
            quality = evaluate_prm(PRM(model, tokenizer, fmt), eval_rows, cfg.prm.threshold)
            metrics.update({k: v for k, v in (("eval_step_accuracy", quality["step_accuracy"]),
                                              ("eval_step_f1", quality["f1"]), ("eval_step_auroc", quality["auroc"]),
                                              ("eval_first_error_accuracy", quality["first_error_accuracy"]))
                            if v is not None})
    counts["eval_rows"] = 0 if eval_rows is None else len(eval_rows)
    counts["step_format_from"] = fmt_from
    record = output.training_record(recipe, cfg, model, ds_path, metrics, counts,
                                    history=trainer.state.log_history)
    record["step_format"] = fmt.to_dict()
    record["prm_metrics"] = quality  # None: no held-out rows (train.eval_fraction 0)
    return output.save_output(trainer.model, tokenizer, out, record, overwrite=True)  # checked above
