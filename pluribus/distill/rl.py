"""Process-aware RL: group sampling, PRM + verified-answer rewards, group-relative advantages, clipped PG loss.

One optimizer step (``train.rl.*`` settings):
1. for each of ``prompts_per_step`` prompts, sample G = ``group_size`` solutions from the current policy
   (``backend``: local ``decoding.decode``, or vLLM with the adapter reloaded at every step), seeded by
   (seed, step, problem) (``sample_seeds``);
2. reward ``r_i = agg(PRM step scores of solution i) + answer_weight * [final answer verified]``,
   ``agg`` in min | mean | last (``aggregate``);
3. group-relative advantage ``A_i = (r_i - mean_g r) / (std_g r + 1e-4)`` (population std of the group;
   ``loss_type`` dr_grpo: ``A_i = r_i - mean_g r``, Dr. GRPO's, without the std);
4. loss per completion token t: ``-min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) + beta * KL_t`` with
   ``rho_t = exp(logp_t - logp_old_t)`` and the k3 estimator ``KL_t = exp(q_t) - q_t - 1``,
   ``q_t = logp_ref_t - logp_t``; made one number as ``loss_type`` says (``policy_loss``): grpo, the mean over
   each completion's tokens then over completions; dapo, the mean over every completion token of the
   optimizer step (all its micro-batches and processes: they are sampled before its first); dr_grpo, the sum
   over completion tokens / (completions x ``max_new_tokens``).
   The reference (``reference``) is the policy RL started from: the ``init_adapter``'s weights as loaded (kept
   aside and swapped in for the reference pass: no second model), or the base model with the adapter switched
   off, which is also where a fresh LoRA (B = 0) starts.

Which distribution ``logp`` is. The policy is the distribution the sampler draws from: ``softmax(logits / T)``,
restricted to the top-p nucleus when ``top_p < 1`` (renormalized; the sampled token is always kept), and nothing
else: the local sampler draws with ``decoding.row_sampler`` and never reads a ``generation_config.json``, so
neither transformers' default top_k=50 nor a model's configured warpers or penalties change what is sampled.
``token_logprobs`` applies the same T and top-p, for the policy and the reference alike (as TRL's GRPOTrainer
scales by 1/T). Without this the loss would train a distribution the samples did not come
from, with no importance correction.

Which importance ratio. Each batch of samples is used for ``num_iterations`` optimizer steps (GRPO's, TRL's
``num_iterations``). It is drawn by the very parameters that then compute ``logp`` in its first step
(micro-batches of one step share them), so there ``logp_old = logp.detach()`` is exact, ``rho_t = 1`` in value, the
clip is never active and the gradient, ``-A * grad logp_t`` per token, is the on-policy policy gradient; those
``logp_old`` are kept with the batch, and in its later steps ``rho_t`` measures how far the updates moved the policy
and the clip bounds it. (With ``num_iterations`` 1 the clip can never act, and the recipe refuses a ``clip`` other
than the default.) The data loader repeats each optimizer step's prompts ``num_iterations`` times in a row
(``RepeatedBatches``), so an epoch is ``num_iterations`` passes of optimizer steps over the prompts, as in TRL.
A run resumed between a batch's steps samples that batch's prompts again (the samples are not checkpointed),
so its first step there is on-policy again. ``logp_old`` stays exact only while sampler and trainer share the
distribution above; two limits of that: LoRA dropout > 0 makes the training forward a perturbed policy, and the
vLLM backend samples with its own (bf16) kernels, whose small numerical gap is not corrected.
Reward, accuracy, PRM score, KL and the clipped fraction are logged per step (tensorboard + progress bar).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from pluribus import device as devices
from pluribus.config import Recipe, RLSettings, TrainConfig
from pluribus.data.answers import grade
from pluribus.data.records import Problem
from pluribus.distill import distributed, output
from pluribus.distill.data import load_rows
from pluribus.distill.loop import callbacks, quiet_printer, train_and_report, training_arguments
from pluribus.distill.prm import PRM, aggregate_steps, load_prm, score_solutions
from pluribus.distill.student import attach_lora, base_identity, load_student, patch_kernels
from pluribus.errors import PluribusError

# --------------------------------------------------------------------------------------------- math


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, loss_type: str = "grpo") -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group; rewards ``[prompts, G]`` -> advantages ``[prompts, G]``.

    ``loss_type`` dr_grpo: ``r - mean``, Dr. GRPO's advantage (the std division weighs a group by how much its
    rewards agree, a question-level bias the paper removes)."""
    mean = rewards.mean(dim=1, keepdim=True)
    if loss_type == "dr_grpo":
        return rewards - mean
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip: float = 0.2, ref_logp: torch.Tensor | None = None, beta: float = 0.0, loss_type: str = "grpo",
    max_tokens: int | None = None, tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with an optional k3 KL to the reference (see the module docstring).

    logp, old_logp, ref_logp, mask: ``[N, T]`` (mask 1 on completion tokens); advantages ``[N]``.
    With ``l_it`` the token loss and ``m_it`` the mask, the batch's loss is, by ``loss_type``:
    grpo ``mean_i (sum_t m_it l_it / sum_t m_it)`` (sequence mean: a long completion's tokens weigh less);
    dapo ``sum_it m_it l_it / sum_it m_it`` (token level, TRL's default); dr_grpo ``sum_it m_it l_it / (N *
    max_tokens)`` (Dr. GRPO: a constant denominator, ``max_tokens`` the sampling budget, no length bias).
    ``tokens`` replaces dapo's denominator ``sum_it m_it`` (this batch's count): the trainer passes the optimizer
    step's count over all its micro-batches and processes, per micro-batch, so that the step's loss is DAPO's
    token mean over the whole batch rather than a mean of micro-batch means.
    Returns (loss, stats: the fraction of clipped tokens, and the mean KL where it was computed: with
    ``beta = 0`` there is no reference pass, and a KL of 0 would claim the policy never moved).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        q = ref_logp - logp
        kl = torch.exp(q) - q - 1
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    n = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (n if tokens is None else tokens)
    elif loss_type == "dr_grpo":
        if not max_tokens:
            raise PluribusError("loss_type dr_grpo divides by completions x max_tokens; pass max_tokens (the "
                                "sampling's max_new_tokens)")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_tokens)
    else:
        raise PluribusError(f"unknown loss_type '{loss_type}'; use {', '.join(LOSS_TYPES)}")
    stats = {
        "clip_fraction": float((((unclipped != clipped).to(mask.dtype)) * mask).sum() / n),
    }
    if ref_logp is not None and beta > 0:
        stats["kl"] = float(((kl * mask).sum() / n).detach())
    return loss, stats


