"""The recipe: one typed, frozen pydantic schema for a whole run, loaded from YAML with dotted overrides.

Every section is optional; a stage that needs a missing section says which one. Unknown keys are errors.
``load_recipe`` turns every validation problem into one ``RecipeError`` whose message names the field path,
the bad value and what is allowed; the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pluribus.errors import PluribusError


class RecipeError(PluribusError, ValueError):
    """A recipe (or override) that does not validate. The message is one line, ready for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- task


class SyntheticConfig(Section):
    """The procedurally generated multi-step arithmetic task (see ``pluribus.data.tasks.synthetic``)."""

    level: str | None = Field(
        None, description="Named difficulty level (overrides steps/digits/style); see `pluribus.data.tasks.LEVELS`."
    )
    steps: int = Field(2, ge=1, le=12, description="Operations per problem (the number of gold steps).")
    digits: int = Field(1, ge=1, le=6, description="Digits per operand.")
    ops: list[Literal["+", "-", "*"]] = Field(["+", "-"], description="Operators to draw from.")
    style: Literal["expression", "word"] = Field("word", description="Bare expression or word problem.")


class TaskConfig(Section):
    """Where problems come from and which slice of them a run uses."""

    source: Literal["synthetic", "gsm8k", "jsonl", "parquet", "hf", "mc"] = Field(
        "synthetic", description="Problem source."
    )
    path: str | None = Field(None, description="File or dataset id for gsm8k / jsonl / parquet / hf / mc sources.")
    split: Literal["train", "heldout"] = Field("train", description="Deterministic split of the source.")
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of problems held out for eval.")
    n: int | None = Field(None, ge=1, description="Use at most this many problems of the split.")
    seed: int = Field(0, description="Seed for generation and the train/held-out split.")
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field mapping for jsonl/parquet/hf: {question: col, answer: col, ...}."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


# ---------------------------------------------------------------------------------------- team/debate


class SamplingConfig(Section):
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None, description="Sampling seed; None derives one from the recipe seed.")


class AgentConfig(Section):
    name: str | None = Field(None, description="Agent name in the records; defaults to agent<i>.")
    model: str = Field("smollm2-135m", description="Hub id, local folder, .gguf file or alias.")
    backend: Literal["transformers", "openai", "vllm"] = Field("transformers")
    adapter: str | None = Field(None, description="PEFT LoRA adapter folder applied on top of the model.")
    persona: str | None = Field(None, description="System prompt of this agent.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    base_url: str | None = Field(None, description="openai backend: server URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="openai backend: name of the env var holding the API key.")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "bfloat16", description="transformers/vllm backends: weight and compute dtype (bf16 also on CPU)."
    )
    context_length: int | None = Field(
        None, ge=32, description="Max prompt + new tokens; None: the model's own limit. Longer prompts are left-truncated."
    )
    max_concurrency: int = Field(16, ge=1, description="openai backend: max requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="openai backend: seconds before a request times out.")
    max_retries: int = Field(5, ge=0, description="openai backend: retries on 429/5xx/timeouts/refused connections.")


class TeamConfig(Section):
    agents: list[AgentConfig] = Field(default_factory=lambda: [AgentConfig()], min_length=1)
    rounds: int = Field(2, ge=1, description="Debate rounds R; round 0 answers alone.")
    topology: Literal["all", "ring", "star"] = Field("all")
    aggregation: Literal["majority", "judge"] = Field("majority")
    judge: AgentConfig | None = Field(None, description="Judge agent for topology star / aggregation judge.")
    batch_size: int = Field(32, ge=1, description="Max conversations per backend call.")
    peer_token_budget: int = Field(256, ge=16, description="Max tokens of each peer response shown to an agent.")
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Prompt template overrides by name (question, debate, peer, judge); see pluribus.data.debate.",
    )
    problems_per_step: int | None = Field(
        None, ge=1, description="Problems debated together (stored after each step); None: batch_size // agents."
    )


# ---------------------------------------------------------------------------------------------- build


class BuildConfig(Section):
    kinds: list[Literal["rsft", "augmented", "process"]] = Field(default_factory=lambda: ["rsft"])


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


class RLSettings(Section):
    """Process-aware RL: G samples per prompt, PRM + verified-answer reward, group-relative advantages."""

    group_size: int = Field(4, ge=2, description="Solutions G sampled per prompt.")
    prompts_per_step: int = Field(2, ge=1, description="Prompts per optimizer step (each sampled G times).")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Sampler of the current policy.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    prm: str | None = Field(None, description="PRM adapter folder (default <run>/adapters/prm).")
    aggregate: Literal["min", "mean", "last"] = Field("min", description="How step scores become one reward.")
    answer_weight: float = Field(1.0, ge=0.0, description="Reward weight of the verified final answer.")
    clip: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range epsilon of the ratio.")
    kl: float = Field(0.0, ge=0.0, description="Weight beta of the KL to the reference (adapter disabled).")


