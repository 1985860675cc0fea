"""A merge config read: a pluribus or mergekit mapping (inline or a YAML file) into one MergeSpec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pluribus.errors import PluribusError, validation_message
from pluribus.io import read_yaml
from pluribus.merge.mergekit import from_mergekit
from pluribus.merge.spec import MergeSpec


def parse_merge_config(data: Any, source: str = "<inline>") -> MergeSpec:
    """Validate a pluribus or mergekit merge mapping into a MergeSpec (one-line PluribusError on problems)."""
    if isinstance(data, MergeSpec):
        return data
    if not isinstance(data, dict):
        raise PluribusError(f"merge config {source} must be a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data)
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as e:
        raise PluribusError(f"invalid merge config {source}: {validation_message(e.errors(), quoted=False)}") from None


def load_merge_config(path: str | Path) -> MergeSpec:
    """Read a merge YAML (pluribus or mergekit format) from ``path``."""
    return parse_merge_config(read_yaml(path, "merge config"), f"'{Path(path)}'")
