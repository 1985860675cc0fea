"""The merge section: merges of the run's experts by name, or merge configs by path or inline, as typed merge entries."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from pluribus.config.base import Section, _deep_merge, _describe_error, _folder_name
from pluribus.errors import PluribusError, RecipeError
from pluribus.layout import RunLayout


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

