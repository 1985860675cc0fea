"""Process reward model: LoRA + a one-logit token-classification head read at the last token of each step.

A row ``{prompt, completions: [step, ...], labels: [bool, ...], scores: [float, ...]}`` is rendered as the chat
prompt followed by the steps, one per line; the head's logit at each step's last token (its newline) is trained
with binary cross-entropy against the step's label (``train.prm.labels``: hard = the bool, soft = the
Monte-Carlo score in [0, 1]); every other position is ignored. ``sigmoid(logit)`` is the step's score.

``score_steps`` scores the steps of solutions with a trained PRM (used by ``pluribus score``, the RL stage and
eval); ``PRMScorer`` asks it solutions as it was trained (its recorded prompt and step rule: ``prm_reading``), for
the team's verifier and eval's prm-bon; ``evaluate_prm`` gives held-out step accuracy, F1 and AUROC against the
hard labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from pluribus.config import Recipe, TrainConfig
from pluribus.distill import distributed, output
from pluribus.distill.data import load_rows, split_eval
from pluribus.distill.loop import callbacks, quiet_printer, train_and_report, training_arguments
from pluribus.distill.student import attach_lora, load_student, patch_kernels, score_head_model
from pluribus.errors import PluribusError

IGNORE = -100.0


def step_texts(solution: str, rule: str = "lines", pattern: str | None = None) -> list[str]:
    """The steps of a free-text solution, split as the process builder splits them (``build.step_rule``)."""
    from pluribus.data.builders.steps import split_steps

    return [step.text for step in split_steps(solution, rule, pattern)]


def _prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_steps(tokenizer: Any, prompt: str | list[dict[str, str]], steps: list[str]) -> tuple[list[int], list[int]]:
    """(input_ids, positions): the templated prompt, then each step + newline; positions = each step's last token.

    Steps are tokenized one by one so every step ends on its own token, whatever the tokenizer merges.
    """
    head = tokenizer.apply_chat_template(_prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    positions = []
    for step in steps:
        ids = ids + tokenizer(step.strip() + "\n", add_special_tokens=False)["input_ids"]
        positions.append(len(ids) - 1)
    return ids, positions


def prepare_examples(ds: Any, tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenize process rows into ``{input_ids, labels}`` (float targets at step ends, IGNORE elsewhere)."""
    examples, counts = [], {"rows": len(ds), "kept": 0, "too_long": 0, "dropped": 0, "truncated": 0, "steps": 0}
    for i, row in enumerate(ds):
        steps, hard, soft = row["completions"], row["labels"], row["scores"]
        if not (len(steps) == len(hard) == len(soft)) or not steps:
            raise PluribusError(
                f"process row {i} (problem {row['problem_id']}) has {len(steps)} steps, {len(hard)} labels and "
                f"{len(soft)} scores; each step needs one label and one score"
            )
        targets = [float(x) for x in (soft if cfg.prm.labels == "soft" else hard)]
        ids, positions = encode_steps(tokenizer, row["prompt"], steps)
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


