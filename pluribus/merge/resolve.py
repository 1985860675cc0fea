"""What `pluribus merge` runs: a merge YAML, a recipe with a ``merge`` section, or the short-form flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.config import load_recipe
from pluribus.errors import PluribusError
from pluribus.io import read_yaml
from pluribus.merge.config import parse_merge_config
from pluribus.merge.spec import MergeSpec
from pluribus.modelref import ModelRef

#: keys only a recipe has (``seed`` is shared with merge configs)
RECIPE_KEYS = {"name", "root", "trust_remote_code", "task", "team", "build", "train", "merge", "eval", "export"}


def _is_recipe(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    return "merge" in data or ("method" not in data and "merge_method" not in data and bool(set(data) & RECIPE_KEYS))


def _split(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: list flags may be repeated or comma-separated."""
    return [v.strip() for raw in values or [] for v in raw.split(",") if v.strip()]


def spec_from_flags(
    method: str,
    adapters: list[str] | None = None,
    models: list[str] | None = None,
    weights: list[str] | None = None,
    **options: Any,
) -> MergeSpec:
    """The CLI's short form (``--method ties --adapters a,b,c --weights 1,0.5,1 --density 0.5``) as a spec."""
    paths = _split(adapters) + _split(models)
    if not paths:
        raise PluribusError("give the experts to merge: --adapters a,b,c or --models x,y (or a config file)")
    ws = _split(weights) or ["1"] * len(paths)
    if len(ws) != len(paths):
        raise PluribusError(f"{len(ws)} weights for {len(paths)} inputs; give one weight per input")
    try:
        values = [float(w) for w in ws]
    except ValueError:
        raise PluribusError(f"weights {ws} must be numbers") from None
    inputs = []
    for path, w in zip(paths, values, strict=True):
        ref = ModelRef.parse(path, adapter=True)  # mergekit's `model+lora` reference
        inputs.append({"path": ref.text, "adapter": ref.adapter, "weight": w})
    data = {"method": method, "inputs": inputs, **{k: v for k, v in options.items() if v is not None}}
    return parse_merge_config(data, "from the command line")


def resolve_cli(config: str | Path | None, out: str | Path | None, **flags: Any) -> tuple[MergeSpec, Path]:
    """What ``pluribus merge`` runs: a merge YAML, a recipe with a ``merge`` section, or the short-form flags.

    Returns the spec and the output folder (a recipe's default is ``<run>/merged/<name>``). ``seed`` (the DARE
    masks; mergekit's ``--random-seed``) and ``--no-check-base`` also apply to a config file; other flags beside a
    config file are refused.
    """
    seed = flags.get("seed")
    if config is None:
        if not flags.get("method"):
            raise PluribusError("give a merge config file, or --method with --adapters/--models (see --help)")
        spec = spec_from_flags(**flags)  # the flags carry the seed
    else:
        ignored = sorted(k for k, v in flags.items() if v not in (None, False, []) and k not in ("seed", "check_base"))
        if ignored:
            flag = "--" + ignored[0].replace("_", "-")
            raise PluribusError(f"{flag} has no effect with a merge config file ('{config}'); set it in the config, "
                                "or give the merge by flags alone")
        p = Path(config)
        data = read_yaml(p, "merge config")
        if _is_recipe(data):
            recipe = load_recipe(p)
            if recipe.merge is None:
                raise PluribusError(f"recipe '{p}' has no merge: section; add one or pass a merge config")
            first = recipe.merge.all()[0]  # a recipe with several merges: the first (pluribus run makes them all)
            spec = first.load(recipe.layout)
            out = out or recipe.layout.merged(first.name)
        else:
            spec = parse_merge_config(data, f"'{p}'")
        if seed is not None:
            spec = spec.model_copy(update={"seed": seed})
        if flags.get("check_base") is False:
            spec = spec.model_copy(update={"check_base": False})
    if out is None:
        raise PluribusError("give the output folder with -o OUT")
    return spec, Path(out)
