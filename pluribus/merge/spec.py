"""The typed pluribus merge spec: methods, inputs and the options each method reads.

A pluribus merge YAML::

    method: ties                 # a registered method (merge/registry.py): ties, task_arithmetic, pcb, cat, ...
    base: path/to/base           # full-model merges, and folding adapters into a model
    inputs:
      - {path: runs/a/adapters/rsft, weight: 1.0}
      - {path: path/to/base, adapter: runs/b/adapters/rl, weight: 0.5}   # a `base + adapter` input
    density: 0.5                 # TIES / magnitude / PCB: fraction kept (DARE takes drop instead)
    rank: 64                     # adapter output rank (or energy: 0.99 for a per-module rank); left out: the
                                 # method's default (exact for cat, linear, task_arithmetic)

An option a method does not read is refused by name (each method's registration in merge/registry.py lists the
options it reads): it would change nothing. Each input's weight defaults to 1 for every method (mergekit's
convention): ``task_arithmetic`` of three adapters is their sum; a mean is spelled (weights, ``normalize: true``).

A mergekit YAML (``merge_method``, ``models``, ``base_model``, ``parameters``, ``dtype``) is translated into it
by merge/mergekit.py; merge/config.py reads either form.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pluribus.errors import not_finite
from pluribus.merge.registry import METHODS, WEIGHT_DEFAULT, get_method, users_of

_OPTION_HINTS = {
    ("cat", "rank"): "cat writes the exact sum at the summed rank; use method svd for a rank-k result",
    ("cat", "energy"): "cat writes the exact sum at the summed rank; use method svd for a per-module rank",
}


def _refusal(method: str, option: str, value: Any) -> str:
    if method.startswith("dare") and option == "density":
        keep = f" (drop: {1 - value:g})" if isinstance(value, int | float) else ""
        return (f"density has no effect in method '{method}': DARE drops each entry with probability drop "
                f"(mergekit's density is 1 - drop); give drop instead{keep}")
    hint = _OPTION_HINTS.get((method, option))
    users = ", ".join(users_of(option)) or "no method"
    return f"{option} has no effect in method '{method}' ({hint or f'it applies to {users}'}); remove it"


def _require_finite(value: float | None, name: str) -> None:
    """NaN and Inf parse as floats and pass every range check (NaN compares false): refuse them by name."""
    if value is not None and not math.isfinite(value):
        raise ValueError(not_finite(name, value))


class MergeInput(BaseModel):
    """One expert: a PEFT adapter folder, a model folder, or a model plus an adapter (``base + adapter``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Adapter folder or model folder (safetensors).")
    adapter: str | None = Field(None, description="Adapter applied on top of `path` (a `base + adapter` input).")
    weight: float = Field(WEIGHT_DEFAULT, description="w_t of this expert (default 1 for every method and entry "
                          "point: task_arithmetic sums, as in mergekit).")
    density: float | None = Field(None, description="Fraction kept by trimming for this expert (overrides).")
    drop: float | None = Field(None, description="DARE drop rate p for this expert (overrides).")

    @model_validator(mode="after")
    def _finite(self) -> MergeInput:
        for name in ("weight", "density", "drop"):
            _require_finite(getattr(self, name), f"{name} of '{self.path}'")
        return self

    @property
    def label(self) -> str:
        return f"{self.path}+{self.adapter}" if self.adapter else self.path


class MergeSpec(BaseModel):
    """A whole merge. Adapters in -> an adapter out (or a model with ``output: model``); models in -> a model."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    method: str = Field(description="Merge method (merge/registry.py lists them); `mergekit` runs `mergekit_yaml` "
                        "with mergekit itself.")
    inputs: list[MergeInput] = Field(default_factory=list, description="The experts to merge.")
    base: str | None = Field(None, description="Base model folder (full merges; folding adapters).")
    output: Literal["auto", "adapter", "model"] = Field("auto", description="auto: adapter for adapters, else model.")
    rank: int | None = Field(None, ge=1, description="Output adapter rank; None: the method's default (the exact "
                             "rank for the linear methods, the largest input rank for svd and the dense ones).")
    energy: float | None = Field(None, description="Keep this energy fraction, in (0, 1]: per-module ranks.")
    density: float | None = Field(None, description="TIES / magnitude: fraction of entries kept, in (0, 1].")
    drop: float | None = Field(None, description="DARE: drop rate p, in [0, 1).")
    lam: float = Field(1.0, alias="lambda", description="Scale lambda of the merged task vector.")
    normalize: bool | None = Field(None, description="Divide by summed weights; None: the method's default.")
    trim: Literal["tensor", "global"] = Field("tensor", description="TIES trimming per tensor or over the model.")
    mergekit: bool = Field(False, description="Reproduce mergekit 0.1.5's semantics (weighted vote, L1 rescale).")
    seed: int = Field(0, description="Seed of the DARE masks.")
    dtype: Literal["float32", "float64", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Arithmetic dtype of full merges; auto: each tensor's own dtype (mergekit's default)."
    )
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="None: the base's dtype.")
    shard_size: str = Field("1GB", description="Max output shard size (e.g. 500MB, 2GB).")
    tokenizer_source: str | None = Field(None, description="Folder to copy the tokenizer from (default: base).")
    check_base: bool = Field(True, description="Refuse adapters of different bases (compared by contents where "
                                               "they are on this machine; CLI --no-check-base).")
    mergekit_yaml: dict[str, Any] | None = Field(None, description="Raw mergekit config (method: mergekit).")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v != "mergekit" and v not in METHODS:
            raise ValueError(f"Unknown merge method '{v}'. Available: {', '.join([*METHODS, 'mergekit'])}")
        return v

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        for name, value in (("lambda", self.lam), ("energy", self.energy), ("density", self.density),
                            ("drop", self.drop)):
            _require_finite(value, name)
        if self.method == "mergekit":
            if not self.mergekit_yaml:
                raise ValueError("method 'mergekit' needs mergekit_yaml (a mergekit config mapping)")
            extra = next((k for k in ("inputs", "rank", "energy", "density", "drop", "normalize", "base")
                          if getattr(self, k) not in (None, [])), None)
            if extra is not None:
                raise ValueError(f"{extra} has no effect in method 'mergekit', which runs mergekit_yaml as it is; "
                                 "put it in mergekit_yaml")
            return self
        if not self.inputs:
            raise ValueError("inputs is empty; list at least one adapter or model to merge")
        if self.rank is not None and self.energy is not None:
            raise ValueError("give either rank or energy, not both")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy = {self.energy} is out of range; it must be in (0, 1]")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density = {self.density} is out of range; it must be in (0, 1]")
        if self.drop is not None and not 0 <= self.drop < 1:
            raise ValueError(f"drop = {self.drop} is out of range; it must be in [0, 1)")
        for i, inp in enumerate(self.inputs):
            if inp.density is not None and not 0 < inp.density <= 1:
                raise ValueError(f"inputs.{i}.density = {inp.density} is out of range; it must be in (0, 1]")
            if inp.drop is not None and not 0 <= inp.drop < 1:
                raise ValueError(f"inputs.{i}.drop = {inp.drop} is out of range; it must be in [0, 1)")
        given: dict[str, Any] = {k: getattr(self, k) for k in ("rank", "energy", "density", "drop", "normalize")
                                 if getattr(self, k) is not None}
        if self.trim != "tensor":
            given["trim"] = self.trim
        for inp in self.inputs:
            for k in ("density", "drop"):
                if getattr(inp, k) is not None:
                    given.setdefault(k, getattr(inp, k))
        method = get_method(self.method)
        for option, value in given.items():
            if option not in method.options:
                raise ValueError(_refusal(self.method, option, value))
        if self.mergekit and not method.mergekit_mode:
            raise ValueError(f"method '{self.method}' has no mergekit counterpart (mergekit 0.1.5 lacks it); "
                             "drop mergekit: true")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


# ------------------------------------------------------------------------------------------ mergekit


