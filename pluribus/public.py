"""What may leave this machine: Hub tokens and URL credentials redacted, local paths reduced to public names.

Every file, card and message pluribus writes for the Hub passes through ``scrub`` / ``redact``; a model is named by
``public_model_name`` (its Hub id where known, never an absolute path).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pluribus.modelref import ALIASES, ModelRef

TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_TOKEN_RE = re.compile(r"\b(hf|sk)[_-][A-Za-z0-9_\-]{8,}")
_USERINFO_RE = re.compile(r"(?<=://)[^/\s@]+@")  # https://user:key@host -> https://***@host
_SECRET_KEY_RE = re.compile(r"(?i)(^|[_-])(api[_-]?key|token|secret|password|passwd|credentials?)$")


def redact(text: str) -> str:
    """Remove Hub tokens (the env's own and anything shaped like ``hf_...`` / ``sk-...``) and URL credentials."""
    for name in TOKEN_ENVS:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return _USERINFO_RE.sub("***@", _TOKEN_RE.sub(lambda m: f"{m.group(1)}_***", text))


def is_secret_key(key: str) -> bool:
    """Whether a record's key names a secret (an api_key, a token, a password): its value is never shown."""
    return bool(_SECRET_KEY_RE.search(key))


def _is_local_path(ref: str) -> bool:
    return ref.startswith(("/", "~", "./", "../", "\\")) or bool(re.match(r"[A-Za-z]:[\\/]", ref))


def public_model_name(ref: str | None) -> str | None:
    """How an export names a model: its Hub id where pluribus knows it, else its folder's last name.

    Known: an alias of pluribus.models, a checkpoint pluribus dequantized from an alias (``pluribus_source.json``
    or its cache folder's name), a folder whose config.json records a Hub id, a Hub id itself. Never a local
    absolute path: a card or adapter config pushed to the Hub cannot point into this machine.
    """
    if not ref:
        return None
    ref = redact(str(ref))
    if ref in ALIASES:
        return ALIASES[ref].hub_id
    if ModelRef.parse(ref).form == "hub":
        return ref
    folder = Path(ref).expanduser()
    source = folder / "pluribus_source.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        gguf = Path(json.loads(source.read_text()).get("gguf") or "").name
        for alias in ALIASES.values():
            if gguf == alias.filename:
                return alias.hub_id
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
        if recorded != ref and ModelRef.parse(recorded).form in ("alias", "hub"):
            return public_model_name(recorded)
    name = folder.name or ref
    for alias, spec in ALIASES.items():  # the cache folder <alias>-<hash> of a dequantized alias
        if name == alias or name.startswith(f"{alias}-"):
            return spec.hub_id
    return name


def gguf_origin(ref: str | None) -> tuple[str, str | None] | None:
    """(GGUF file name, alias) when the model ``ref`` is a dequantized GGUF: an alias, its cache folder
    ``<alias>-<hash>``, or a folder whose ``pluribus_source.json`` names the file; else None."""
    if not ref:
        return None
    ref = str(ref)
    if ref in ALIASES:
        return ALIASES[ref].filename, ref
    folder = Path(ref).expanduser()
    gguf = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        gguf = Path(json.loads((folder / "pluribus_source.json").read_text()).get("gguf") or "").name or None
    for alias, spec in ALIASES.items():
        if gguf == spec.filename or (gguf is None and folder.name.startswith(f"{alias}-")):
            return spec.filename, alias
    return (gguf, None) if gguf else None


def base_metadata(ref: str | None) -> dict[str, Any]:
    """``license`` and ``language`` of a base model where known: an alias's, else the base folder's own card."""
    origin = gguf_origin(ref)
    alias = origin[1] if origin else None
    # the Hub id of an alias is the same model (its license is the alias's)
    alias = alias or next((a for a, spec in ALIASES.items() if spec.hub_id == public_model_name(ref)), None)
    if alias:
        spec = ALIASES[alias]
        return {k: v for k, v in (("license", spec.license), ("language", list(spec.language))) if v}
    readme = Path(str(ref or "")).expanduser() / "README.md"
    if ref and readme.is_file():
        from huggingface_hub import metadata_load

        with contextlib.suppress(Exception):  # a base's card is a courtesy: a broken one is not our error
            meta = metadata_load(readme) or {}
            return {k: meta[k] for k in ("license", "language") if meta.get(k)}
    return {}


def _public_path(value: str) -> str:
    """A string of a record as an export shows it: no URL credentials, a local absolute path by its last name."""
    value = redact(value)
    return (public_model_name(value) or value) if _is_local_path(value) else value


def scrub(data: Any, key: str = "") -> Any:
    """``data`` (a JSON/YAML record) with secrets redacted and local absolute paths reduced to names."""
    if isinstance(data, dict):
        return {_public_path(str(k)): scrub(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [scrub(v, key) for v in data]
    if isinstance(data, str):
        return "***" if data and is_secret_key(key) else _public_path(data)
    return data
