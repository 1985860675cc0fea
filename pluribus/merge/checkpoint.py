"""A safetensors checkpoint read without loading it: headers, one tensor at a time, and what identifies a base.

Shared by the full-model merge (merge/full.py), the adapter merge (merge/adapters.py, which reads a base's values
and checks an adapter against its base) and LoRA extraction.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pluribus.errors import PluribusError

# safetensors dtype codes <-> torch
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


def local_model(ref: str | Path) -> Path:
    """A model reference as a local folder: a folder as is; an alias / .gguf / hub id via pluribus.models."""
    from pluribus.modelref import ModelRef
    from pluribus.models import resolve_model

    parsed = ModelRef.parse(ref)
    if parsed.form == "folder" and parsed.path is not None:
        return parsed.path
    if parsed.form == "missing" and parsed.path is not None and parsed.path.suffix != ".gguf":
        raise PluribusError(f"input '{ref}' does not exist; check the path in the merge config")

    return resolve_model(str(ref))


def read_config(folder: Path) -> dict[str, Any] | None:
    """A model folder's config.json (None when it has none); an unreadable or non-object one is a PluribusError."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PluribusError(f"model config '{cfg}' is not valid JSON ({e}); re-save the model") from None
    if not isinstance(data, dict):
        raise PluribusError(f"model config '{cfg}' is not a JSON object (got {type(data).__name__}); re-save the model")
    return data


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its JSON header (no data read)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise PluribusError(f"'{file}' is not a readable safetensors file ({e}); re-save or re-download it") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise PluribusError(f"'{file}' tensor {name} has dtype {meta.get('dtype')}, which pluribus cannot merge")
        start, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise PluribusError(f"'{file}' is truncated (tensor {name} ends past the file); re-save or re-download it")
        out[name] = TensorInfo(file, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + start, 8 + n + end)
    return out


class Checkpoint:
    """A model folder's safetensors (one file or shards + index), read tensor by tensor with plain reads.

    Plain ``readinto`` rather than mmap keeps resident memory to the tensors actually held.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise PluribusError(f"model folder '{self.folder}' does not exist")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError):
                raise PluribusError(f"index '{index}' is corrupt; re-save the model") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise PluribusError(
                f"model folder '{self.folder}' has no .safetensors weights (pluribus never reads pickle checkpoints); "
                "re-save it with save_pretrained(safe_serialization=True)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise PluribusError(f"model folder '{self.folder}' is missing shard {name} named by its index")
            self.tensors.update(read_header(path))
        self._handles: dict[Path, BinaryIO] = {}

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        f = self._handles.get(info.file)
        if f is None:
            f = self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115 (kept open across calls)
        buf = bytearray(info.end - info.start)
        f.seek(info.start)
        if f.readinto(buf) != len(buf):
            raise PluribusError(f"'{info.file}' is truncated at tensor {name}; re-save or re-download it")
        if not buf:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def weights_fingerprint(folder: Path, sample: int = 4096) -> str:
    """A fingerprint of a model folder's weights: each tensor's name, dtype, shape and the bytes at its start,
    middle and end (``sample`` each), hashed. Equal for the same weights wherever they are stored (a copy, a
    re-sharded save); it differs for two models whose tensors differ at any of those places, which any fine-tune
    does (a full one, or a merged LoRA, which changes every entry of the weights it adapts). Reads ~12 KB a tensor."""
    import hashlib

    ck = Checkpoint(folder)
    digest = hashlib.sha256()
    try:
        for name in sorted(ck.tensors):
            info = ck.tensors[name]
            digest.update(f"{name}|{info.dtype}|{info.shape}|".encode())
            f = ck._handles.get(info.file) or ck._handles.setdefault(info.file, open(info.file, "rb"))  # noqa: SIM115
            size = info.end - info.start
            for at in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
                f.seek(info.start + at)
                digest.update(f.read(min(sample, size - at)))
    finally:
        ck.close()
    return digest.hexdigest()


def base_identity(ref: str | None) -> tuple[str, str] | None:
    """What identifies the base model an adapter records: its config.json (less names and versions) and its
    weights fingerprint, when ``ref`` (a path, an alias, a cached hub id) is on this machine; else None."""
    from pluribus.adapter import config_identity, recorded_base_folder

    folder = recorded_base_folder(ref or "")
    if folder is None:
        return None
    config = config_identity(folder)
    try:
        weights = weights_fingerprint(folder)
    except PluribusError:
        return None  # no readable safetensors (a pickle-only folder): nothing to compare by
    return json.dumps(config, sort_keys=True), weights


def check_same_weights(adapter: Any, model: Path) -> None:
    """Refuse applying ``adapter`` (``adapters.Adapter``) to ``model`` when the base it records is on this machine
    and holds other weights: a fine-tune of the base has the same config.json, which adapter.check_adapter compares."""
    from pluribus.adapter import recorded_base_folder

    recorded = recorded_base_folder(adapter.base or "")
    if recorded is None or recorded.resolve() == model.resolve():
        return
    mine, theirs = base_identity(adapter.base), base_identity(str(model))
    if mine is not None and theirs is not None and mine[1] != theirs[1]:
        raise PluribusError(
            f"adapter '{adapter.path}' was trained on base '{adapter.base}', whose weights differ from the model "
            f"'{model}' (same config.json); use the adapter's base model, or pass --no-check-base if that is intended"
        )