def sampling_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      top_p: float = 1.0) -> torch.Tensor:
    """``log p(target)`` under the sampler's distribution: ``log_softmax(logits / T)`` over the top-p nucleus.

    logits ``[..., V]``, targets ``[...]`` -> ``[...]``. The nucleus is transformers' own ``TopPLogitsWarper``
    (the filter ``generate`` applies); the target is kept in it even where a rounding difference between the
    sampler's cached forward and this one moves it just past the edge, so the result is always finite.
    """
    from pluribus.data.decoding import nucleus

    scaled = logits.float() / temperature
    if top_p < 1.0:
        kept = nucleus(scaled, top_p)
        index = targets.unsqueeze(-1)
        scaled = kept.scatter(-1, index, scaled.gather(-1, index))
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(model: Any, ids: torch.Tensor, attention: torch.Tensor, n_completion: int,
                   temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """log p(token) of the last ``n_completion`` tokens of each (left-padded) sequence: ``[N, n_completion]``,
    under the sampling distribution at ``temperature`` and ``top_p`` (``sampling_logprobs``)."""
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    # an index tensor, not the count: see decoding.decode (a strided slice makes a frozen head copy itself per row)
    keep = torch.arange(ids.shape[1] - n_completion - 1, ids.shape[1], device=ids.device)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                   logits_to_keep=keep, use_cache=False).logits[:, :-1]
    return sampling_logprobs(logits, ids[:, -n_completion:], temperature, top_p)


# ------------------------------------------------------------------------------------------- sampling


