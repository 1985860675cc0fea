"""The train section: one LoRA training (an expert) and its LoRA, PRM and RL settings, or several as typed expert entries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pluribus.config.agents import SamplingConfig, VLLMSettings
from pluribus.config.base import (
    Entry,
    Section,
    _deep_merge,
    _describe_error,
    _device,
    _folder_name,
    _renamed,
    copy_resolving,
)
from pluribus.errors import RecipeError


class LoraSettings(Section):
    """The adapter trained on the frozen (optionally 4-bit) student: ``W0 x + (alpha/r) B A x``."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    rslora: bool = Field(False, description="Rank-stabilized LoRA scaling alpha/sqrt(r).")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module name suffixes."
    )
    quantize: Literal["none", "nf4"] = Field("none", description="nf4: load the base in 4-bit NF4 (QLoRA).")


class PRMSettings(Section):
    """The process reward model: a token-classification head read at the last token of each step."""

    labels: Literal["hard", "soft"] = Field("hard", description="hard: the step's bool label; soft: its MC score.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Score above which a step counts as correct.")


_RL_RENAMES = {k: f"sampling.{k}" for k in ("temperature", "top_p", "max_new_tokens")}  # before train.rl.sampling


class RLSettings(Section):
    """Process-aware RL: G samples per prompt, PRM + verified-answer reward, group-relative advantages."""

    group_size: int = Field(4, ge=2, description="Solutions G sampled per prompt.")
    prompts_per_step: int = Field(2, ge=1, description="Prompts per device per micro-step (each sampled G times): "
                                  "an rl training's batch, in place of train.batch_size, which rl does not read (nor "
                                  "eval_fraction, max_length, too_long, packing: rl holds out no rows, and a "
                                  "sequence is a prompt plus at most sampling.max_new_tokens; an rl entry of "
                                  "train.experts that sets one of them is refused).")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Sampler of the current policy.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0), description="How the policy samples: temperature "
        "(> 0; default 1.0), top_p, max_new_tokens. Its draws follow the training seed (the recipe's seed).")
    prm: str | None = Field(None, description="The PRM: an earlier expert's name or an adapter folder (default: "
                            "the recipe's prm expert).")
    aggregate: Literal["min", "mean", "product", "last"] = Field(
        "min", description="How step scores become one reward.")
    answer_weight: float = Field(1.0, ge=0.0, description="Reward weight of the verified final answer.")
    num_iterations: int = Field(
        1, ge=1, description="Optimizer steps per sampled batch (GRPO's num_iterations): the first step's policy "
        "is the sampler's, so the ratio is 1 there; from the second on the clip bounds how far it moves.")
    clip: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range epsilon of the ratio; it acts only with "
                        "num_iterations > 1 (with one step per batch the ratio is always 1, so another value is "
                        "refused).")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo", description="How token losses become the batch's loss: grpo: mean over each completion's tokens, "
        "then over completions; dapo: sum over every completion token of the optimizer step (all micro-batches and devices) / their count (TRL's default); dr_grpo: "
        "sum over every completion token / (completions x sampling.max_new_tokens), no length bias, and advantages "
        "r - mean of the group, not divided by its std (Dr. GRPO's).")
    kl: float = Field(0.0, ge=0.0, description="Weight beta of the k3 KL to the reference policy (0: no reference "
                      "pass).")
    reference: Literal["start", "base"] = Field(
        "start", description="The KL's reference: start, the policy RL starts from (the init_adapter's weights as "
        "loaded when RL continues one, else the base model); base, the base model with the adapter switched off. "
        "The training record says which. Needs kl > 0.")
    vllm: VLLMSettings | None = Field(
        None, description="backend vllm: the sampler's engine settings; None: defaults that work on CPU and GPU.")
    prm_device: str | None = Field(
        None, description="Where the PRM that scores the samples runs (auto, cpu, cuda, cuda:N); None: on the "
        "policy's device.")

    _prm_device_valid = field_validator("prm_device")(_device)

    @model_validator(mode="after")
    def _engine_settings_need_vllm(self) -> RLSettings:
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"rl.vllm engine settings are set but rl.backend is {self.backend}; remove them "
                             "or set rl.backend: vllm")
        return self

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        data = _renamed(data, "train.rl", _RL_RENAMES)
        if isinstance(data, dict) and isinstance(data.get("sampling"), dict) and "temperature" not in data["sampling"]:
            data = {**data, "sampling": {**data["sampling"], "temperature": 1.0}}  # RL's default, not greedy's
        return data

    @field_validator("sampling")
    @classmethod
    def _sampled(cls, v: SamplingConfig) -> SamplingConfig:
        if v.temperature <= 0:
            raise ValueError("temperature must be > 0: RL learns from a group of different samples per prompt")
        if v.seed is not None:
            raise ValueError("seed has no effect here: RL's samples follow the training seed (the recipe's seed)")
        return v


OBJECTIVES = ("rsft", "augmented", "prm", "rl")
# The dataset kind each training objective reads (DESIGN.md, "Records").
DATASET_OF_OBJECTIVE = {"rsft": "rsft", "augmented": "augmented", "prm": "process", "rl": "process"}


