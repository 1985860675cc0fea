"""A model folder's files checked before use: config.json, safetensors headers, and every tensor finite."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pluribus.errors import PluribusError
from pluribus.io import read_json


def _check_safetensors(folder: Path, what: str) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if files or (folder / "model.safetensors.index.json").is_file():
        for f in files:
            check_safetensors_header(f, "model weights", "re-save or re-download the model")
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise PluribusError(
            f"{what} '{folder}' has only pickle weights (.bin/.pt), which pluribus does not load; "
            "convert it to safetensors first (save_pretrained(..., safe_serialization=True))"
        )
    raise PluribusError(f"{what} '{folder}' has a config.json but no *.safetensors weights")


def first_nonfinite_in_file(path: Path, what: str, fix: str) -> tuple[str, int] | None:
    """(tensor, count) of the first tensor of safetensors file ``path`` holding NaN/Inf, else None; read tensor
    by tensor, so a large model never sits in memory whole. A folder or a corrupt file is a PluribusError."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        raise PluribusError(f"{what} '{path}' is a folder, not a file; {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            return first_nonfinite((key, f.get_tensor(key)) for key in f.keys())  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise PluribusError(f"{what} '{path}' are corrupt or truncated ({e}); {fix}") from None


def check_safetensors_header(path: Path, what: str, fix: str) -> None:
    """Parse the header of a safetensors file (cheap: nothing is read but the header); a truncated or foreign
    file raises a PluribusError naming it."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        raise PluribusError(f"{what} '{path}' is a folder, not a file; {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise PluribusError(f"{what} '{path}' are corrupt or truncated ({e}); {fix}") from None


def first_nonfinite(tensors: Any) -> tuple[str, int] | None:
    """(name, count) of the first floating tensor in ``tensors`` (name, tensor pairs) holding NaN/Inf, else None."""
    import torch

    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # a finite sum means no NaN/Inf, without a mask as large as the tensor; an overflow falls to the exact test
        if torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return name, bad
    return None


def check_finite_model(model: Any, folder: Path) -> None:
    """Refuse a loaded model whose weights hold NaN/Inf, naming the tensor and the file it came from."""
    found = first_nonfinite(model.named_parameters())
    if found is None:
        return
    name, bad = found
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    source = ""
    if index.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            source = json.loads(index.read_text()).get("weight_map", {}).get(name, "")
    elif len(files) == 1:
        source = files[0].name
    where = f" ({folder / source})" if source else f" (in '{folder}')"
    raise PluribusError(
        f"model weights hold {bad} NaN/Inf value(s) in tensor '{name}'{where}; the checkpoint is broken: "
        "re-save or re-download the model"
    )


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def read_model_config(folder: Path) -> dict[str, Any]:
    """The config.json of a model folder if it is a JSON object, else a PluribusError (a corrupt config.json)."""
    path = folder / "config.json"
    config = read_json(path, "model config", "re-save or re-download the model")
    if not isinstance(config, dict):
        raise PluribusError(f"model config '{path}' is not a JSON object (corrupt config.json); re-save or "
                            "re-download the model")
    return config
