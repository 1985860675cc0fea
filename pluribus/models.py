"""Resolve a model reference (hub id, local folder, .gguf file, alias) to a local folder, and load it.

A GGUF file (the embedded SmolLM2 ships as one) is dequantized once into a cached bf16 safetensors
checkpoint (pluribus.gguf); from then on it is an ordinary local model that ``from_pretrained`` loads. Only
safetensors weights are ever loaded, each folder checked first (pluribus.weights), an adapter checked against its
base (pluribus.adapter), and ``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from pluribus.adapter import apply_adapter
from pluribus.errors import PluribusError
from pluribus.gguf import _file_key, cache_dir, dequantize_gguf, find_alias_file
from pluribus.modelref import ALIASES, EMBEDDED, ModelRef  # noqa: F401 (EMBEDDED: the default model, also named from here)
from pluribus.weights import _check_safetensors, _is_model_dir, check_finite_model, read_model_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

logger = logging.getLogger("pluribus.models")


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if offline:
            raise PluribusError(
                f"model '{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it "
                "on a machine with network (huggingface-cli download) or pass a local folder"
            ) from None
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as e:
            raise PluribusError(
                f"model '{repo_id}' is not cached and could not be downloaded ({type(e).__name__}); "
                "check the id and the network, or pass a local folder"
            ) from None
    if not _is_model_dir(path):
        raise PluribusError(f"hub model '{repo_id}' has no config.json; is it a model repository?")
    read_model_config(path)
    _check_safetensors(path, "hub model")
    return path


def resolve_model(name: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Return a local folder with config, tokenizer and safetensors weights for ``name``.

    ``name`` is an alias (``smollm2-135m``), a local folder, a ``.gguf`` file, or a Hugging Face id.
    Raises PluribusError naming what is missing and how to fix it. ``progress``: the bar of a first dequantization
    (off: none, ``--no-progress``).
    """
    ref = ModelRef.parse(name)
    if ref.form == "alias":
        gguf = find_alias_file(ref.text)
        return dequantize_gguf(gguf, cache_dir() / "models" / f"{ref.text}-{_file_key(gguf)}", progress=progress)
    if ref.form == "hub":
        return _resolve_hub_id(ref.text)
    path = ref.path
    assert path is not None  # every local form has one
    if ref.form == "folder":
        if not _is_model_dir(path):
            raise PluribusError(f"model folder '{path}' has no config.json; is it a save_pretrained folder?")
        read_model_config(path)
        _check_safetensors(path, "model folder")
        return path
    if ref.form == "gguf":
        return dequantize_gguf(path, cache_dir() / "models" / f"{path.stem}-{_file_key(path)}", progress=progress)
    if ref.form == "file":
        raise PluribusError(f"'{path}' is a file but not a .gguf model; pass a model folder, a .gguf file or an alias")
    if path.suffix == ".gguf":
        raise PluribusError(f"GGUF file '{path}' does not exist")
    known = ", ".join(sorted(ALIASES))
    raise PluribusError(
        f"model '{ref.text}' is not a local folder, a .gguf file, a known alias ({known}) or a hub id (org/name)"
    )


def require_tokenizer_files(folder: Path) -> None:
    """A PluribusError when a model folder holds no tokenizer files (a bare save_pretrained of the model)."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise PluribusError(
            f"model folder '{folder}' has no tokenizer files (tokenizer.json / tokenizer_config.json); copy them "
            "from the model it was made from (tokenizer.save_pretrained(folder))"
        )


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in a model folder, or a PluribusError when it has none or it cannot be read."""
    from transformers import AutoTokenizer

    require_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise PluribusError(
                f"the tokenizer of '{folder}' needs its own Python code; set trust_remote_code: true in the recipe "
                "only if you trust its authors"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PluribusError(
            f"the tokenizer files of '{folder}' cannot be loaded ({first}); re-save them with "
            "tokenizer.save_pretrained(folder)"
        ) from None


def load_model(
    name: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device: Any = None,
    adapter: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    padding_side: str = "left",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) for ``name`` (see ``resolve_model``), optionally with a PEFT adapter on top.

    ``device``: a device setting (auto, cpu, cuda, cuda:N; None: auto) or a torch.device, through the device policy
    (``pluribus.device``), which also picks the default ``dtype``: bf16 where the device computes it, else float32.
    ``quantize='nf4'`` loads 4-bit NF4 weights with bitsandbytes (QLoRA).
    The tokenizer gets a pad token (eos) if it has none, and ``padding_side`` (left, for batched generation).
    Weights holding NaN/Inf, a corrupt file or a missing tokenizer raise a PluribusError.
    """
    from transformers import AutoModelForCausalLM

    from pluribus import device as devices

    target = device if device is not None and not isinstance(device, str) else devices.resolve(device)
    folder = resolve_model(name)
    kwargs: dict[str, Any] = {"dtype": dtype or devices.dtype_for(target, "auto"), "use_safetensors": True,
                              "trust_remote_code": trust_remote_code}
    if quantize is not None:
        kwargs["quantization_config"] = nf4_config(quantize)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise PluribusError(
                f"model '{name}' needs its own Python code; set trust_remote_code: true in the recipe "
                "only if you trust its authors"
            ) from None
        raise
    check_finite_model(model, folder)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    model = devices.place(model, target)  # after the adapter: its weights go where the base goes
    model.eval()
    return model, tokenizer


def nf4_config(kind: str = "nf4") -> Any:
    """A BitsAndBytesConfig for 4-bit NF4 (QLoRA), or a PluribusError with the install hint."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind != "nf4":
        raise PluribusError(f"quantize='{kind}' is not supported; use 'nf4' (4-bit NormalFloat, QLoRA)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PluribusError("QLoRA (4-bit) needs bitsandbytes: run `pip install 'bitsandbytes>=0.45'`")
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def list_models() -> list[dict[str, str]]:
    """Aliases with their source and whether they resolve offline now (does not dequantize anything)."""
    rows = []
    for alias, spec in ALIASES.items():
        try:
            gguf = find_alias_file(alias)
            cached = cache_dir() / "models" / f"{alias}-{_file_key(gguf)}"
            status = f"cached: {cached}" if _is_model_dir(cached) else "available (dequantized on first use)"
        except PluribusError:
            status = f"missing: {spec.install}"
        rows.append({"alias": alias, "source": f"{spec.package}/{spec.filename} ({spec.hub_id})", "status": status})
    return rows
