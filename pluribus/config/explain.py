"""The recipe's field reference: every field of every section with its type, default and description (``pluribus config --explain``)."""

from __future__ import annotations

import json
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, RootModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pluribus.config.recipe import Recipe
from pluribus.errors import RecipeError

WIDTH = 100


@dataclass(frozen=True)
class SectionDoc:
    """One section of the reference: its dotted path in a recipe (``recipe`` for the top level), its schema class,
    and the path where the same class is first (a judge is an agent: where both are shown, its fields are not
    repeated)."""

    path: str
    model: type[BaseModel]
    same_as: str | None = None
    entries: bool = False  # train.experts, merge.merges: each entry a mapping of its section's fields


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The section classes a field holds (directly, in a list, or optionally); entry types (RootModel) are not."""
    if isinstance(annotation, type):
        ok = issubclass(annotation, BaseModel) and not issubclass(annotation, RootModel)
        return [annotation] if ok else []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _entries_in(annotation: Any) -> bool:
    """Whether a field holds entries (``ExpertEntry``, ``MergeEntry``): mappings of its section's own fields."""
    if isinstance(annotation, type):
        return issubclass(annotation, RootModel)
    return any(_entries_in(arg) for arg in typing.get_args(annotation))


def sections() -> list[SectionDoc]:
    """Every section of the recipe schema in reading order: each section, then the sections nested in it."""
    out: list[SectionDoc] = []
    first: dict[type[BaseModel], str] = {}

    def walk(path: str, model: type[BaseModel]) -> None:
        if model in first:
            out.append(SectionDoc(path, model, first[model]))
            return
        first[model] = path
        out.append(SectionDoc(path, model))
        for name, info in model.model_fields.items():
            here = name if path == "recipe" else f"{path}.{name}"
            for sub in _models_in(info.annotation):
                walk(here, sub)
            if _entries_in(info.annotation):  # train.experts, merge.merges: mappings of the section's own fields
                out.append(SectionDoc(here, model, path, entries=True))

    walk("recipe", Recipe)
    return out


def type_name(annotation: Any) -> str:
    """A field's type as a recipe writer reads it: ``rsft | augmented``, ``list[str]``, ``float | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, RootModel):
        return "mapping"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def default_text(info: FieldInfo) -> str:
    """A field's default as YAML would spell it; ``required`` where it has none, ``(section)`` for a nested one."""
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    # a list of sections (team.agents) shows each as the settings it changes: [{}] is one of defaults
    return json.dumps(value, ensure_ascii=False,
                      default=lambda v: v.model_dump(mode="json", exclude_defaults=True))


def _field_lines(name: str, info: FieldInfo) -> Iterator[str]:
    yield f"  {name}: {type_name(info.annotation)} = {default_text(info)}"
    yield from textwrap.wrap(info.description or "", WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)


def explain(section: str | None = None) -> str:
    """The reference as text: every section (or ``section`` and the sections nested in it), each field with its
    type, default and description. Raises RecipeError naming the valid sections for an unknown one."""
    docs = sections()
    paths = [d.path for d in docs]
    if section is not None and section not in paths:
        raise RecipeError(f"unknown section '{section}'; the sections are: {', '.join(paths)}")
    chosen = [d for d in docs if section in (None, "recipe") or d.path == section or d.path.startswith(f"{section}.")]
    if section == "recipe":
        chosen = chosen[:1]
    lines: list[str] = []
    shown: set[str] = set()
    for doc in chosen:
        lines.append(f"{doc.path} ({doc.model.__name__})")
        if doc.entries:
            lines.append(f"  each entry: a mapping of the fields of {doc.same_as} that differ from the shared ones")
        if doc.same_as in shown:
            lines += [f"  the fields of {doc.same_as}, above", ""]
            continue
        shown.add(doc.path)
        summary = " ".join((doc.model.__doc__ or "").split("\n\n")[0].split()).replace("``", "`")
        lines += textwrap.wrap(summary, WIDTH, initial_indent="  ", subsequent_indent="  ")
        for name, info in doc.model.model_fields.items():
            lines += _field_lines(name, info)
        lines.append("")
    return "\n".join(lines)
