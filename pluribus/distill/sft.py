"""Reasoning SFT and trajectory-augmented SFT: LoRA on the assistant tokens of chat data, packed without padding.

Features (each with its ``train.*`` setting):
- loss on assistant tokens only, every assistant turn of a multi-turn conversation, each turn's end-of-turn
  token included and the template's filler after it excluded;
- padding-free packing (``packing``): a micro-batch of ``batch_size`` examples is one row with per-example
  position_ids and varlen attention (``pluribus.distill.packing``), so examples never attend to each other;
- logits only where a label is (``logits_to_keep``): prompt tokens never reach the output head;
- examples longer than ``max_length`` are dropped or truncated (``too_long``), always counted in the record;
- augmented data: corrective traces weigh ``corrective_weight`` in the loss;
- LoRA/QLoRA, bf16, gradient checkpointing, checkpoints + ``--resume``, eval loss, tensorboard, rich progress.

Loss of an optimizer step: ``sum_t w_t * -log p(y_t | x_<t) / N`` over the labelled tokens t of all its
micro-batches, N their count (Trainer's ``num_items_in_batch``), so packing and gradient accumulation do not
change the math.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from pluribus.config import DATASET_OF_OBJECTIVE, Recipe, TrainConfig
from pluribus.device import training_device
from pluribus.distill import distributed, output
from pluribus.distill.data import load_rows, split_eval
from pluribus.distill.loop import callbacks, quiet_printer, train_and_report, training_arguments
from pluribus.distill.packing import PackingCollator, use_varlen_attention
from pluribus.distill.student import attach_lora, load_student, patch_kernels
from pluribus.errors import PluribusError

logger = logging.getLogger("pluribus.distill")


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat rendered by the tokenizer's template; labels are -100 except assistant turns.

    Each assistant turn is located as the text between the template rendered up to it (with the generation
    prompt) and the template rendered through it; tokens whose first character lies there are labelled, up to
    and including the turn's last special token (the end-of-turn token). Raises PluribusError for a template
    that rewrites earlier turns (the spans would be wrong) or a conversation without an assistant turn.
    """
    if not messages or not any(m.get("role") == "assistant" for m in messages):
        raise PluribusError("an SFT conversation has no assistant message; each row needs user -> assistant turns")
    if messages[0].get("role") == "assistant":
        raise PluribusError("an SFT conversation starts with an assistant message; it needs a user turn first")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise PluribusError(
                "the chat template rewrites earlier turns (e.g. strips reasoning), so assistant-only labels "
                "cannot be located; train on single-turn rows or use a template that renders turns verbatim"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = [-100] * len(ids)
    for a, b in spans:
        inside = [j for j, (start, _) in enumerate(offsets) if a <= start < b]
        ends = [j for j in inside if ids[j] in special]
        last = ends[-1] if ends else (inside[-1] if inside else -1)
        for j in inside:
            if j <= last:
                labels[j] = ids[j]
    return ids, labels


def prepare_examples(ds: Any, tokenizer: Any, cfg: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tokenize rows into ``{input_ids, labels, weight}``; too-long rows are dropped or truncated and counted.

    Truncation is said on screen (a warning with the numbers), and refused (PluribusError) when the kept rows
    keep less than ``train.min_kept_labels`` of the labelled tokens they had before it.
    """
    examples, counts = [], {"rows": len(ds), "kept": 0, "too_long": 0, "dropped": 0, "truncated": 0,
                            "labelled_tokens": 0, "tokens": 0}
    has_kind = "kind" in ds.column_names
    labelled_before = 0
    for row in ds:
        ids, labels = tokenize_conversation(tokenizer, row["messages"])
        uncut = sum(x != -100 for x in labels[1:])
        if len(ids) > cfg.max_length:
            counts["too_long"] += 1
            if cfg.too_long == "drop":
                counts["dropped"] += 1
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            # the first token is never a target: at least one label must remain after it
            if all(x == -100 for x in labels[1:]):
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
        weight = cfg.corrective_weight if has_kind and row["kind"] == "corrective" else 1.0
        examples.append({"input_ids": ids, "labels": labels, "weight": weight})
        counts["kept"] += 1
        counts["tokens"] += len(ids)
        counts["labelled_tokens"] += sum(x != -100 for x in labels[1:])
        labelled_before += uncut
    if not examples:
        # under truncate, a row is dropped only when its cut leaves no answer token: truncate is no advice then
        fix = "raise it or set train.too_long=truncate" if cfg.too_long == "drop" else \
            "truncated, they keep no assistant token to learn from (train.too_long=truncate); raise it"
        raise PluribusError(f"no SFT example is left: {counts['dropped']} of {counts['rows']} rows are longer than "
                            f"train.max_length={cfg.max_length}; {fix}")
    if counts["truncated"]:
        share = counts["labelled_tokens"] / max(labelled_before, 1)
        what = (f"train.too_long=truncate cut {counts['truncated']} of {counts['rows']} rows to "
                f"train.max_length={cfg.max_length}: the kept rows keep {counts['labelled_tokens']} of "
                f"{labelled_before} labelled tokens ({share:.1%})")
        if share < cfg.min_kept_labels:
            raise PluribusError(f"{what}, under train.min_kept_labels={cfg.min_kept_labels:g}; raise "
                                "train.max_length, set train.too_long=drop, or lower train.min_kept_labels")
        logger.warning("%s", what)
    return examples, counts


def _chunked_head(model: Any, weights: torch.Tensor, kernels: str) -> Any:
    """The causal LM whose plain ``W h`` head the chunked lm_head loss can replace, or None.

    Not when kernels are off, examples carry different weights (the chunked loss weighs tokens equally), the
    head is not a plain linear map (logit soft-capping or scaling), or a distributed wrapper (FSDP, ZeRO-3)
    owns the forward.
    """
    if kernels == "off" or not bool((weights[weights != 0] == 1).all()):
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the model is a DDP/FSDP/ZeRO wrapper whose forward syncs gradients: running its body directly would
        # skip that; its own head (logits at the labelled positions only) gives the same loss
        _log_head_once("a distributed wrapper owns the forward (several processes)")
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or hasattr(config, "logit_scale"):
        return None
    return base


def _log_head_once(reason: str) -> None:
    if reason not in _HEAD_LOGGED:
        _HEAD_LOGGED.add(reason)
        logger.info("kernels: the chunked lm_head loss is off because %s; the fused LoRA layers still run",
                           reason)


_HEAD_LOGGED: set[str] = set()


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], num_items: torch.Tensor | int | None,
                   kernels: str = "off") -> torch.Tensor:
    """``sum w * nll / num_items`` over labelled positions; the head runs only at those positions.

    With kernels on, the head and loss are ``pluribus.kernels.chunked_lm_head_loss`` (no (tokens, vocab)
    logits held); otherwise the model's own head via ``logits_to_keep``.
    """
    targets, weights = batch["shift_labels"], batch["loss_weights"]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k not in {"labels", "shift_labels", "loss_weights"}}
    denom = num_items if num_items is not None else (targets[:, keep] != -100).sum().clamp(min=1)
    base = _chunked_head(model, weights, kernels)
    if base is not None:
        from pluribus.kernels import chunked_lm_head_loss

        body = getattr(base, base.base_model_prefix)
        hidden = body(**inputs, use_cache=False).last_hidden_state[:, keep]
        head = base.get_output_embeddings()
        total = chunked_lm_head_loss(hidden, head.weight, targets[:, keep], bias=head.bias, reduction="sum",
                                     mode=kernels)
        return total / denom
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # [B, K, V]
    targets, weights = targets[:, keep], weights[:, keep]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    total = (nll * weights.flatten().to(nll.dtype)).sum()
    return total / denom


class PackedSFTTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``causal_lm_loss`` (assistant tokens, weights, packed rows)."""

    def __init__(self, *args: Any, kernels: str = "off", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernels = kernels
        # our loss divides by the step's label count itself, so Trainer must count and not rescale for GA
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = causal_lm_loss(model, inputs, num_items_in_batch, self.kernels)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the labels of every process, and DDP averages the gradients over the
            # processes: scaled by their number, the step's gradient is that of sum(nll) / N over all of them (as
            # Trainer's own compute_loss does). Unscaled, N processes would train at 1/N of the learning rate.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval reports the loss only (token-mean per batch); no logits are gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = causal_lm_loss(model, inputs, None, self.kernels)
        return loss.detach(), None, None


def train_sft(
    recipe: Recipe, *, dataset: str | Path | None = None, out: str | Path | None = None,
    resume: bool | str | None = None, overwrite: bool = False, progress: bool = True,
) -> Path:
    """Train the ``rsft`` or ``augmented`` stage of ``recipe`` and return the adapter folder; ``progress``:
    its rich bar over optimizer steps (off: no bar, ``--no-progress``)."""
    from datasets import Dataset

    cfg: TrainConfig = recipe.require("train")
    if cfg.objective not in {"rsft", "augmented"}:
        raise PluribusError(f"train_sft trains the objectives rsft and augmented, not '{cfg.objective}'")
    ds_path, out = output.default_paths(recipe, cfg.objective, dataset, out)
    output.check_output(out, overwrite=overwrite, resume=resume, cfg=cfg)

    # 1. rows, checked against the dataset kind, and an eval split grouped by problem
    rows = load_rows(ds_path, DATASET_OF_OBJECTIVE[cfg.objective])
    train_rows, eval_rows = split_eval(rows, cfg.eval_fraction, recipe.seed)

    # 2. the student with LoRA (QLoRA when quantized), fused kernels, varlen attention for packed rows, for the
    # device the Trainer places it on (the recipe's device: pluribus.device)
    device = training_device(recipe.device, processes=distributed.world_size())
    model, tokenizer = load_student(cfg, trust_remote_code=recipe.trust_remote_code, seed=recipe.seed, device=device,
                                    progress=progress)
    model = attach_lora(model, cfg, "CAUSAL_LM")
    kernels = patch_kernels(model, cfg.kernels)
    attention = use_varlen_attention(model) if cfg.packing else "sdpa"

    # 3. tokenized examples (assistant-only labels, too-long rows counted)
    train_ex, counts = prepare_examples(train_rows, tokenizer, cfg)
    eval_ex = prepare_examples(eval_rows, tokenizer, cfg)[0] if eval_rows is not None else None

    # 4. the Trainer: packed collator, checkpoints beside the output, rich progress
    args = training_arguments(cfg, output.checkpoints_dir(out), seed=recipe.seed, has_eval=bool(eval_ex),
                              device=device, prediction_loss_only=True)
    trainer = PackedSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_ex),
        eval_dataset=Dataset.from_list(eval_ex) if eval_ex else None,
        data_collator=PackingCollator(tokenizer.pad_token_id, packing=cfg.packing),
        callbacks=callbacks(progress=progress), kernels=cfg.kernels,
    )

    # 5. train (resuming from a checkpoint of the same base), then evaluate once more
    quiet_printer(trainer)
    metrics = train_and_report(trainer, output.resume_checkpoint(out, resume, model))
    if eval_ex:
        metrics.update(trainer.evaluate())
    if kernels is not None:
        kernels.unpatch()

    # 6. the adapter folder + training record
    counts.update(attention=attention, eval_rows=0 if eval_rows is None else len(eval_rows))
    record = output.training_record(recipe, cfg, model, ds_path, metrics, counts,
                                    history=trainer.state.log_history)
    return output.save_output(trainer.model, tokenizer, out, record, overwrite=True)  # checked above
