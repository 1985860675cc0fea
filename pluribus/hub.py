"""Export: a Hub-ready folder (weights or adapter, tokenizer, model card) and its push with huggingface_hub.

The card's metadata follows the Hub's model-card fields (``base_model``, ``base_model_relation``,
``datasets``, ``model-index`` results); the token is read from the environment and never written to a log,
a card or an error message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


def _base_model(folder: Path, kind: str) -> str | None:
    if kind == "adapter":
        cfg = json.loads((folder / "adapter_config.json").read_text())
        return cfg.get("base_model_name_or_path")
    record = folder / "training_record.json"
    if record.is_file():
        return json.loads(record.read_text()).get("base_model")
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
    """Write a Hub-ready folder at ``out`` from an adapter or model folder ``source`` (atomically)."""
    source = Path(source)
    if not source.is_dir():
        raise PluribusError(f"export source '{source}' does not exist")
    kind = _detect(source)
    weights = list(source.glob("*.safetensors"))
    if not weights:
        raise PluribusError(f"'{source}' has no .safetensors weights to export")
    if isinstance(eval_results, str | Path):
        path = Path(eval_results)
        eval_results = json.loads(path.read_text()) if path.is_file() else None
    record_path = source / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    merge_path = source / "merge_recipe.yaml"
    merge_recipe = merge_path.read_text() if merge_path.is_file() else None
    relation = "merge" if merge_recipe else ("adapter" if kind == "adapter" else "finetune")
    base = _base_model(source, kind)
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


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, token_env: str | None = None) -> str:
    """Upload an export folder to ``repo_id`` and return the repo URL. The token comes from the environment."""
    from huggingface_hub import HfApi

    token = None
    for name in ([token_env] if token_env else []) + list(TOKEN_ENVS):
        if name and os.environ.get(name):
            token = os.environ[name]
            break
    if token is None:
        raise PluribusError(f"no Hub token: set {token_env or 'HF_TOKEN'} in the environment (it is never printed)")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload with pluribus export")
    except Exception as e:
        raise PluribusError(f"push to '{repo_id}' failed: {redact(f'{type(e).__name__}: {e}')}") from None
    return str(url)