# transformers' reporting integrations (integration_utils.INTEGRATION_TO_CALLBACK of 5.24), written out so a
# recipe validates without importing transformers; tests/test_config_trackers.py fails when the installed list differs
REPORT_TO = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
             "neptune", "swanlab", "tensorboard", "trackio", "wandb")


# what an rl training does not read (pluribus.distill.rl): its batch is rl.prompts_per_step prompts x group_size,
# it holds out no rows and a sequence is a prompt plus at most rl.sampling.max_new_tokens
_RL_UNREAD = frozenset({"batch_size", "eval_fraction", "max_length", "packing", "too_long"})
_RL_INSTEAD = ("its batch is rl.prompts_per_step prompts, each sampled rl.group_size times; it holds out no rows; a "
               "sequence is its prompt plus at most rl.sampling.max_new_tokens")


class ExpertEntry(Entry):
    """One entry of ``train.experts`` as written: the settings of one training that differ from the section's.

    It dumps as written (the run's recipe.yaml, and every hash of the train section, are those of the YAML); the
    section resolves it over its shared settings into one ``TrainConfig``, once (``TrainConfig.trainings``).
    """

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping of settings (those of one training that differ from the shared "
                             f"ones), got {type(data).__name__}")
        if "experts" in data:
            raise ValueError("an expert cannot have experts of its own")
        return data


