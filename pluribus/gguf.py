"""GGUF checkpoints: an alias's packaged file, dequantized once into the cache folder as a transformers model."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pluribus.errors import PluribusError
from pluribus.modelref import ALIASES
from pluribus.weights import _is_model_dir


@contextlib.contextmanager
def _rich_gguf_bar(enabled: bool = True) -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar (which no transformers setting turns off): ours instead,
    on a terminal, and none when ``enabled`` is off (``--no-progress``)."""
    import sys

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from rich.console import Console
    from rich.progress import track

    def bar(items: Any, desc: str = "", **_: Any) -> Any:
        return track(items, description="dequantizing the GGUF model (once)", transient=True,
                     disable=not (enabled and sys.stderr.isatty()), console=Console(stderr=True))

    own = gguf_utils.tqdm
    gguf_utils.tqdm = bar
    try:
        yield
    finally:
        gguf_utils.tqdm = own


def dequantize_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder (config, tokenizer, weights) at ``out_dir``.

    Written to a temporary folder beside ``out_dir`` and renamed at the end, so ``out_dir`` is either absent
    or complete. If another process finished first, its folder is kept and ours is discarded. ``progress``: a bar
    on the terminal while it reads the file (off: none).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if _is_model_dir(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as e:  # a truncated or foreign file surfaces here
            raise PluribusError(f"'{gguf_path}' is not a readable GGUF model file ({type(e).__name__}: {e})") from None
        config.dtype = torch.bfloat16
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        with _rich_gguf_bar(progress):
            parsed = load_gguf_checkpoint(
                str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.bfloat16
            )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        state = parsed["tensors"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise PluribusError(
                f"GGUF '{gguf_path}' does not map onto {type(model).__name__}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "pluribus_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "dtype": "bfloat16", "dequantized_by": "pluribus"}, indent=2)
        )
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _is_model_dir(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cache_dir() -> Path:
    """Where dequantized checkpoints live: $PLURIBUS_CACHE, else $XDG_CACHE_HOME/pluribus, else ~/.cache/pluribus."""
    env = os.environ.get("PLURIBUS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pluribus"


def find_alias_file(alias: str) -> Path:
    """The GGUF file of an alias inside its installed package, or a PluribusError with the install command."""
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise PluribusError(f"model alias '{alias}' needs the package {spec.package}: run `{spec.install}`")
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.filename
        if candidate.is_file():
            return candidate
    raise PluribusError(
        f"package {spec.package} is installed but has no {spec.filename}; reinstall it: `{spec.install}`"
    )


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
