"""The build section: how a trajectory store becomes datasets (rsft, augmented, process)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pluribus.config.agents import AgentConfig
from pluribus.config.base import Section, _renamed

_CORRECTIVE_TEMPLATE = (
    "{first_attempt}\n\nLet me check this before I commit to it. Going back over each step, I find a mistake, "
    "so {first_answer} is not right. Here is the corrected solution.\n\n{corrected}"
)


class BuildConfig(Section):
    """Turning a trajectory store into datasets: rsft, augmented and process (see pluribus.data.builders)."""

    kinds: list[Literal["rsft", "augmented", "process"]] = Field(
        default_factory=lambda: ["rsft"], min_length=1, description="Datasets to build: rsft (verified final "
        "answers), augmented (diverse and corrective traces), process (step labels by Monte-Carlo rollouts, for a "
        "PRM and RL). Each training objective reads its own (rsft, augmented; prm and rl read process).")
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

