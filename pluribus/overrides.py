"""Dotted overrides of a recipe (``train.lr=1e-4``, ``team.agents.0.model=...``) applied to its YAML data."""

from __future__ import annotations

import json
from typing import Any

import yaml

from pluribus.errors import RecipeError


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


def _list_index(items: list[Any], part: str, text: str, where: str) -> int:
    """``part`` as an index of ``items`` (the list at dotted path ``where``), or a RecipeError saying why not."""
    try:
        index = int(part)
    except ValueError:
        hint = f"use 0..{len(items) - 1}" if items else "an empty one"
        raise RecipeError(f"override '{text}': '{part}' is not a list index ({where} is a list; {hint})") from None
    if not 0 <= index < len(items):
        raise RecipeError(f"override '{text}': index {index} is out of range ({where} has {len(items)} "
                          f"entr{'y' if len(items) == 1 else 'ies'})")
    return index


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a recipe dict (a copy); list items are addressed by index (team.agents.0.model)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[:i]) or "<recipe>"
            if isinstance(node, list):
                nxt = node[_list_index(node, part, text, where)]
            else:
                nxt = node.get(part)
                if nxt is None:
                    nxt = node[part] = {}
            if not isinstance(nxt, dict | list):
                raise RecipeError(f"override '{text}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = nxt
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, text, ".".join(parts[:-1]))] = value
        else:
            node[last] = value
    return data