class TrainConfig(Section):
    """One LoRA/QLoRA training (an expert), or the shared settings of several (``experts``).

    The output is a PEFT adapter + training_record.json in ``<run>/adapters/<name>/``. With ``experts``, each
    entry overrides these settings for one training (nested sections merge key by key); the trainings run in
    order, so an entry's ``init_adapter`` or ``rl.prm`` may name an earlier entry.
    """

    objective: Literal["rsft", "augmented", "prm", "rl"] = Field(
        "rsft", description="rsft: reasoning SFT; augmented: trajectory-augmented SFT; prm: process reward model; "
        "rl: process-aware RL guided by a PRM.")
    name: str | None = Field(None, description="The expert's name: its folder <run>/adapters/<name> (default: the "
                             "objective).")
    data: Literal["team", "self"] = Field(
        "team", description="Whose verified traces it learns from: the team's debate (team), or the single agent's "
        "own samples of the same problems (self: the single-agent distillation baseline, same number of rows).")
    experts: list[ExpertEntry] = Field(
        default_factory=list, description="Several trainings, each a mapping of the settings above that differ "
        "(at least objective or name; nested sections merge key by key); they run in order, so an entry's "
        "init_adapter or rl.prm may name an earlier one. Empty: this section is the one training.")
    model: str = Field("smollm2-135m", description="The student model.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of the trained weights (the Trainer's AdamW), reached after "
                      "warmup.")
    epochs: float = Field(1.0, gt=0, description="Passes over the dataset (a fraction runs part of one); max_steps, "
                          "when not -1, replaces it.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    kernels: Literal["auto", "triton", "torch", "off"] = Field(
        "auto", description="Fused LoRA kernels dispatch: auto (Triton where it runs, else the torch twins), triton, "
        "torch, off. A bare YAML off/false means off, on/true means auto.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter: rank r, alpha, dropout, "
                               "rslora, target_modules, quantize (nf4: QLoRA).")
    init_adapter: str | None = Field(
        None, description="Start from this PEFT adapter: an earlier expert's name (rl from rsft) or a folder.")
    batch_size: int = Field(8, ge=1, description="Examples per device per micro-step (packed into one row in SFT).")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Max tokens of one example.")
    too_long: Literal["drop", "truncate"] = Field("drop", description="What to do with longer examples (counted).")
    min_kept_labels: float = Field(
        0.5, ge=0.0, le=1.0, description="too_long=truncate: refuse the training when truncation leaves less than "
        "this share of the labelled (assistant) tokens of the rows it keeps.")
    packing: bool = Field(True, description="SFT: padding-free packing of a micro-batch into one row.")
    bf16: bool = Field(True, description="bf16 weights/autocast where the device computes bf16 natively, else float32 "
                      "(pluribus.device; the training record says so).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of keeping them: less memory, one "
        "more forward pass of compute per step; the result is the same.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of the optimizer steps over which the "
                                "learning rate rises linearly from 0 to lr.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay of the trained weights (0: none).")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="The learning rate after warmup: cosine or linear decay to 0, or constant (transformers' "
        "lr_scheduler_type; constant ignores warmup_ratio).")
    logging_steps: int = Field(10, ge=1, description="Log the training loss (and RL's rewards) every N optimizer "
                               "steps, to the trackers of report_to and the training record's curves.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps (for --resume).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept in <adapter>.checkpoints/ (the oldest "
                                  "are deleted).")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Rows held out for the eval loss (0: none).")
    eval_steps: int = Field(100, ge=1, description="Eval loss every N optimizer steps.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers, as transformers' TrainingArguments.report_to "
        f"takes them: {', '.join(REPORT_TO)}; all, or none. tensorboard logs land in <adapter>.checkpoints/runs/.")
    corrective_weight: float = Field(1.0, ge=0.0, description="augmented: loss weight of corrective traces.")
    prm: PRMSettings = Field(default_factory=PRMSettings, description="objective prm: hard or soft step labels and "
                             "the score threshold of a correct step.")
    rl: RLSettings = Field(default_factory=RLSettings, description="objective rl: group size, sampling, the PRM and "
                           "the reward, the clip, the KL and the sampler's backend.")
    # the trainings of ``experts``, each entry over the shared settings, resolved once by ``_experts_valid``
    _trainings: list[TrainConfig] = PrivateAttr(default_factory=list)

    @field_validator("kernels", mode="before")
    @classmethod
    def _kernels_as_written(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false and `on` as true, so `train.kernels: off` (as documented) and
        # `train.kernels=off` arrive as booleans; "on" asks for kernels wherever they can run, which is auto
        if isinstance(v, bool):
            return "auto" if v else "off"
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str) else v  # transformers takes one name as well as a list
        if isinstance(names, list):
            unknown = [n for n in names if n not in (*REPORT_TO, "all", "none")]
            if unknown:
                raise ValueError(f"unknown tracker(s) {unknown}; transformers accepts {', '.join(REPORT_TO)}, "
                                 "all or none")
        return names

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of optimizer steps, or -1 to run train.epochs")
        return v

    _name_is_a_folder = field_validator("name")(lambda v: v if v is None else _folder_name(v))

    @property
    def expert_name(self) -> str:
        return self.name or self.objective

    @model_validator(mode="after")
    def _self_data(self) -> TrainConfig:
        if self.data == "self" and self.objective not in ("rsft", "augmented"):
            raise ValueError(f"data: self (the single-agent baseline) trains rsft or augmented experts, not "
                             f"{self.objective}: the single agent's samples have one round and no step labels")
        return self

    @model_validator(mode="after")
    def _rl_settings_act(self) -> TrainConfig:
        # checked on a training, not on RLSettings alone: a shared section's rl may be completed by an expert's
        rl, defaults = self.rl, RLSettings.model_fields
        if self.objective != "rl" or self.experts:
            return self
        if rl.num_iterations == 1 and rl.clip != defaults["clip"].default:
            raise ValueError(f"rl.clip {rl.clip:g} has no effect with rl.num_iterations 1 (each batch is used for "
                             "one step, where the ratio is 1); set rl.num_iterations >= 2 or remove rl.clip")
        if rl.kl == 0 and rl.reference != defaults["reference"].default:
            raise ValueError(f"rl.reference {rl.reference} has no effect with rl.kl 0 (no KL term); set rl.kl > 0 "
                             "or remove rl.reference")
        return self

    @model_validator(mode="after")
    def _experts_valid(self) -> TrainConfig:
        # every entry is validated here, once: names unique, each entry's settings over the shared ones
        self._trainings = self._resolve()
        return self

    def _resolve(self) -> list[TrainConfig]:
        """Each entry of ``experts`` over the shared settings, validated into one training (ValueError naming the
        entry otherwise)."""
        shared = self.model_dump(mode="json", exclude={"experts"})
        out: list[TrainConfig] = []
        for i, entry in enumerate(self.experts):
            settings = entry.settings
            if isinstance(settings.get("rl"), dict):  # old names under the shared settings' new ones
                settings = {**settings, "rl": _renamed(settings["rl"], f"train.experts.{i}.rl", _RL_RENAMES)}
            merged = _deep_merge(shared, settings)
            if merged.get("objective") == "rl" and (unread := sorted(set(settings) & _RL_UNREAD)):
                raise ValueError(f"experts.{i}: {', '.join(unread)} have no effect on an rl training ({_RL_INSTEAD}); "
                                 "remove them from this entry")
            try:
                expert = TrainConfig.model_validate(merged)
            except ValidationError as e:
                raise ValueError(f"experts.{i}: " + "; ".join(_describe_error(err) for err in e.errors())) from None
            names = [t.expert_name for t in out]
            if expert.expert_name in names:
                raise ValueError(f"experts.{i}: name '{expert.expert_name}' is used twice; give each expert a "
                                 "distinct name")
            out.append(expert)
        return out

    def trainings(self) -> list[TrainConfig]:
        """The trainings this section names, in order: each expert's settings over the shared ones (resolved and
        validated once, when the section was); the section itself when it has no experts."""
        return list(self._trainings) if self.experts else [self]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> TrainConfig:
        """A copy with ``update``; its experts are resolved again over the copy's own settings, so a changed shared
        setting (or new entries) reaches every training as validation would have."""
        return copy_resolving(super().model_copy, update, deep, "experts", "_trainings", ExpertEntry, "train")

    def expert(self, name: str) -> TrainConfig:
        """The training named ``name``, or a RecipeError listing the names there are."""
        for t in self.trainings():
            if t.expert_name == name:
                return t
        names = ", ".join(t.expert_name for t in self.trainings())
        raise RecipeError(f"no expert named '{name}' in the train section. Available: {names}")
