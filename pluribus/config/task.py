"""The task section: where problems come from (a synthetic generator, a file, a Hub dataset) and which slice a run uses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pluribus.config.base import Section


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
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="synthetic source: the generator's level, steps, digits, "
        "operators and style.")

