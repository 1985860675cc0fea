"""mergekit's YAML translated into a pluribus MergeSpec (same math under ``mergekit: true``), or kept for mergekit.

What pluribus does not implement (other methods, slices, gradient parameters, tokenizer surgery) becomes
``method: mergekit`` with the YAML verbatim, run by mergekit itself with its local paths made absolute.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pluribus.errors import PluribusError, not_finite, validation_message
from pluribus.merge.registry import METHODS, WEIGHT_DEFAULT
from pluribus.merge.spec import MergeInput, MergeSpec
from pluribus.modelref import ModelRef

#: mergekit methods translated to pluribus (same math under ``mergekit: true``), by the registry's ``mergekit``
#: names; others run in mergekit.
MERGEKIT_NATIVE = {m.mergekit: m.name for m in METHODS.values() if m.mergekit}


def _scalar(value: Any, where: str) -> float | bool | None:
    """A mergekit parameter pluribus can take: a plain number/bool. Gradients and filters return None."""
    if isinstance(value, bool | int | float):
        return value
    return None


#: mergekit's parameter names of the methods pluribus runs: (global only, also per model); mergekit itself
#: ignores unknown names, so a typo would silently change the merge.
_GTA = ({"int8_mask", "normalize", "rescale", "lambda"}, {"weight", "density"})
MERGEKIT_PARAMETERS: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"normalize"}, {"weight"}),
    "task_arithmetic": _GTA, "ties": _GTA, "dare_linear": _GTA, "dare_ties": _GTA,
}


def _mergekit_parameters(method: Any) -> tuple[set[str], set[str]] | None:
    """The parameter names ``method`` accepts (global only, per model), from mergekit's registry when needed."""
    if method in MERGEKIT_PARAMETERS:
        return MERGEKIT_PARAMETERS[method]
    try:
        from mergekit.merge_methods import get

        spec = get(str(method)).spec
    except Exception:  # no mergekit, another version's API, or an unknown method: mergekit will say
        return None
    return {p.name for p in spec.shared_parameters}, {p.name for p in spec.input_parameters}