def sample_seeds(seed: int, step: int, problem_ids: list[str]) -> list[int]:
    """The sampling seed of each prompt's group at an optimizer step: a hash of (seed, step, problem), so a
    group's samples depend neither on the prompts beside it nor on the process that draws it (one process
    with gradient accumulation and several processes sample the same solutions) nor on a resume."""
    return [int(hashlib.sha256(f"{seed}:{step}:{pid}".encode()).hexdigest()[:15], 16) for pid in problem_ids]


class LocalSampler:
    """Sample G completions per prompt from the policy being trained (``decoding.decode``, left padding, one
    batch): each row from softmax(logits / T) over the top-p nucleus, the distribution ``token_logprobs``
    computes, with its own generator, seeded from the prompt's entry of ``seeds`` and its place in the group
    (without ``seeds``, from torch's global RNG), so a group's samples never depend on the prompts beside it."""

    def __init__(self, tokenizer: Any, settings: RLSettings) -> None:
        self.tokenizer, self.settings = tokenizer, settings

    @torch.no_grad()
    def __call__(self, model: Any, prompts: list[str], seeds: list[int] | None = None) -> list[list[int]]:
        from pluribus.data.backends import eos_ids
        from pluribus.data.decoding import decode, row_sampler

        tok, s = self.tokenizer, self.settings
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        tok.padding_side = "right"
        g = s.group_size
        ids = enc["input_ids"].repeat_interleave(g, dim=0)
        mask = enc["attention_mask"].repeat_interleave(g, dim=0)
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        # hashed: torch's CPU generator keeps a seed's low 32 bits, where seed * g + k would collide across prompts
        row_seeds = [int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:15], 16) for seed in seeds
                     for k in range(g)]
        was_training = model.training
        model.eval()
        try:
            # a completion keeps its end-of-turn token: the policy is trained to stop
            return decode(model, ids, mask, max_new_tokens=s.sampling.max_new_tokens, eos=eos_ids(model, tok),
                          pick=row_sampler(row_seeds, s.sampling.temperature, s.sampling.top_p))
        finally:
            model.train(was_training)


class VLLMSampler:
    """Sample with vLLM: the base model loaded once, the current adapter saved and loaded as a LoRA at every call,
    so each step samples from the policy as the last update left it.

    Prompts are the token ids the trainer scores (the tokenizer's chat template, as ``LocalSampler``); each
    request is seeded from (``seed``, call, prompt), its G samples ``seed + g`` (vLLM's rule for ``n``). The
    engine holds the longest prompt plus ``max_new_tokens`` (its ``max_model_len``); settings: ``rl.vllm``.
    """

    def __init__(self, tokenizer: Any, settings: RLSettings, base: str, lora_rank: int, *, prompts: list[str],
                 dtype: str, seed: int = 0, trust_remote_code: bool = False) -> None:
        from pluribus.data import vllm_engine

        self.tokenizer, self.settings, self.seed, self.step = tokenizer, settings, seed, 0
        longest = max(len(self._ids(p)) for p in prompts)
        kwargs = vllm_engine.engine_kwargs(
            settings.vllm, model=base, dtype=dtype, max_model_len=longest + settings.sampling.max_new_tokens,
            lora_rank_needed=lora_rank, trust_remote_code=trust_remote_code, gpu_share=0.5)
        self.engine_kwargs = kwargs
        self.llm = vllm_engine.start_engine(kwargs, what="train.rl.backend=vllm")
        self.tmp = Path(tempfile.mkdtemp(prefix="pluribus-rl-lora-"))

    def _ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, model: Any, prompts: list[str], seeds: list[int] | None = None) -> list[list[int]]:
        import shutil

        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        self.step += 1
        folder = self.tmp / f"step-{self.step}"
        model.save_pretrained(folder, safe_serialization=True)
        s = self.settings
        # top_k=-1 and SamplingParams' other defaults are neutral: the distribution token_logprobs computes
        params = [SamplingParams(n=s.group_size, temperature=s.sampling.temperature, top_p=s.sampling.top_p,
                                 top_k=-1, max_tokens=s.sampling.max_new_tokens,
                                 seed=(seeds[i] if seeds is not None
                                       else self.seed * 1_000_003 + self.step * 10_007 + i * s.group_size) % 2**31)
                  for i in range(len(prompts))]
        # a new id each call: vLLM caches adapters by id, and the weights changed
        outs = self.llm.generate([{"prompt_token_ids": self._ids(p)} for p in prompts], params,
                                 lora_request=LoRARequest(f"policy-{self.step}", self.step, str(folder)),
                                 use_tqdm=False)
        shutil.rmtree(self.tmp / f"step-{self.step - 1}", ignore_errors=True)  # loaded, no longer needed
        return [list(c.token_ids) for o in outs for c in o.outputs]

    def close(self) -> None:
        import shutil

        from pluribus.data.vllm_engine import stop_engine

        if self.llm is not None:
            stop_engine(self.llm)
        self.llm = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- trainer


