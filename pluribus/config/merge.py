"""The merge section: merges of the run's experts by name, or merge configs by path or inline, as typed merge entries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pluribus.config.base import Entry, Section, _deep_merge, _describe_error, _folder_name, copy_resolving
from pluribus.errors import RecipeError
from pluribus.layout import RunLayout


class MergeEntry(Entry):
    """One entry of ``merge.merges`` as written: the settings of one merge that differ from the section's.

    It dumps as written (the run's recipe.yaml and the merge section's hashes are those of the YAML); the section
    resolves it over its shared settings into one ``MergeConfig``, once (``MergeConfig.all``).
    """

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "merges" in data:
            raise ValueError("must be a mapping of merge settings (without merges of its own)")
        return data


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
    merges: list[MergeEntry] = Field(
        default_factory=list, description="Several merges, each a mapping of the settings above that differ (at "
        "least name; params and spec merge key by key); empty: this section is the one merge.")

    _name_is_a_folder = field_validator("name")(_folder_name)
    # the merges of ``merges``, each entry over the shared settings, resolved once by ``_merges_valid``
    _merges: list[MergeConfig] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _merges_valid(self) -> MergeConfig:
        if self.merges:  # each entry checks itself as it validates (below), once
            self._merges = self._resolve()
            names = [m.name for m in self._merges]
            if len(set(names)) != len(names):
                raise ValueError(f"merge names must be distinct, got {names}")
            return self
        sources = sum(x is not None for x in (self.experts, self.config, self.spec))
        if sources != 1:
            raise ValueError(f"merge '{self.name}' needs exactly one of 'config' (a path), 'spec' (inline) or "
                             "'experts' (names of the run's experts)")
        if self.weights is not None and self.experts is not None and len(self.weights) != len(self.experts):
            raise ValueError(f"merge '{self.name}': {len(self.weights)} weights for {len(self.experts)} experts")
        if self.experts is not None and not self.experts:
            raise ValueError(f"merge '{self.name}': experts is empty; name the experts to merge")
        # the method and its settings are the merge package's to check: validate_recipe builds each merge's spec
        # (MergeConfig.load) once the recipe validates, so this schema imports no merge code
        return self

    def _resolve(self) -> list[MergeConfig]:
        """Each entry of ``merges`` over the shared settings, validated into one merge (ValueError naming the
        entry otherwise)."""
        shared = self.model_dump(mode="json", exclude={"merges"})
        out = []
        for i, entry in enumerate(self.merges):
            try:
                out.append(MergeConfig.model_validate(_deep_merge(shared, entry.settings)))
            except ValidationError as e:
                raise ValueError(f"merges.{i}: " + "; ".join(_describe_error(err) for err in e.errors())) from None
        return out

    def all(self) -> list[MergeConfig]:
        """Every merge this section names, in order: each entry of ``merges`` over the shared settings (resolved
        and validated once, when the section was); the section itself when it has no merges."""
        return list(self._merges) if self.merges else [self]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> MergeConfig:
        """A copy with ``update``; its merges are resolved again over the copy's own settings (as validation)."""
        return copy_resolving(super().model_copy, update, deep, "merges", "_merges", MergeEntry, "merge")

    def load(self, layout: RunLayout | None = None) -> Any:
        """The merge spec (a ``pluribus.merge.spec.MergeSpec``) this merge names; ``layout`` finds experts.

        The one place the recipe reads the merge package, lazily: its reader (pluribus or mergekit keys), whose
        registry is the one truth for the methods and their options. PluribusError for a spec it refuses.
        """
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