def _nonfinite(value: Any) -> float | None:
    """The first NaN/Inf in a mergekit parameter value (a number, a gradient list, a filter mapping), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for bad in map(_nonfinite, items) if bad is not None), None)


def check_mergekit_parameters(data: dict[str, Any]) -> None:
    """Refuse NaN/Inf parameter values, and names that mergekit's ``merge_method`` does not know (mergekit would
    ignore them)."""
    method = data.get("merge_method")
    names = _mergekit_parameters(method)
    shared, per_model = names or (set(), set())
    sections: list[tuple[str, Any, set[str]]] = [("parameters", data.get("parameters"), shared | per_model)]
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, dict):
            sections.append((f"models.{i} ({m.get('model')}) parameters", m.get("parameters"), per_model))
    for i, sl in enumerate(data.get("slices") or []):
        for j, src in enumerate(sl.get("sources") or [] if isinstance(sl, dict) else []):
            if isinstance(src, dict):
                sections.append((f"slices.{i}.sources.{j} ({src.get('model')}) parameters", src.get("parameters"),
                                 per_model))
    for where, params, _ in sections:
        for key, value in params.items() if isinstance(params, dict) else ():
            bad = _nonfinite(value)
            if bad is not None:
                raise PluribusError(f"mergekit config: {where}: {not_finite(key, bad)}")
    if names is None:
        return
    for where, params, allowed in sections:
        unknown = sorted(set(params) - allowed) if isinstance(params, dict) else []
        if unknown:
            raise PluribusError(
                f"mergekit config: {where}: unknown parameter '{unknown[0]}' for merge_method '{method}'; "
                f"accepted: {', '.join(sorted(allowed)) or '(none)'}"
            )


def from_mergekit(data: dict[str, Any]) -> MergeSpec:
    """Translate a mergekit config; what pluribus does not implement becomes ``method: mergekit``."""
    check_mergekit_parameters(data)
    try:
        return _translate_mergekit(data)
    except ValidationError as e:
        raise PluribusError(f"mergekit config: {validation_message(e.errors(), quoted=False)}") from None


def _translate_mergekit(data: dict[str, Any]) -> MergeSpec:
    """``from_mergekit`` without its checks (a ValidationError escapes)."""
    fallback = MergeSpec(method="mergekit", mergekit_yaml=data)
    method = data.get("merge_method")
    if method not in MERGEKIT_NATIVE or "slices" in data or "modules" in data or data.get("tokenizer"):
        return fallback
    known_top = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
    if set(data) - known_top or not isinstance(data.get("models"), list):
        return fallback
    glob = _global_parameters(data.get("parameters") or {})
    if glob is None:
        return fallback
    ours = METHODS[MERGEKIT_NATIVE[method]]
    # rescale other than mergekit's default for the method (DARE's, on) changes the math beyond what pluribus mirrors
    default_rescale = "drop" in ours.options
    if "rescale" in glob and bool(glob["rescale"]) != default_rescale:
        return fallback
    base = data.get("base_model")
    refs = [str(e.get("model")) for e in data["models"] if isinstance(e, dict)]
    if ours.of_weights and base is not None and str(base) not in refs:
        # mergekit refuses it; merged here it would silently average the models without the base
        raise PluribusError(f"mergekit config: linear averages the models listed; base_model '{base}' is not among "
                            "models: add it to models (with a weight) or remove base_model")
    inputs = []
    for entry in data["models"]:
        if not isinstance(entry, dict) or "model" not in entry:
            return fallback
        if base is not None and str(entry["model"]) == str(base) and not ours.of_weights:
            continue  # mergekit lists the base among models; task-vector methods skip it
        one = _model_input(entry, glob, ours.options)
        if one is None:
            return fallback
        inputs.append(one)
    dtype = data.get("dtype")
    out_dtype = data.get("out_dtype") or (dtype if dtype in ("float32", "float16", "bfloat16") else None)
    return MergeSpec(
        method=ours.name,
        inputs=inputs,
        base=str(base) if base is not None else None,
        output="model",
        lam=float(glob.get("lambda", 1.0)),
        normalize=glob.get("normalize"),
        mergekit=True,
        dtype=dtype if dtype in ("float32", "float64", "bfloat16", "float16") else "auto",
        out_dtype=out_dtype,
        tokenizer_source=data.get("tokenizer_source"),
    )


def _global_parameters(params: Any) -> dict[str, Any] | None:
    """A mergekit config's top-level ``parameters`` as scalars; None where one is not a scalar or not one pluribus
    mirrors (the config then goes to mergekit itself, which says what is wrong with it)."""
    if not isinstance(params, dict):
        return None
    glob: dict[str, Any] = {}
    for key, value in params.items():
        v = _scalar(value, key)
        if v is None or key not in {"lambda", "normalize", "density", "weight", "int8_mask", "rescale"}:
            return None
        glob[key] = v
    return glob


def _model_input(entry: dict[str, Any], glob: dict[str, Any], reads: tuple[str, ...]) -> MergeInput | None:
    """One entry of a mergekit config's ``models`` as a pluribus input (its parameters over the global ones, the
    method's option names ``reads``); None where its parameters are not ones pluribus mirrors."""
    p = entry.get("parameters") or {}
    if not isinstance(p, dict):
        return None
    vals = {k: _scalar(v, k) for k, v in p.items()}
    if any(v is None for v in vals.values()) or set(vals) - {"weight", "density"}:
        return None
    weight = float(vals.get("weight", glob.get("weight", WEIGHT_DEFAULT)))
    density = vals.get("density", glob.get("density"))
    # mergekit declares density for every task-arithmetic method but reads it in linear / task_arithmetic
    # in none; DARE's keep rate is 1 - drop
    model = ModelRef.parse(str(entry["model"]), adapter=True)
    return MergeInput(
        path=model.text,
        adapter=model.adapter,
        weight=weight,
        density=float(density) if density is not None and "density" in reads else None,
        drop=1.0 - float(density) if density is not None and "drop" in reads else None,
    )


def mergekit_local_paths(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a mergekit config with its local model paths absolute, as pluribus reads them (from the CWD).

    mergekit runs in a temporary folder and takes any name that is no folder there for a Hub id; a path that
    exists nowhere (and is no hub id ``org/name``) is refused here instead, naming it.
    """
    from pluribus.models import resolve_model

    def local(text: str, where: str) -> str:
        ref = ModelRef.parse(text)
        if ref.form == "alias":
            return str(resolve_model(text))
        if ref.is_local:
            return str(Path(text).expanduser().resolve())
        if ref.form == "missing":
            raise PluribusError(f"mergekit config: {where} '{text}' does not exist (no such local folder, "
                                "and a hub id looks like org/name)")
        return text

    def refs(value: Any, where: str) -> Any:
        if not isinstance(value, str):
            return value  # mergekit's structured references are passed as they are
        ref = ModelRef.parse(value, adapter=True)  # mergekit's `model+lora`
        model = local(ref.text, where)
        return f"{model}+{local(ref.adapter, where)}" if ref.adapter else model

    out = copy.deepcopy(data)
    if "base_model" in out:
        out["base_model"] = refs(out["base_model"], "base_model")
    for i, m in enumerate(out.get("models") or []):
        if isinstance(m, dict) and "model" in m:
            m["model"] = refs(m["model"], f"models.{i}.model")
    for i, sl in enumerate(out.get("slices") or []):
        for j, src in enumerate(sl.get("sources") or [] if isinstance(sl, dict) else []):
            if isinstance(src, dict) and "model" in src:
                src["model"] = refs(src["model"], f"slices.{i}.sources.{j}.model")
    # a tokenizer source is also "base" / "union" / "model:..."; only an existing folder is rewritten
    tok = out.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union") and Path(tok).expanduser().is_dir():
        out["tokenizer_source"] = str(Path(tok).expanduser().resolve())
    return out
