"""User-facing errors: one clear line naming what is wrong and how to fix it; the CLI exits with code 2.

The messages that recur across stages are written here once: an output that exists, a name that is not one of
the available ones, a number that is not finite, a folder that cannot be created, a validation error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class PluribusError(Exception):
    """Bad input from the user (config, files, models, data). The message is shown as is, on one line."""


class RecipeError(PluribusError, ValueError):
    """A recipe (or override) that does not validate. The message is one line, ready for the user."""


class OutputExistsError(PluribusError, FileExistsError):
    """An output that exists while ``--overwrite`` was not given; raised before anything is written."""

    def __init__(self, path: str | Path, alternatives: str = "") -> None:
        super().__init__(f"output '{path}' already exists; pass --overwrite to replace it{alternatives}")


def unknown_name(what: str, name: object, available: Iterable[object]) -> str:
    """``unknown step rule 'words'. Available: lines, paragraphs``: a name that is not one of ``available``."""
    return f"unknown {what} {_quoted(name)}. Available: {', '.join(map(str, available))}"


def _quoted(name: object) -> str:
    return f"'{name}'" if isinstance(name, str) else str(name)


def not_finite(name: str, value: object) -> str:
    """``lambda must be a finite number (got nan)``: NaN and Inf parse as floats and pass every range check."""
    return f"{name} must be a finite number (got {value})"


def cannot_create(path: str | Path, reason: str, what: str = "") -> str:
    """``cannot create output folder 'x': 'q.yaml' is a file, not a folder``; ``what`` names the folder's role."""
    return f"cannot create {what + ' ' if what else ''}'{path}': {reason}"


def validation_message(errors: Sequence[Mapping[str, Any]], *, quoted: bool = True) -> str:
    """pydantic's ``ValidationError.errors()`` as one line, the problems joined by ``; ``.

    ``quoted`` (recipes): ``'team.topology' = "mesh" is not allowed; expected one of ...``, unknown keys named
    with the fix. Unquoted (merge specs, as mergekit's users read them): ``method: 'tie' is not allowed; ...``.
    """
    return "; ".join(_problem(err, quoted) for err in errors)


def _problem(err: Mapping[str, Any], quoted: bool) -> str:
    import json

    path = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ")
    expected = err.get("ctx", {}).get("expected", "")
    if not quoted:
        if kind == "literal_error":
            msg = f"{err.get('input')!r} is not allowed; expected one of {expected}"
        return f"{path}: {msg}" if path else msg
    path = path or "<recipe>"
    value = err.get("input")
    shown = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, dict) else "{...}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind == "extra_forbidden":
        return f"unknown key '{path}' (check the spelling; allowed keys are listed in configs/quickstart.yaml)"
    if kind == "literal_error":
        return f"'{path}' = {shown} is not allowed; expected one of {expected}"
    if kind == "missing":
        return f"'{path}' is required"
    return f"'{path}' = {shown}: {msg}"