class RepeatedBatches(torch.utils.data.Sampler):
    """Prompt indices in a seeded random order per epoch, each chunk of ``chunk`` indices (one optimizer step's
    prompts over every process and micro-batch) given ``repeats`` times in a row: the ``num_iterations`` steps
    on one sampled batch. The order is padded by wrapping around to whole chunks (as torch's DistributedSampler
    pads), so every step has a full batch and every repetition is the same prompts."""

    def __init__(self, n: int, chunk: int, repeats: int, seed: int) -> None:
        self.n, self.chunk, self.repeats, self.seed, self.epoch = n, chunk, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.chunk) * self.chunk * self.repeats

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        whole = -(-self.n // self.chunk) * self.chunk
        order = (order * (whole // self.n + 1))[:whole]
        for i in range(0, whole, self.chunk):
            for _ in range(self.repeats):
                yield from order[i:i + self.chunk]


class GroupRLTrainer(Trainer):
    """``transformers.Trainer`` whose step samples groups, scores them and applies ``policy_loss``.

    A batch is ``{prompts, answers, problem_ids, metas}``; ``verify(text, answer) -> bool`` checks a final answer;
    ``verify=None`` grades as the debate and the builders do (``answers.grade``, with each problem's meta: the
    choices of a multiple-choice task, its answer form).
    """

    def __init__(self, *args: Any, sampler: Callable, prm: PRM, verify: Callable[[str, str], bool] | None,
                 settings: RLSettings, reference_weights: dict[str, torch.Tensor] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.prm, self.verify, self.settings = sampler, prm, verify, settings
        # the KL reference's adapter weights (the starting policy's), swapped in for its pass; None: adapter off
        self.reference_weights = reference_weights
        self.model_accepts_loss_kwargs = False
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._batches: dict[tuple, dict[str, Any]] = {}  # this round's sampled batches (reused num_iterations steps)
        self._step_tokens: float | None = None  # dapo: the optimizer step's completion tokens per micro-batch

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.settings.num_iterations == 1:
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        chunk = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return RepeatedBatches(len(ds), chunk, self.settings.num_iterations, self.args.seed)

    def reference_logprobs(self, policy: Any, ids: torch.Tensor, attention: torch.Tensor,
                           n_completion: int) -> torch.Tensor:
        """``token_logprobs`` under the KL's reference: the base (adapter off), or the starting adapter's weights
        swapped in place of the trained ones for this pass (the storage is swapped, nothing is copied)."""
        s = self.settings
        with torch.no_grad():
            if self.reference_weights is None:
                with policy.disable_adapter():
                    return token_logprobs(policy, ids, attention, n_completion, s.sampling.temperature,
                                          s.sampling.top_p)
            params = dict(policy.named_parameters())
            live: dict[str, torch.Tensor] = {}
            was_training = policy.training
            policy.eval()  # the starting policy itself, without LoRA dropout (as the adapter-off pass)
            try:
                for name, weight in self.reference_weights.items():
                    live[name], params[name].data = params[name].data, weight
                return token_logprobs(policy, ids, attention, n_completion, s.sampling.temperature, s.sampling.top_p)
            finally:
                for name, data in live.items():
                    params[name].data = data
                policy.train(was_training)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.settings
        device = next(model.parameters()).device
        # under DDP ``model`` is the wrapper: its forward syncs gradients; sampling and the reference need the policy
        policy = distributed.unwrap(model)
        batch = self._batch(policy, inputs, device)
        logp = token_logprobs(model, batch["ids"], batch["attention"], batch["width"], s.sampling.temperature,
                              s.sampling.top_p)
        if "old_logp" not in batch:
            # the batch's first step: the samples came from these very parameters (sampled in this optimizer step,
            # before any update): see "Which importance ratio" in the module docstring
            batch["old_logp"] = logp.detach()
        loss, stats = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], s.clip,
                                  batch["ref_logp"], s.kl, s.loss_type, s.sampling.max_new_tokens, self._step_tokens)

        # 5. per-step statistics for the logs
        for k, v in {**batch["stats"], **stats}.items():
            self._stats[k].append(v)
        return (loss, None) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The optimizer step's micro-batches; for dapo also sampled now, to count the step's completion tokens
        over every micro-batch and process: DAPO's denominator (``policy_loss``'s ``tokens``)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_tokens = None
        if self.settings.loss_type == "dapo" and batch_samples:
            policy = distributed.unwrap(self.model)
            at = next(policy.parameters()).device
            with self.compute_loss_context_manager():  # as compute_loss samples (its autocast): the same numerics
                count = torch.tensor(sum(float(self._batch(policy, inputs, at)["mask"].sum())
                                         for inputs in batch_samples), device=at)
            if self.args.world_size > 1:
                count = self.accelerator.gather(count.reshape(1)).sum()
            # the Trainer divides each micro-batch's loss by their number and DDP averages the processes' gradients
            self._step_tokens = max(float(count), 1.0) / (len(batch_samples) * self.args.world_size)
        return batch_samples, num_items

    def _batch(self, policy: Any, inputs: dict[str, Any], device: Any) -> dict[str, Any]:
        """The sampled batch of ``inputs``' prompts: drawn at the first of its num_iterations steps (:meth:`_sample`)
        and kept, with its logp_old, for the others."""
        key = (self.state.global_step // self.settings.num_iterations, tuple(inputs["problem_ids"]))
        batch = self._batches.get(key)
        if batch is None:
            batch = self._sample(policy, inputs, device)
            self._batches = {k: v for k, v in self._batches.items() if k[0] == key[0]}  # older rounds are done
            self._batches[key] = batch
        return batch

    def _sample(self, policy: Any, inputs: dict[str, Any], device: Any) -> dict[str, Any]:
        """Steps 1-4 of the module docstring for one batch of prompts: the sequences, their completion mask,
        advantages, reference log-probs (where the KL needs them) and the batch's reward statistics."""
        tok, s = self.processing_class, self.settings
        prompts, answers = inputs["prompts"], inputs["answers"]

        # 1. G samples per prompt from the current policy, seeded per (step, problem)
        seeds = sample_seeds(self.args.seed, self.state.global_step, inputs["problem_ids"])
        completions = self.sampler(policy, prompts, seeds)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        group_prompts = [p for p in prompts for _ in range(s.group_size)]
        group_answers = [a for a in answers for _ in range(s.group_size)]

        # 2. rewards: aggregated PRM step scores + weighted verified answer
        # the prompts are the process rows' (already the PRM's prompt); steps split by the PRM's own step rule
        step_scores = score_solutions(self.prm, group_prompts, texts, rendered=True)
        prm_part = torch.tensor([aggregate_steps(sc, s.aggregate) for sc in step_scores])
        if self.verify is None:
            metas = [json.loads(m) for m in inputs.get("metas") or ["{}"] * len(prompts)]
            group_metas = [m for m in metas for _ in range(s.group_size)]
            correct = torch.tensor([float(grade(t, Problem("rl", p, a, meta=m)).correct) for t, p, a, m
                                    in zip(texts, group_prompts, group_answers, group_metas, strict=True)])
        else:
            correct = torch.tensor([float(self.verify(t, a)) for t, a in zip(texts, group_answers, strict=True)])
        rewards = (prm_part + s.answer_weight * correct).view(len(prompts), s.group_size)

        # 3. group-relative advantages
        advantages = group_advantages(rewards, loss_type=s.loss_type).flatten().to(device)

        # 4. sequences = left-padded prompt + right-padded completion; log-probs of the completion tokens
        heads = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                 for p in group_prompts]
        width_p, width_c = max(map(len, heads)), max(1, max(map(len, completions)))
        ids = torch.full((len(heads), width_p + width_c), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, (h, c) in enumerate(zip(heads, completions, strict=True)):
            ids[r, width_p - len(h): width_p] = torch.tensor(h)
            ids[r, width_p: width_p + len(c)] = torch.tensor(c, dtype=torch.long)
            attention[r, width_p - len(h): width_p + len(c)] = 1
        ids, attention = ids.to(device), attention.to(device)
        mask = attention[:, width_p:]
        ref_logp = self.reference_logprobs(policy, ids, attention, width_c) if s.kl > 0 else None
        stats = {"reward": float(rewards.mean()), "accuracy": float(correct.mean()),
                 "prm_score": float(prm_part.mean()), "completion_tokens": float(mask.sum(dim=1).float().mean())}
        return {"ids": ids, "attention": attention, "width": width_c, "mask": mask, "advantages": advantages,
                "ref_logp": ref_logp, "stats": stats}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._stats and "loss" in logs:
            names = sorted(self._stats)
            means = torch.tensor([sum(self._stats[k]) / len(self._stats[k]) for k in names])
            if self.accelerator.num_processes > 1:
                # every process logs at the same steps (Trainer gathers the loss there); each drew its own
                # prompts, so a figure is the mean over all of them, not rank 0's share
                means = self.accelerator.reduce(means.to(self.accelerator.device), reduction="mean").cpu()
            logs.update({k: float(v) for k, v in zip(names, means, strict=True)})
            self._stats.clear()
        super().log(logs, *args, **kwargs)


def _policy_rank(model: Any) -> int:
    """The largest LoRA rank of the policy's adapter (a continued ``init_adapter`` keeps its own rank)."""
    cfg = model.peft_config[model.active_adapter]
    return max([int(cfg.r), *(int(v) for v in (getattr(cfg, "rank_pattern", None) or {}).values())])


def default_verify(text: str, answer: str) -> bool:
    """Whether ``text``'s final answer equals ``answer`` (``pluribus.data.answers.grade``, no task meta)."""
    return grade(text, Problem("rl", "", answer)).correct


def rl_prompts(rows: Any, recipe: Recipe) -> list[dict[str, str]]:
    """Unique ``{prompt, answer, problem_id, meta}`` from process rows; gold answers from a column or the task.

    ``meta`` (JSON) carries what grading needs from the task's problem: a multiple-choice task's ``choices``
    (its gold is a letter, which a reply names only among them) and an ``answer_form``.
    """
    gold: dict[str, str] = {}
    metas: dict[str, str] = {}
    for key in ("answer", "gold"):
        if key in rows.column_names:
            gold = {r["problem_id"]: str(r[key]) for r in rows}
            break
    if not gold:
        if recipe.task is None:
            raise PluribusError("the rl stage needs gold answers: a dataset column 'answer' or a recipe 'task' section")
        from pluribus.data.tasks import load_problems

        problems = load_problems(recipe.task)
        gold = {p.id: p.answer for p in problems}
        metas = {p.id: json.dumps({k: p.meta[k] for k in ("choices", "answer_form") if k in p.meta})
                 for p in problems}
    seen, out = set(), []
    for r in rows:
        pid = r["problem_id"]
        if pid in seen:
            continue
        if pid not in gold:
            raise PluribusError(f"rl: problem '{pid}' of the dataset has no gold answer in the recipe's task")
        prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        seen.add(pid)
        out.append({"prompt": prompt, "answer": gold[pid], "problem_id": pid, "meta": metas.get(pid, "{}")})
    return out


def collate_prompts(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    return {"prompts": [r["prompt"] for r in rows], "answers": [r["answer"] for r in rows],
            "problem_ids": [r["problem_id"] for r in rows], "metas": [r.get("meta", "{}") for r in rows]}


def _kl_reference(model: Any, cfg: TrainConfig) -> tuple[dict[str, Any] | None, str]:
    """(the KL's reference weights, None for the base; what the reference is, for the record): the starting
    policy is the init_adapter's weights as loaded (a fresh LoRA starts as the base)."""
    s = cfg.rl
    if s.kl > 0 and s.reference == "start" and cfg.init_adapter:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return weights, f"init_adapter {cfg.init_adapter}"
    return None, "none (kl 0)" if s.kl == 0 else "base"


def _sampler(recipe: Recipe, cfg: TrainConfig, model: Any, tokenizer: Any, prompts: list[dict[str, Any]]) -> Any:
    """The sampler of the current policy: a vLLM engine (``train.rl.backend=vllm``) or the policy itself."""
    s = cfg.rl
    if s.backend == "vllm":
        return VLLMSampler(tokenizer, s, str(base_identity(model)), _policy_rank(model),
                           prompts=[p["prompt"] for p in prompts], dtype="bfloat16" if cfg.bf16 else "float32",
                           seed=recipe.seed, trust_remote_code=recipe.trust_remote_code)
    return LocalSampler(tokenizer, s)


def _final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged reward / accuracy / KL / PRM score / clip fraction of this training, as ``final_*``."""
    logged = [h for h in history if "reward" in h]
    if not logged:
        return {}
    return {f"final_{k}": logged[-1][k] for k in ("reward", "accuracy", "kl", "prm_score", "clip_fraction")
            if k in logged[-1]}  # kl only where it was computed (train.rl.kl > 0)


def train_rl(
    recipe: Recipe, *, dataset: str | Path | None = None, out: str | Path | None = None,
    resume: bool | str | None = None, verify: Callable[[str, str], bool] | None = None,
    overwrite: bool = False, progress: bool = True,
) -> Path:
    """Train the ``rl`` stage of ``recipe`` and return the adapter folder; ``progress``: its rich bar over
    optimizer steps (off: no bar, ``--no-progress``)."""
    from datasets import Dataset

    cfg: TrainConfig = recipe.require("train")
    s = cfg.rl
    ds_path, out = output.default_paths(recipe, "rl", dataset, out)
    output.check_output(out, overwrite=overwrite, resume=resume, cfg=cfg)
    prm_path = Path(s.prm) if s.prm else recipe.layout.adapter("prm")

    # 1. prompts with gold answers
    prompts = rl_prompts(load_rows(ds_path, "process"), recipe)

    # 2. the policy (LoRA, optionally continuing an SFT adapter), for the device the Trainer places it on
    device = devices.training_device(recipe.device, processes=distributed.world_size())
    model, tokenizer = load_student(cfg, trust_remote_code=recipe.trust_remote_code, seed=recipe.seed, device=device,
                                    progress=progress)
    model = attach_lora(model, cfg, "CAUSAL_LM")
    kernels = patch_kernels(model, cfg.kernels)
    args = training_arguments(cfg, output.checkpoints_dir(out), seed=recipe.seed, has_eval=False, device=device,
                              per_device_train_batch_size=s.prompts_per_step)
    # the PRM (its own base + adapter) scores every sample beside the policy: on the Trainer's device (this
    # process's GPU under several) unless train.rl.prm_device names another
    prm = load_prm(prm_path, trust_remote_code=recipe.trust_remote_code, progress=progress,
                   device=devices.resolve(s.prm_device) if s.prm_device else args.device)
    reference_weights, kl_reference = _kl_reference(model, cfg)

    # 3. the sampler of the current policy
    sampler = _sampler(recipe, cfg, model, tokenizer, prompts)

    # 4. Trainer over prompts: one batch = prompts_per_step prompts, G samples each
    trainer = GroupRLTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(prompts), data_collator=collate_prompts,
        processing_class=tokenizer, callbacks=callbacks(progress=progress),
        sampler=sampler, prm=prm, verify=verify, settings=s, reference_weights=reference_weights,
    )
    quiet_printer(trainer)
    history_start = len(trainer.state.log_history)
    try:
        metrics = train_and_report(trainer, output.resume_checkpoint(out, resume, model))
    finally:
        if hasattr(sampler, "close"):
            sampler.close()
    if kernels is not None:
        kernels.unpatch()

    # 5. the adapter folder + record (final metrics: the last logged reward/accuracy/KL)
    metrics.update(_final_metrics(trainer.state.log_history[history_start:]))
    record = output.training_record(recipe, cfg, model, ds_path, metrics,
                                    {"prompts": len(prompts), "prm": str(prm_path), "kl_reference": kl_reference,
                                     "num_iterations": s.num_iterations, "loss_type": s.loss_type,
                                     "prm_ran_on": devices.where(prm.model)},
                                    history=trainer.state.log_history)
    return output.save_output(trainer.model, tokenizer, out, record, overwrite=True)  # checked above
