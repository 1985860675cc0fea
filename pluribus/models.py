"""Resolve a model reference (hub id, local folder, .gguf file, alias) to a local folder, and load it.

A GGUF file (the embedded SmolLM2 ships as one) is dequantized once into a cached bf16 safetensors
checkpoint; from then on it is an ordinary local model that ``from_pretrained`` loads. Only safetensors
weights are ever loaded, and ``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pluribus.errors import PluribusError
from pluribus.io import read_json, read_json_object
from pluribus.modelref import ALIASES, EMBEDDED, ModelRef  # noqa: F401 (EMBEDDED: the default model, also named from here)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# config.json keys that differ between copies of one model (who saved it, in which dtype)
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}

logger = logging.getLogger("pluribus.models")


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


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


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


@contextlib.contextmanager
def _rich_gguf_bar() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar (which no transformers setting turns off): ours instead."""
    import sys

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from rich.console import Console
    from rich.progress import track

    def bar(items: Any, desc: str = "", **_: Any) -> Any:
        return track(items, description="dequantizing the GGUF model (once)", transient=True,
                     disable=not sys.stderr.isatty(), console=Console(stderr=True))

    own = gguf_utils.tqdm
    gguf_utils.tqdm = bar
    try:
        yield
    finally:
        gguf_utils.tqdm = own


def dequantize_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder (config, tokenizer, weights) at ``out_dir``.

    Written to a temporary folder beside ``out_dir`` and renamed at the end, so ``out_dir`` is either absent
    or complete. If another process finished first, its folder is kept and ours is discarded.
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
        with _rich_gguf_bar():
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


def resolve_model(name: str | os.PathLike[str]) -> Path:
    """Return a local folder with config, tokenizer and safetensors weights for ``name``.

    ``name`` is an alias (``smollm2-135m``), a local folder, a ``.gguf`` file, or a Hugging Face id.
    Raises PluribusError naming what is missing and how to fix it.
    """
    ref = ModelRef.parse(name)
    if ref.form == "alias":
        gguf = find_alias_file(ref.text)
        return dequantize_gguf(gguf, cache_dir() / "models" / f"{ref.text}-{_file_key(gguf)}")
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
        return dequantize_gguf(path, cache_dir() / "models" / f"{path.stem}-{_file_key(path)}")
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
    device: str = "cpu",
    adapter: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    padding_side: str = "left",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) for ``name`` (see ``resolve_model``), optionally with a PEFT adapter on top.

    ``dtype`` defaults to bf16; ``quantize='nf4'`` loads 4-bit NF4 weights with bitsandbytes (QLoRA).
    The tokenizer gets a pad token (eos) if it has none, and ``padding_side`` (left, for batched generation).
    Weights holding NaN/Inf, a corrupt file or a missing tokenizer raise a PluribusError.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.bfloat16, "use_safetensors": True,
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
    model.to(device)
    if adapter is not None:
        model = apply_adapter(model, adapter)
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


def read_model_config(folder: Path) -> dict[str, Any]:
    """The config.json of a model folder if it is a JSON object, else a PluribusError (a corrupt config.json)."""
    path = folder / "config.json"
    config = read_json(path, "model config", "re-save or re-download the model")
    if not isinstance(config, dict):
        raise PluribusError(f"model config '{path}' is not a JSON object (corrupt config.json); re-save or "
                            "re-download the model")
    return config


def _recorded_base_folder(base: str) -> Path | None:
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


def _config_identity(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in config.items() if k not in _CONFIG_NOISE} if isinstance(config, dict) else None


_unchecked_bases: set[str] = set()  # adapters already warned about, so a debate warns once per adapter


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
    theirs = _recorded_base_folder(base)
    if theirs is None:
        if str(adapter) not in _unchecked_bases:
            _unchecked_bases.add(str(adapter))
            logger.warning("adapter '%s' records base '%s', which is not on this machine; cannot check that it "
                           "belongs to '%s'", adapter, base or "(none)", model_folder)
        return cfg
    if theirs.resolve() == model_folder.resolve():
        return cfg
    a, b = _config_identity(theirs), _config_identity(model_folder)
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
