"""What every recipe section shares: the frozen base model, old-name renames, and the device and folder-name checks."""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, RootModel

from pluribus.errors import validation_message

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



def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out



def _describe_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden" and path.endswith("stage") and path.startswith("train"):
        return f"'{path}' is now called objective (train.objective: rsft | augmented | prm | rl)"
    return validation_message([err])


class Entry(RootModel[dict[str, Any]]):
    """One entry of a section's list of variants (``train.experts``, ``merge.merges``) as written: the settings that
    differ from the section's shared ones. It dumps as written, so recipe.yaml and every hash are those of the YAML;
    the section resolves it over its shared settings once."""

    model_config = ConfigDict(frozen=True)

    @property
    def settings(self) -> dict[str, Any]:
        """The entry's settings as written."""
        return dict(self.root)


def copy_resolving(copy: Any, update: Any, deep: bool, entries: str, resolved: str, entry: type,
                   where: str) -> Any:
    """``copy(update=update, deep=deep)`` (a section's parent model_copy) whose ``entries`` (each an ``entry``) are
    resolved again over the copy's own settings into ``resolved``, as validation does; RecipeError naming ``where``."""
    from pluribus.errors import RecipeError

    if update and entries in update:
        update = {**update, entries: [entry.model_validate(e) for e in update[entries]]}
    out = copy(update=update, deep=deep)
    if update and getattr(out, entries):
        try:
            setattr(out, resolved, out._resolve())
        except ValueError as e:
            raise RecipeError(f"invalid recipe: {where}: {e}") from None
    return out