class TrainConfig(Section):
    """A LoRA/QLoRA training stage (``pluribus.distill``); the output is a PEFT adapter + training_record.json."""

    stage: Literal["rsft", "augmented", "prm", "rl"] = Field("rsft")
    model: str = Field("smollm2-135m", description="The student model.")
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    kernels: Literal["auto", "triton", "torch", "off"] = Field("auto", description="Fused LoRA kernels dispatch.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    init_adapter: str | None = Field(None, description="Start from this PEFT adapter (e.g. rl from adapters/rsft).")
    batch_size: int = Field(8, ge=1, description="Examples per device per micro-step (packed into one row in SFT).")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Max tokens of one example.")
    too_long: Literal["drop", "truncate"] = Field("drop", description="What to do with longer examples (counted).")
    packing: bool = Field(True, description="SFT: padding-free packing of a micro-batch into one row.")
    bf16: bool = Field(True, description="bf16 weights/autocast (CPU and GPU).")
    gradient_checkpointing: bool = Field(False)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps (for --resume).")
    save_total_limit: int = Field(2, ge=1)
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Rows held out for the eval loss (0: none).")
    eval_steps: int = Field(100, ge=1, description="Eval loss every N optimizer steps.")
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(default_factory=lambda: ["tensorboard"])
    corrective_weight: float = Field(1.0, ge=0.0, description="augmented: loss weight of corrective traces.")
    prm: PRMSettings = Field(default_factory=PRMSettings)
    rl: RLSettings = Field(default_factory=RLSettings)


# ---------------------------------------------------------------------------------------------- merge


class MergeConfig(Section):
    config: str | None = Field(None, description="Path to a merge config (pluribus or mergekit YAML).")


# ------------------------------------------------------------------------------------- eval / export


class EvalConfig(Section):
    n: int | None = Field(None, ge=1, description="Held-out problems to evaluate.")


class ExportConfig(Section):
    repo_id: str | None = Field(None, description="Hub repository to push to.")
    private: bool = True


# --------------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A whole run. ``runs/<name>/`` under ``root`` is where every stage reads and writes."""

    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9_.\-]+$", description="Run name (folder under root).")
    root: str = Field("runs", description="Folder holding run folders.")
    seed: int = Field(0)
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code.")
    task: TaskConfig | None = None
    team: TeamConfig | None = None
    build: BuildConfig | None = None
    train: TrainConfig | None = None
    merge: MergeConfig | None = None
    eval: EvalConfig | None = None
    export: ExportConfig | None = None

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("root must be a folder path")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

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


# ------------------------------------------------------------------------------------- load / override


def _describe_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<recipe>"
    kind = err["type"]
    value = err.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind == "extra_forbidden":
        return f"unknown key '{path}' (check the spelling; allowed keys are listed in configs/quickstart.yaml)"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"'{path}' = {shown} is not allowed; expected one of {allowed}"
    if kind == "missing":
        return f"'{path}' is required"
    return f"'{path}' = {shown}: {err['msg']}"


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe dict, raising a one-line RecipeError naming every bad field."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe_error(err) for err in e.errors()]
        raise RecipeError("invalid recipe: " + "; ".join(problems)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 1e-4). The value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a recipe dict (a copy); list items are addressed by index (team.agents.0.model)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = node[int(part)] if isinstance(node, list) else node.get(part)
            if nxt is None:
                if isinstance(node, list):
                    raise RecipeError(f"override '{text}': index {part} is out of range")
                nxt = node[part] = {}
            elif not isinstance(nxt, dict | list):
                raise RecipeError(f"override '{text}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise RecipeError(f"override '{text}': index {last} is out of range") from None
        else:
            node[last] = value
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from YAML (or start from an empty one) and apply dotted overrides."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"recipe file '{p}' is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    return validate_recipe(apply_overrides(data, overrides or []))


def write_recipe(recipe: Recipe, run_dir: Path | None = None) -> Path:
    """Write the recipe as run to ``<run>/recipe.yaml`` (atomically) and return the path."""
    from pluribus.io import atomic_write_text

    out = (run_dir or recipe.run_dir) / "recipe.yaml"
    atomic_write_text(out, recipe.to_yaml())
    return out
