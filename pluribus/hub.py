"""Export: a Hub-ready folder (weights or adapter, tokenizer, model card) and its push with huggingface_hub.

The card's metadata follows the Hub's model-card fields (``base_model``, ``base_model_relation``,
``datasets``, ``model-index`` results); the token is read from the environment and never written to a log,
a card or an error message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pluribus.errors import PluribusError
from pluribus.io import atomic_dir

TOKEN_ENVS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")

_COPY_PATTERNS = (
    "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "training_record.json", "merge_recipe.yaml", "merge_report.json",
)


def redact(text: str) -> str:
    """Remove Hub tokens (the env's own and anything shaped like ``hf_...``) from ``text``."""
    for name in TOKEN_ENVS:
        value = os.environ.get(name)
        if value:
            text = text.replace(value, "***")
    return _TOKEN_RE.sub("hf_***", text)


def _detect(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    raise PluribusError(f"'{folder}' is neither a PEFT adapter folder nor a save_pretrained model folder")


def check_weights(folder: Path, kind: str) -> None:
    """Read every tensor of every .safetensors file of ``folder``: a truncated file or a NaN/Inf is refused.

    Tensor by tensor, so a large model never sits in memory whole; the messages are merge's own.
    """
    from safetensors import SafetensorError, safe_open

    from pluribus.merge.methods import check_finite

    for path in sorted(folder.glob("*.safetensors")):
        if path.is_dir():
            raise PluribusError(f"{kind} weights '{path}' is a folder, not a file; re-save the {kind}")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    check_finite(f.get_tensor(key), f"{path}:{key}")
        except (SafetensorError, OSError, ValueError) as e:
            raise PluribusError(f"{kind} weights '{path}' are corrupt or truncated ({e}); re-save the {kind}") from None


_NUMBERS = ("accuracy", "accuracy_low", "accuracy_high", "tokens_per_problem", "seconds_per_problem", "change")


def check_eval_results(results: Any, where: str) -> dict[str, Any]:
    """``results`` if it has the shape of a results.json of ``pluribus eval`` (what the card reads), else a
    PluribusError naming ``where``."""
    def numbers(m: Any) -> bool:
        return isinstance(m, dict) and all(isinstance(m[k], int | float) for k in _NUMBERS if k in m)

    systems = results.get("systems") if isinstance(results, dict) else None
    robustness = results.get("robustness") or {} if isinstance(results, dict) else {}
    if not (isinstance(systems, dict) and all(numbers(m) for m in systems.values()) and isinstance(robustness, dict)
            and all(isinstance(k, dict) and all(numbers(r) for r in k.values()) for k in robustness.values())):
        raise PluribusError(f"eval results {where} is not a results.json written by `pluribus eval` "
                            "(it needs a 'systems' mapping of accuracies); pass <run>/eval/results.json")
    return results


def read_eval_results(path: str | Path) -> dict[str, Any]:
    """The results.json of ``pluribus eval`` at ``path``, or a PluribusError: missing, not JSON, another file."""
    from pluribus.config import read_text_file

    text = read_text_file(path, "eval results file")
    try:
        results = json.loads(text)
    except json.JSONDecodeError as e:
        raise PluribusError(f"eval results '{path}' is not valid JSON (line {e.lineno}); "
                            "pass the results.json that `pluribus eval` wrote") from None
    return check_eval_results(results, f"'{path}'")


def _json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of the export source, or a PluribusError naming it (missing, not UTF-8, not JSON)."""
    from pluribus.config import read_text_file

    try:
        data = json.loads(read_text_file(path, what))
    except json.JSONDecodeError as e:
        raise PluribusError(f"{what} '{path}' is not valid JSON (line {e.lineno}); re-save it") from None
    if not isinstance(data, dict):
        raise PluribusError(f"{what} '{path}' is not a JSON object; re-save it")
    return data


def _base_model(folder: Path, kind: str) -> str | None:
    if kind == "adapter":
        from pluribus.models import read_adapter_config

        return read_adapter_config(folder).get("base_model_name_or_path")
    record = folder / "training_record.json"
    if record.is_file():
        return _json_file(record, "training record").get("base_model")
    return None


def _hub_name(ref: str | None) -> str | None:
    """A card's base_model must be a Hub id; local paths are left out (the card text still names them)."""
    if not ref:
        return None
    if ref == "smollm2-135m" or "smollm2-135m" in ref:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", ref) and not Path(ref).exists():
        return ref
    return None


def model_card(
    *,
    kind: str,
    base_model: str | None,
    relation: str,
    datasets: list[str],
    eval_results: dict[str, Any] | None,
    merge_recipe: str | None,
    training_record: dict[str, Any] | None,
    title: str,
) -> str:
    """The README.md of an export: YAML metadata the Hub reads, then what was done and measured."""
    meta: dict[str, Any] = {"library_name": "peft" if kind == "adapter" else "transformers", "tags": ["pluribus"]}
    hub_base = _hub_name(base_model)
    if hub_base:
        meta["base_model"] = hub_base
        meta["base_model_relation"] = relation
    if datasets:
        meta["datasets"] = datasets
    if eval_results:
        rows = [{"task": {"type": "text-generation"}, "dataset": {"name": eval_results.get("task", "held-out"),
                                                                  "type": "pluribus"},
                 "metrics": [{"type": "accuracy", "name": f"{system} accuracy", "value": round(float(m["accuracy"]), 4)}
                             for system, m in eval_results.get("systems", {}).items() if "accuracy" in m]}]
        meta["model-index"] = [{"name": title, "results": rows}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines.append(f"A {'LoRA adapter' if kind == 'adapter' else 'model'} made with pluribus"
                 + (f" from `{base_model}` ({relation})." if base_model else "."))
    if training_record:
        lines += ["", "## Training", "", "```json", json.dumps(training_record, indent=2, default=str)[:4000], "```"]
    if eval_results:
        n = eval_results.get("problems")
        lines += ["", "## Evaluation", "", f"{n} held-out problems of `{eval_results.get('task', '?')}`." if n else "",
                  "", "| system | accuracy | 95% interval | tokens / problem | seconds / problem |", "|---|---|---|---|---|"]
        for system, m in eval_results.get("systems", {}).items():
            interval = f"{m['accuracy_low']:.3f} - {m['accuracy_high']:.3f}" if "accuracy_low" in m else "-"
            lines.append(f"| {system} | {m.get('accuracy', float('nan')):.3f} | {interval} "
                         f"| {m.get('tokens_per_problem', 0):.0f} | {m.get('seconds_per_problem', 0):.2f} |")
        robust = [(system, kind, r) for system, kinds in (eval_results.get("robustness") or {}).items()
                  for kind, r in kinds.items()]
        if robust:
            lines += ["", "Robustness (the same problems perturbed, gold answers unchanged):", "",
                      "| system | perturbation | accuracy | change vs clean |", "|---|---|---|---|"]
            lines += [f"| {system} | {kind} | {r['accuracy']:.3f} | {r['change']:+.3f} |" for system, kind, r in robust]
    if merge_recipe:
        lines += ["", "## Merge recipe", "", "```yaml", merge_recipe.strip(), "```"]
    return redact("\n".join(lines) + "\n")


def export_folder(
    source: str | Path,
    out: str | Path,
    *,
    datasets: list[str] | None = None,
    eval_results: str | Path | dict[str, Any] | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hub-ready folder at ``out`` from an adapter or model folder ``source`` (atomically).

    Everything is checked before the folder is written: the source, every tensor of its weights, the eval
    results; a PluribusError names what is wrong.
    """
    from pluribus.config import read_text_file

    source = Path(source)
    if Path(out).exists() and not overwrite:  # before reading every tensor; atomic_dir checks it again
        raise FileExistsError(f"output '{out}' already exists; pass --overwrite to replace it")
    if source.is_file():
        raise PluribusError(f"export source '{source}' is a file, expected a model or adapter folder")
    if not source.is_dir():
        raise PluribusError(f"export source '{source}' does not exist")
    kind = _detect(source)
    weights = list(source.glob("*.safetensors"))
    if not weights:
        raise PluribusError(f"'{source}' has no .safetensors weights to export")
    base = _base_model(source, kind)  # an adapter's config is checked here, before its tensors are read
    if isinstance(eval_results, str | Path):
        eval_results = read_eval_results(eval_results)
    elif eval_results is not None:
        eval_results = check_eval_results(eval_results, "given")
    check_weights(source, kind)
    record_path = source / "training_record.json"
    record = _json_file(record_path, "training record") if record_path.is_file() else None
    merge_path = source / "merge_recipe.yaml"
    merge_recipe = read_text_file(merge_path, "merge recipe") if merge_path.is_file() else None
    relation = "merge" if merge_recipe else ("adapter" if kind == "adapter" else "finetune")
    card = model_card(kind=kind, base_model=base, relation=relation, datasets=datasets or [],
                      eval_results=eval_results, merge_recipe=merge_recipe, training_record=record,
                      title=title or source.name)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for pattern in _COPY_PATTERNS:
            for f in source.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if eval_results:
            (tmp / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
        (tmp / "README.md").write_text(card)
    return Path(out)


def hub_token(token_env: str | None = None) -> str:
    """The Hub token from ``token_env`` (else HF_TOKEN, HUGGING_FACE_HUB_TOKEN), or a PluribusError."""
    for name in ([token_env] if token_env else []) + list(TOKEN_ENVS):
        if name and os.environ.get(name):
            return os.environ[name]
    raise PluribusError(f"no Hub token: set {token_env or 'HF_TOKEN'} in the environment (it is never printed)")


def check_repo_id(repo_id: str) -> None:
    """A PluribusError unless ``repo_id`` is a valid Hub repo id (checked offline, before any work)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PluribusError(f"'{repo_id}' is not a valid Hub repo id; use namespace/name with letters, digits, "
                            "'-', '_' and '.'") from None


def check_push(repo_id: str, token_env: str | None = None) -> str:
    """Before anything is written: ``repo_id`` is a valid Hub id and a token is set; returns the token."""
    check_repo_id(repo_id)
    return hub_token(token_env)


@contextlib.contextmanager
def push_errors(repo_id: str) -> Iterator[None]:
    """Turn any failure of a Hub upload (network, auth, quota) into one line without the token."""
    try:
        yield
    except PluribusError:
        raise
    except Exception as e:
        raise PluribusError(f"push to '{repo_id}' failed: {redact(f'{type(e).__name__}: {e}')}") from None


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, token_env: str | None = None) -> str:
    """Upload an export folder to ``repo_id`` and return the repo URL. The token comes from the environment."""
    from huggingface_hub import HfApi

    api = HfApi(token=check_push(repo_id, token_env))
    with push_errors(repo_id):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload with pluribus export")
    return str(url)