@torch.no_grad()
def score_steps(
    model: Any, tokenizer: Any, items: list[tuple[str | list[dict[str, str]], list[str]]], batch_size: int = 8,
) -> list[list[float]]:
    """For each ``(prompt, steps)``, the PRM's score ``sigmoid(logit)`` at each step's last token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(items), batch_size):
        chunk = [encode_steps(tokenizer, p, s) for p, s in items[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (row, _) in enumerate(chunk):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.squeeze(-1).float()
        probs = torch.sigmoid(logits).cpu()
        out.extend([probs[r, pos].tolist() for r, (_, pos) in enumerate(chunk)])
    model.train(was_training)
    return out


def load_prm(adapter: str | Path, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a trained PRM (base from the adapter's config + the LoRA and score head) for ``score_steps``."""
    import torch
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
    base = cfg.get("base_model_name_or_path") or ""
    base_folder = resolve_model(base)
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(Path(adapter) if has_tokenizer else base_folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = score_head_model(base_folder, dtype=torch.bfloat16, use_safetensors=True,
                                    trust_remote_code=trust_remote_code)
    check_finite_model(model, base_folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.eval()
    return model, tokenizer


def prm_reading(adapter: str | Path) -> dict[str, Any]:
    """How a PRM was trained to read a solution, from its ``training_record.json``: ``prompt`` (the question
    template its rows' user turn filled: the recorded recipe's ``build.prompt_template``, else its team's
    ``question`` prompt), ``step_rule`` and ``step_regex`` (``build.step_rule``/``step_regex``). Where the record
    does not say (no record, or a recipe without build and team sections), as ``pluribus score`` asked before:
    the bare question, steps by lines. ``source`` says which it was."""
    import json

    from pluribus.distill.output import RECORD_NAME

    path = Path(adapter) / RECORD_NAME
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise PluribusError(f"the PRM's training record '{path}' is unreadable ({e}); retrain the PRM") from None
    recipe = record.get("recipe") if isinstance(record, dict) else None
    build = (recipe or {}).get("build") or {}
    team = (recipe or {}).get("team")
    out: dict[str, Any] = {"prompt": "{question}", "step_rule": "lines", "step_regex": None,
                           "source": "default (the training record names no prompt or step rule)"}
    if build or team is not None:
        from pluribus.data.prompts import DEFAULT_PROMPTS

        prompt = build.get("prompt_template") or ((team or {}).get("prompts") or {}).get("question") \
            or DEFAULT_PROMPTS["question"]
        out = {"prompt": prompt, "step_rule": build.get("step_rule") or "lines", "step_regex": build.get("step_regex"),
               "source": f"training record {path}"}
    record = record if isinstance(record, dict) else {}
    out["metrics"] = record.get("prm_metrics") if isinstance(record.get("prm_metrics"), dict) else None
    trained = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    # what train_prm measured on its held-out rows before prm_metrics existed (evaluate_prm's keys)
    out["step_metrics"] = {name: trained[key] for name, key in (("auroc", "eval_step_auroc"), ("f1", "eval_step_f1"),
                           ("accuracy", "eval_step_accuracy"), ("n_steps", "eval_steps")) if key in trained}
    return out


class PRMScorer:
    """A trained PRM that asks exactly what it learned: the question in its training prompt, the solution split
    by its recorded step rule, each step + newline (``encode_steps``), read by ``score_steps``. The one scorer of
    the team's verifier (pluribus.data.verify.Verifier) and of eval's prm-bon.

    Each ``(question, solutions)`` group is scored in fixed chunks of its own, so a score never depends on the
    other problems scored with it."""

    def __init__(self, adapter: str | Path, *, trust_remote_code: bool = False, batch_size: int = 8) -> None:
        self.name = str(adapter)
        self.reading = prm_reading(adapter)
        self.model, self.tokenizer = load_prm(adapter, trust_remote_code=trust_remote_code)
        self.batch_size = batch_size

    def steps(self, solution: str) -> list[str]:
        return step_texts(solution, self.reading["step_rule"], self.reading["step_regex"])

    def prompt(self, question: str) -> str:
        return self.reading["prompt"].replace("{question}", question)

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[list[float]]]:
        out = []
        for question, solutions in groups:
            split = [self.steps(s) for s in solutions]
            items = [(self.prompt(question), steps) for steps in split if steps]
            scored = iter(score_steps(self.model, self.tokenizer, items, self.batch_size) if items else [])
            out.append([next(scored) if steps else [] for steps in split])  # no steps: nothing to score
        return out


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


def evaluate_prm(model: Any, tokenizer: Any, rows: Any, threshold: float = 0.5) -> dict[str, float | None]:
    """Held-out step metrics of a PRM on process rows (hard labels)."""
    items = [(r["prompt"], list(r["completions"])) for r in rows]
    scores = score_steps(model, tokenizer, items)
    flat_scores = [s for row in scores for s in row]
    flat_labels = [bool(y) for r in rows for y in r["labels"]]
    return step_metrics(flat_scores, flat_labels, threshold)


# ------------------------------------------------------------------------------------------ training


def train_prm(
    recipe: Recipe, *, dataset: str | Path | None = None, out: str | Path | None = None,
    resume: bool | str | None = None, overwrite: bool = False,
) -> Path:
    """Train the ``prm`` stage of ``recipe`` on a process dataset and return the adapter folder."""
    from datasets import Dataset

    cfg: TrainConfig = recipe.require("train")
    ds_path, out = output.default_paths(recipe, "prm", dataset, out)
    output.check_output(out, overwrite=overwrite, resume=resume, cfg=cfg)

    # 1. process rows and a held-out split grouped by problem
    rows = load_rows(ds_path, "process")
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, recipe.seed)

    # 2. the student as a one-logit token classifier, LoRA + a trainable head (PEFT TOKEN_CLS saves `score`)
    model, tokenizer = load_student(cfg, head="token-cls", trust_remote_code=recipe.trust_remote_code, seed=recipe.seed)
    model = attach_lora(model, cfg, "TOKEN_CLS")
    kernels = patch_kernels(model, cfg.kernels)

    # 3. step-end targets
    train_ex, counts = prepare_examples(train_rows, tokenizer, cfg)
    eval_ex = prepare_examples(eval_rows, tokenizer, cfg)[0] if eval_rows is not None else None

    # 4. Trainer with the step BCE loss
    args = training_arguments(cfg, output.checkpoints_dir(out), seed=recipe.seed, has_eval=bool(eval_ex),
                                     prediction_loss_only=True)
    trainer = PRMTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_ex),
        eval_dataset=Dataset.from_list(eval_ex) if eval_ex else None,
        data_collator=PadCollator(tokenizer.pad_token_id), callbacks=callbacks(),
    )
    quiet_printer(trainer)
    metrics = train_and_report(trainer, output.resume_checkpoint(out, resume, model))
    if kernels is not None:
        kernels.unpatch()

    # 5. held-out step accuracy / F1 / AUROC, then the adapter folder + record
    if eval_rows is not None:
        metrics.update(trainer.evaluate())  # every process: the eval loss is gathered over them
        if distributed.is_main():  # the step metrics go to the record, which rank 0 alone writes
            metrics.update({f"eval_{k}": v for k, v in evaluate_prm(model, tokenizer, eval_rows,
                                                                    cfg.prm.threshold).items() if v is not None})
    counts["eval_rows"] = 0 if eval_rows is None else len(eval_rows)
    record = output.training_record(recipe, cfg, model, ds_path, metrics, counts)
    return output.save_output(trainer.model, tokenizer, out, record, overwrite=True)  # checked above
