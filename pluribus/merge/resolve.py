"""What `pluribus merge` runs: a merge YAML, a recipe with a ``merge`` section, or the short-form flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pluribus.config import load_recipe
from pluribus.errors import PluribusError
from pluribus.io import read_yaml
from pluribus.merge.config import parse_merge_config
from pluribus.merge.registry import WEIGHT_DEFAULT
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
    ws = _split(weights) or [str(WEIGHT_DEFAULT)] * len(paths)  # the one default of every entry point
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
    """The one merge ``pluribus merge`` runs (see :func:`resolve_merges`); a recipe of several merges is refused."""
    merges = resolve_merges(config, out, **flags)
    if len(merges) > 1:
        names = ", ".join(n for n, _, _ in merges)
        raise PluribusError(f"recipe '{config}' has {len(merges)} merges ({names}); pick one by its name")
    return merges[0][1], merges[0][2]


def resolve_merges(
    config: str | Path | None, out: str | Path | None, name: str | None = None, **flags: Any
) -> list[tuple[str, MergeSpec, Path]]:
    """What ``pluribus merge`` runs, as ``(name, spec, output folder)``: a merge YAML, every merge of a recipe's
    ``merge`` section (or the one called ``name``), or the short-form flags.

    A recipe's merge goes to ``<run>/merged/<name>`` unless ``out`` is given, which names one folder and so needs
    one merge. ``seed`` (the DARE masks; mergekit's ``--random-seed``) and ``--no-check-base`` also apply to a
    config file; other flags beside a config file are refused, as is ``name`` for anything but a recipe.
    """
    seed = flags.get("seed")
    if config is None:
        if not flags.get("method"):
            raise PluribusError("give a merge config file, or --method with --adapters/--models (see --help)")
        if name is not None:
            raise PluribusError("--name picks one merge of a recipe's merge section; give the recipe, or drop --name")
        merges = [("merge", spec_from_flags(**flags), out)]  # the flags carry the seed
    else:
        # None and [] are flags not given (the CLI passes None for an unset switch); False and 0 are given values
        ignored = sorted(k for k, v in flags.items()
                         if v is not None and not (isinstance(v, (list, tuple)) and not v) and k not in ("seed", "check_base"))
        if ignored:
            flag = "--" + ignored[0].replace("_", "-")
            raise PluribusError(f"{flag} has no effect with a merge config file ('{config}'); set it in the config, "
                                "or give the merge by flags alone")
        p = Path(config)
        data = read_yaml(p, "merge config")
        if _is_recipe(data):
            merges = _recipe_merges(p, out, name)
        elif name is not None:
            raise PluribusError(f"--name picks one merge of a recipe's merge section; '{p}' is a merge config with "
                                "one merge: drop --name")
        else:
            merges = [("merge", parse_merge_config(data, f"'{p}'"), out)]
        if seed is not None:
            merges = [(n, s.model_copy(update={"seed": seed}), o) for n, s, o in merges]
        if flags.get("check_base") is False:
            merges = [(n, s.model_copy(update={"check_base": False}), o) for n, s, o in merges]
    if any(o is None for _, _, o in merges):
        raise PluribusError("give the output folder with -o OUT")
    return [(n, s, Path(o)) for n, s, o in merges]  # type: ignore[arg-type]


def _recipe_merges(path: Path, out: str | Path | None, name: str | None) -> list[tuple[str, MergeSpec, Any]]:
    """Every merge of the recipe at ``path`` (``pluribus run`` makes the same ones), or the one called ``name``."""
    recipe = load_recipe(path)
    if recipe.merge is None:
        raise PluribusError(f"recipe '{path}' has no merge: section; add one or pass a merge config")
    merges = recipe.merge.all()
    names = [m.name for m in merges]
    if name is not None:
        merges = [m for m in merges if m.name == name]
        if not merges:
            raise PluribusError(f"recipe '{path}' has no merge named '{name}'; its merges: {', '.join(names)}")
    if out is not None and len(merges) > 1:
        raise PluribusError(f"-o names one folder, but recipe '{path}' has {len(merges)} merges ({', '.join(names)}); "
                            "pick one with --name NAME, or leave -o out: each goes to <run>/merged/<name>")
    return [(m.name, m.load(recipe.layout), out or recipe.layout.merged(m.name)) for m in merges]
