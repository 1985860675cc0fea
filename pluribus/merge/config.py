"""Merge configs: the typed pluribus merge spec, and mergekit's YAML translated into it (or handed to mergekit).

A pluribus merge YAML::

    method: ties                 # cat | svd | linear | task_arithmetic | magnitude | ties | dare_linear | dare_ties | pcb
    base: path/to/base           # full-model merges, and folding adapters into a model
    inputs:
      - {path: runs/a/adapters/rsft, weight: 1.0}
      - {path: path/to/base, adapter: runs/b/adapters/rl, weight: 0.5}   # a `base + adapter` input
    density: 0.5                 # TIES / magnitude / PCB: fraction kept (DARE takes drop instead)
    rank: 64                     # adapter output rank (or energy: 0.99 for a per-module rank)

An option a method does not read is refused by name (see ``METHOD_OPTIONS``): it would change nothing.

A mergekit YAML (``merge_method``, ``models``, ``base_model``, ``parameters``, ``dtype``) is translated with
``mergekit: true`` so the result matches mergekit's; anything pluribus does not implement (other methods,
slices, gradient parameters, tokenizer surgery) is kept verbatim and run by mergekit itself.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pluribus.errors import PluribusError, not_finite, validation_message
from pluribus.io import read_yaml
from pluribus.modelref import ModelRef

MethodName = Literal[
    "cat", "svd", "linear", "task_arithmetic", "magnitude", "ties", "dare_linear", "dare_ties", "pcb", "mergekit"
]
#: mergekit methods translated to pluribus (same math under ``mergekit: true``); others run in mergekit.
MERGEKIT_NATIVE = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}


#: The options each method reads; any other one given is refused (an option without effect is a silent wrong
#: result). rank/energy shape an adapter output; run_merge refuses them for model outputs.
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "cat": frozenset(),
    "svd": frozenset({"rank", "energy"}),
    "linear": frozenset({"rank", "energy", "normalize"}),
    "task_arithmetic": frozenset({"rank", "energy", "normalize"}),
    "magnitude": frozenset({"rank", "energy", "density", "trim", "normalize"}),
    "ties": frozenset({"rank", "energy", "density", "trim", "normalize"}),
    "dare_linear": frozenset({"rank", "energy", "drop", "normalize"}),
    "dare_ties": frozenset({"rank", "energy", "drop", "normalize"}),
    "pcb": frozenset({"rank", "energy", "density"}),
}
_OPTION_HINTS = {
    ("cat", "rank"): "cat writes the exact sum at the summed rank; use method svd for a rank-k result",
    ("cat", "energy"): "cat writes the exact sum at the summed rank; use method svd for a per-module rank",
}


def _refusal(method: str, option: str, value: Any) -> str:
    if method.startswith("dare") and option == "density":
        keep = f" (drop: {1 - value:g})" if isinstance(value, int | float) else ""
        return (f"density has no effect in method '{method}': DARE drops each entry with probability drop "
                f"(mergekit's density is 1 - drop); give drop instead{keep}")
    hint = _OPTION_HINTS.get((method, option))
    users = ", ".join(m for m, opts in METHOD_OPTIONS.items() if option in opts) or "no method"
    return f"{option} has no effect in method '{method}' ({hint or f'it applies to {users}'}); remove it"


def _require_finite(value: float | None, name: str) -> None:
    """NaN and Inf parse as floats and pass every range check (NaN compares false): refuse them by name."""
    if value is not None and not math.isfinite(value):
        raise ValueError(not_finite(name, value))


class MergeInput(BaseModel):
    """One expert: a PEFT adapter folder, a model folder, or a model plus an adapter (``base + adapter``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Adapter folder or model folder (safetensors).")
    adapter: str | None = Field(None, description="Adapter applied on top of `path` (a `base + adapter` input).")
    weight: float = Field(1.0, description="w_t of this expert.")
    density: float | None = Field(None, description="Fraction kept by trimming for this expert (overrides).")
    drop: float | None = Field(None, description="DARE drop rate p for this expert (overrides).")

    @model_validator(mode="after")
    def _finite(self) -> MergeInput:
        for name in ("weight", "density", "drop"):
            _require_finite(getattr(self, name), f"{name} of '{self.path}'")
        return self

    @property
    def label(self) -> str:
        return f"{self.path}+{self.adapter}" if self.adapter else self.path


class MergeSpec(BaseModel):
    """A whole merge. Adapters in -> an adapter out (or a model with ``output: model``); models in -> a model."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    method: MethodName = Field(description="Merge method; `mergekit` runs `mergekit_yaml` with mergekit itself.")
    inputs: list[MergeInput] = Field(default_factory=list, description="The experts to merge.")
    base: str | None = Field(None, description="Base model folder (full merges; folding adapters).")
    output: Literal["auto", "adapter", "model"] = Field("auto", description="auto: adapter for adapters, else model.")
    rank: int | None = Field(None, ge=1, description="Output adapter rank (svd, ties, dare on adapters).")
    energy: float | None = Field(None, description="Keep this energy fraction, in (0, 1]: per-module ranks.")
    density: float | None = Field(None, description="TIES / magnitude: fraction of entries kept, in (0, 1].")
    drop: float | None = Field(None, description="DARE: drop rate p, in [0, 1).")
    lam: float = Field(1.0, alias="lambda", description="Scale lambda of the merged task vector.")
    normalize: bool | None = Field(None, description="Divide by summed weights; None: the method's default.")
    trim: Literal["tensor", "global"] = Field("tensor", description="TIES trimming per tensor or over the model.")
    mergekit: bool = Field(False, description="Reproduce mergekit 0.1.5's semantics (weighted vote, L1 rescale).")
    seed: int = Field(0, description="Seed of the DARE masks.")
    dtype: Literal["float32", "float64", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Arithmetic dtype of full merges; auto: each tensor's own dtype (mergekit's default)."
    )
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="None: the base's dtype.")
    shard_size: str = Field("1GB", description="Max output shard size (e.g. 500MB, 2GB).")
    tokenizer_source: str | None = Field(None, description="Folder to copy the tokenizer from (default: base).")
    check_base: bool = Field(True, description="Refuse adapters of different bases (compared by contents where "
                                               "they are on this machine; CLI --no-check-base).")
    mergekit_yaml: dict[str, Any] | None = Field(None, description="Raw mergekit config (method: mergekit).")

    @model_validator(mode="after")
    def _check(self) -> MergeSpec:
        for name, value in (("lambda", self.lam), ("energy", self.energy), ("density", self.density),
                            ("drop", self.drop)):
            _require_finite(value, name)
        if self.method == "mergekit":
            if not self.mergekit_yaml:
                raise ValueError("method 'mergekit' needs mergekit_yaml (a mergekit config mapping)")
            extra = next((k for k in ("inputs", "rank", "energy", "density", "drop", "normalize", "base")
                          if getattr(self, k) not in (None, [])), None)
            if extra is not None:
                raise ValueError(f"{extra} has no effect in method 'mergekit', which runs mergekit_yaml as it is; "
                                 "put it in mergekit_yaml")
            return self
        if not self.inputs:
            raise ValueError("inputs is empty; list at least one adapter or model to merge")
        if self.rank is not None and self.energy is not None:
            raise ValueError("give either rank or energy, not both")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy = {self.energy} is out of range; it must be in (0, 1]")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density = {self.density} is out of range; it must be in (0, 1]")
        if self.drop is not None and not 0 <= self.drop < 1:
            raise ValueError(f"drop = {self.drop} is out of range; it must be in [0, 1)")
        for i, inp in enumerate(self.inputs):
            if inp.density is not None and not 0 < inp.density <= 1:
                raise ValueError(f"inputs.{i}.density = {inp.density} is out of range; it must be in (0, 1]")
            if inp.drop is not None and not 0 <= inp.drop < 1:
                raise ValueError(f"inputs.{i}.drop = {inp.drop} is out of range; it must be in [0, 1)")
        given: dict[str, Any] = {k: getattr(self, k) for k in ("rank", "energy", "density", "drop", "normalize")
                                 if getattr(self, k) is not None}
        if self.trim != "tensor":
            given["trim"] = self.trim
        for inp in self.inputs:
            for k in ("density", "drop"):
                if getattr(inp, k) is not None:
                    given.setdefault(k, getattr(inp, k))
        allowed = METHOD_OPTIONS[self.method]
        for option, value in given.items():
            if option not in allowed:
                raise ValueError(_refusal(self.method, option, value))
        if self.method == "pcb" and self.mergekit:
            raise ValueError("method 'pcb' has no mergekit counterpart (mergekit 0.1.5 lacks it); drop mergekit: true")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


# ------------------------------------------------------------------------------------------ mergekit


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
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        return fallback  # mergekit says what is wrong with it
    glob: dict[str, Any] = {}
    for key, value in params.items():
        v = _scalar(value, key)
        if v is None or key not in {"lambda", "normalize", "density", "weight", "int8_mask", "rescale"}:
            return fallback
        glob[key] = v
    # rescale other than mergekit's default for the method changes the math beyond what pluribus mirrors
    default_rescale = method in ("dare_linear", "dare_ties")
    if "rescale" in glob and bool(glob["rescale"]) != default_rescale:
        return fallback
    base = data.get("base_model")
    refs = [str(e.get("model")) for e in data["models"] if isinstance(e, dict)]
    if method == "linear" and base is not None and str(base) not in refs:
        # mergekit refuses it; merged here it would silently average the models without the base
        raise PluribusError(f"mergekit config: linear averages the models listed; base_model '{base}' is not among "
                            "models: add it to models (with a weight) or remove base_model")
    inputs = []
    for entry in data["models"]:
        if not isinstance(entry, dict) or "model" not in entry:
            return fallback
        ref = str(entry["model"])
        if base is not None and ref == str(base) and method != "linear":
            continue  # mergekit lists the base among models; task-vector methods skip it
        p = entry.get("parameters") or {}
        if not isinstance(p, dict):
            return fallback
        vals = {k: _scalar(v, k) for k, v in p.items()}
        if any(v is None for v in vals.values()) or set(vals) - {"weight", "density"}:
            return fallback
        weight = float(vals.get("weight", glob.get("weight", 1.0)))
        density = vals.get("density", glob.get("density"))
        if method in ("linear", "task_arithmetic"):
            density = None  # mergekit declares it for every task-arithmetic method but reads it in none of these
        model = ModelRef.parse(ref, adapter=True)
        inputs.append(
            MergeInput(
                path=model.text,
                adapter=model.adapter,
                weight=weight,
                density=float(density) if density is not None and not method.startswith("dare") else None,
                drop=1.0 - float(density) if density is not None and method.startswith("dare") else None,
            )
        )
    dtype = data.get("dtype")
    out_dtype = data.get("out_dtype") or (dtype if dtype in ("float32", "float16", "bfloat16") else None)
    return MergeSpec(
        method=method,
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


def parse_merge_config(data: Any, source: str = "<inline>") -> MergeSpec:
    """Validate a pluribus or mergekit merge mapping into a MergeSpec (one-line PluribusError on problems)."""
    if isinstance(data, MergeSpec):
        return data
    if not isinstance(data, dict):
        raise PluribusError(f"merge config {source} must be a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data)
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as e:
        raise PluribusError(f"invalid merge config {source}: {validation_message(e.errors(), quoted=False)}") from None


def load_merge_config(path: str | Path) -> MergeSpec:
    """Read a merge YAML (pluribus or mergekit format) from ``path``."""
    return parse_merge_config(read_yaml(path, "merge config"), f"'{Path(path)}'")
