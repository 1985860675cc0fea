"""A PEFT adapter folder: its adapter_config.json read and checked, the base it was made for, and its use on a model."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pluribus.errors import PluribusError
from pluribus.gguf import _file_key, cache_dir, find_alias_file
from pluribus.io import read_json_object
from pluribus.modelref import ModelRef
from pluribus.weights import _is_model_dir, first_nonfinite_in_file

logger = logging.getLogger("pluribus.models")

# config.json keys that differ between copies of one model (who saved it, in which dtype)
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a rank


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)  # json reads NaN too


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# the adapter_config.json fields pluribus (and PEFT, when it applies the adapter) reads: (expected, test)
_ADAPTER_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "peft_type": ("a string such as \"LORA\"", lambda v: isinstance(v, str)),
    "task_type": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "base_model_name_or_path": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "lora_alpha": ("a number", _is_number),
    "use_rslora": ("true or false", lambda v: v is None or isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: v is None or isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: v is None or isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: v is None or isinstance(v, bool)),
    "target_modules": ("a list of module names, a regex string or null",
                       lambda v: v is None or isinstance(v, str) or _is_names(v)),
    "modules_to_save": ("a list of module names or null", lambda v: v is None or _is_names(v)),
    "rank_pattern": ("an object mapping module names to positive integers",
                     lambda v: v is None or isinstance(v, dict) and all(_is_int(x) and x > 0 for x in v.values())),
    "alpha_pattern": ("an object mapping module names to numbers",
                      lambda v: v is None or isinstance(v, dict) and all(_is_number(x) for x in v.values())),
}


def read_adapter_config(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter_config.json of a PEFT folder, checked: a JSON object whose fields pluribus reads have the
    right JSON types, beside an adapter_model.safetensors file. Anything else is a PluribusError naming it."""
    folder = Path(adapter)
    cfg = folder / "adapter_config.json"
    if not cfg.is_file():
        raise PluribusError(f"adapter '{folder}' has no adapter_config.json; is it a PEFT adapter folder?")
    weights = folder / "adapter_model.safetensors"
    if weights.is_dir():
        raise PluribusError(f"adapter '{folder}': adapter_model.safetensors is a folder, not a file; re-save the "
                            "adapter")
    if not weights.is_file():
        raise PluribusError(f"adapter '{folder}' has no adapter_model.safetensors (pluribus never reads pickle "
                            "files)")
    config = read_json_object(cfg, "adapter config", "re-save the adapter")
    for key, (expected, ok) in _ADAPTER_FIELDS.items():
        if key in config and not ok(config[key]):
            shown = json.dumps(config[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise PluribusError(f"adapter config '{cfg}' has {key} = {shown}, expected {expected}; fix that field "
                                "or re-save the adapter")
    return config


def recorded_base_folder(base: str) -> Path | None:
    """The local folder an adapter's recorded base names, when it names one on this machine (never downloads)."""
    if not base:
        return None
    ref = ModelRef.parse(base)
    if ref.form == "alias":
        try:
            cached = cache_dir() / "models" / f"{base}-{_file_key(find_alias_file(base))}"
        except PluribusError:
            return None
        return cached if _is_model_dir(cached) else None
    if ref.is_local:
        return ref.path if ref.path is not None and _is_model_dir(ref.path) else None
    if ref.form != "hub":
        return None
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(base, local_files_only=True, allow_patterns=["config.json"]))
    except Exception:  # not in the cache: nothing to compare with
        return None
    return found if _is_model_dir(found) else None


def config_identity(folder: Path) -> dict[str, Any] | None:
    """A model folder's config.json less what does not tell models apart (its path, dtype, transformers version,
    use_cache): two folders with equal identities are the same architecture. None without a readable config."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in _CONFIG_NOISE} if isinstance(config, dict) else None


def check_adapter(adapter: str | os.PathLike[str], model_folder: str | os.PathLike[str] | None = None
                  ) -> dict[str, Any]:
    """Check a PEFT adapter before it is applied and return its config; every problem is a PluribusError.

    Its weights must be a readable safetensors file without NaN/Inf. With ``model_folder``, the adapter's
    recorded base must be that model: refused only when the base resolves to another local folder whose
    config.json differs (a hub id, an alias or a path from another machine cannot be compared, and passes).
    """
    cfg = read_adapter_config(adapter)
    weights = Path(adapter) / "adapter_model.safetensors"
    found = first_nonfinite_in_file(weights, "adapter weights", "re-save or retrain the adapter")
    if found is not None:
        raise PluribusError(f"adapter weights '{weights}' hold {found[1]} NaN/Inf value(s) in tensor '{found[0]}'; "
                            "the adapter is broken (did its training diverge?): retrain it, e.g. with a lower "
                            "train.lr")
    if model_folder is None:
        return cfg
    model_folder = Path(model_folder)
    base = str(cfg.get("base_model_name_or_path") or "")
    theirs = recorded_base_folder(base)
    if theirs is None:
        if str(adapter) not in _unchecked_bases:
            _unchecked_bases.add(str(adapter))
            logger.warning("adapter '%s' records base '%s', which is not on this machine; cannot check that it "
                           "belongs to '%s'", adapter, base or "(none)", model_folder)
        return cfg
    if theirs.resolve() == model_folder.resolve():
        return cfg
    a, b = config_identity(theirs), config_identity(model_folder)
    if a is not None and b is not None and a != b:
        raise PluribusError(
            f"adapter '{adapter}' was trained on base '{base}', but the model is '{model_folder}' (their "
            "config.json differ); use the adapter's base model, or an adapter trained on this one"
        )
    return cfg


def apply_adapter(model: Any, adapter: str | os.PathLike[str], adapter_name: str = "default") -> Any:
    """Wrap ``model`` with the PEFT adapter at ``adapter`` (checked by ``check_adapter`` first); a shape mismatch
    is reported as another base.

    The adapter stays in float32 over a 16-bit model, as it trained and as its model card loads it: in the
    model's dtype it decoded about 5% faster, relative to the base model (bench/lora_decode.py
    --adapter-dtype model), but changed greedy answers.
    """
    from peft import PeftModel

    name = getattr(model.config, "name_or_path", "") or ""
    cfg = check_adapter(adapter, name if name and _is_model_dir(Path(name)) else None)
    try:
        return PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name, is_trainable=False)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            base = cfg.get("base_model_name_or_path") or "an unknown base"
            raise PluribusError(
                f"adapter '{adapter}' was trained for {base}, whose shapes differ from this model "
                f"({getattr(model.config, 'name_or_path', type(model).__name__)}); use the adapter's base model"
            ) from None
        raise


_unchecked_bases: set[str] = set()  # adapters already warned about, so a debate warns once per adapter


def adapter_fingerprint(adapter: str | Path) -> str:
    """A short sha256 of the adapter's config and weights files: what the distilled system's answers depend on."""
    folder = Path(adapter)
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "adapter_config.json" or f.name.startswith("adapter_model.") or (
                f.name.endswith(".safetensors") or f.name == "config.json"):
            digest.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]
