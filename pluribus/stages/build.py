"""The build stage: a recipe's build section over its run's stores into datasets/<kind>/, and their push to the Hub."""

from __future__ import annotations

from pathlib import Path

from pluribus.config import BuildConfig, Recipe
from pluribus.data.builders.card import SIZE_ORDER
from pluribus.data.builders.datasets import (
    CARD_LISTS,
    PARQUET,
    PROMPT_COMPLETION_PARQUET,
    SHEPHERD_PARQUET,
    Built,
    build,
    store_dir,
)
from pluribus.device import describe
from pluribus.errors import PluribusError
from pluribus.io import shown_path
from pluribus.stages import Stage, StageSummary, json_of
from pluribus.stages.selfsamples import self_kinds


def build_recipe(recipe: Recipe | None, overrides: list[str] | None = None, *, stores: list[Path] | None = None,
                 kinds: list[str] | None = None, out_root: Path | None = None, overwrite: bool = False,
                 new_run: bool = False, skip_corrupt: bool = False, progress: bool = True,
                 prompt_completion: bool = False) -> list[Built]:
    """``pluribus build``: the recipe's build section over its run's store, or over ``stores``.

    Without a recipe, the first store's run folder supplies one (``<run>/recipe.yaml``, written by the
    debate), so ``--store RUN --kind process`` still knows the team (the default completer) and its prompts.
    """
    from pluribus.config import load_recipe

    # a recipe given, or the one the debate saved, names the store's config and task; a default one does not
    known = recipe is not None
    if recipe is None:
        if not stores:
            raise PluribusError("give a recipe or --store RUN (a run folder or a trajectory store)")
        saved = store_dir(stores[0]).parent / "recipe.yaml"
        known = saved.is_file()
        recipe = load_recipe(saved if known else None, overrides)
        if not known and (recipe.build is None or recipe.build.prompt_template is None):
            # a default recipe's prompt is not what the agents were asked: rows would teach another question
            raise PluribusError(
                f"no recipe.yaml beside the store '{store_dir(stores[0])}', so the prompt its agents were asked is "
                "unknown; give the recipe that made it (pluribus build RECIPE --store ...) or the prompt "
                "(build.prompt_template='...{question}...')")
    elif overrides:
        from pluribus.config import validate_recipe
        from pluribus.overrides import apply_overrides

        recipe = validate_recipe(apply_overrides(recipe.to_dict(), overrides))
    from pluribus.threads import apply_threads

    apply_threads(recipe.threads)  # before the rollouts' model loads
    cfg = recipe.build or BuildConfig()
    if skip_corrupt:
        cfg = cfg.model_copy(update={"skip_corrupt": True})
    hashes = ids = None
    team = recipe.team
    if known and recipe.task is not None and recipe.team is not None:
        from pluribus.data.tasks import load_problems
        from pluribus.seats import fingerprints, seated_recipe
        from pluribus.stages.debate import config_hash, older_config_hashes

        seated, folders = seated_recipe(recipe, check=False)  # a team of experts: its store follows their weights
        team = seated.team
        hashes = [config_hash(seated, seats=fingerprints(folders) if folders else None),
                  *older_config_hashes(seated)]
        ids = [p.id for p in load_problems(recipe.task)]
    # the team only where it is the store's (a default recipe's team did not answer: no completer is taken from it)
    return build(cfg, list(stores or [recipe.run_dir]), kinds=kinds, out_root=out_root,
                 team=team if known else None,
                 seed=recipe.seed, overwrite=overwrite, new_run=new_run,
                 trust_remote_code=recipe.trust_remote_code, progress=progress, prompt_completion=prompt_completion,
                 task_source=recipe.task.source if recipe.task else None, config_hashes=hashes, problem_ids=ids,
                 device=recipe.device)


def push_to_hub(built: list[Built], repo_id: str, *, private: bool = True, token_env: str | None = None) -> str:
    """Push each dataset as a config of ``repo_id`` with ``datasets``' own ``push_to_hub``, then its card.

    The token is ``pluribus.hub.hub_token``'s (the environment only, as for ``export``); it is never printed or
    logged. Returns the dataset's URL.
    """
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from pluribus.hub import check_push, push_errors

    token = check_push(repo_id, token_env)
    with push_errors(repo_id):
        for b in built:
            configs = {b.kind: PARQUET}
            if b.kind == "process":
                configs[f"{b.kind}_math_shepherd"] = SHEPHERD_PARQUET
            if (b.path / PROMPT_COMPLETION_PARQUET).is_file():
                configs[f"{b.kind}_prompt_completion"] = PROMPT_COMPLETION_PARQUET
            for name, rel in configs.items():
                ds = load_dataset("parquet", data_files=str(b.path / rel), split="train")
                ds.push_to_hub(repo_id, config_name=name, private=private, token=token)
        pushed = DatasetCard.load(repo_id, repo_type="dataset", token=token)
        DatasetCard(hub_card(str(pushed), built)).push_to_hub(repo_id, repo_type="dataset", token=token)
    return f"https://huggingface.co/datasets/{repo_id}"


def hub_card(pushed: str, built: list[Built]) -> str:
    """The dataset card to push: the header ``datasets`` wrote (``configs``, ``dataset_info``) merged with each
    built dataset's own metadata (tags, task, license, language, size), then each dataset's card text.

    Lists are joined (one size category: the largest); licenses that differ become ``other``.
    """
    from huggingface_hub import DatasetCard

    card = DatasetCard(pushed)
    data = card.data.to_dict()
    texts, licenses, names = [], [], []
    for b in built:
        local = DatasetCard((b.path / "README.md").read_text())
        ours = local.data.to_dict()
        for key in CARD_LISTS:
            data[key] = list(dict.fromkeys([*(data.get(key) or []), *(ours.get(key) or [])]))
        licenses.append(ours.get("license"))
        names.append(ours.get("pretty_name"))
        texts.append(local.text.strip())
    if data.get("size_categories"):
        data["size_categories"] = [max(data["size_categories"], key=lambda c: SIZE_ORDER.index(c)
                                       if c in SIZE_ORDER else -1)]
    known = {x for x in licenses if x}
    if known:
        data["license"] = known.pop() if len(known) == 1 else "other"
    data["pretty_name"] = names[0] if len(names) == 1 else "pluribus datasets: " + ", ".join(b.kind for b in built)
    data = {k: v for k, v in data.items() if v not in (None, [], {})}
    import yaml

    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n\n" + "\n\n".join(texts) + "\n"


# ------------------------------------------------------------------------------------------ the protocol


def _warnings(b: Built) -> list[str]:
    out = []
    if b.stats.get("skipped_lines"):
        out.append(f"skipped {len(b.stats['skipped_lines'])} corrupt line(s): {', '.join(b.stats['skipped_lines'][:10])}")
    if b.stats.get("duplicate_lines"):
        out.append(f"ignored {len(b.stats['duplicate_lines'])} duplicated store line(s) (the first line of each "
                   f"problem is used): {', '.join(b.stats['duplicate_lines'][:10])}")
    if b.stats.get("no_steps"):
        out.append(f"{len(b.stats['no_steps'])} trace(s) had no step under build.step_rule "
                   f"(e.g. {', '.join(b.stats['no_steps'][:5])}); all are listed in {b.path}/README.md")
    return out


def build_self(recipe: Recipe, built: list[Built], kinds: list[str], *, progress: bool = True) -> list[Built]:
    """The single agent's own samples (``<run>/self``) built into the same kinds with as many rows as the team's."""
    from pluribus.data.tasks import load_problems
    from pluribus.stages.selfsamples import self_team

    cfg = recipe.require("build")
    store = recipe.layout.trajectories("self")
    if not store.is_dir():
        raise PluribusError(f"experts with data: self train on the single agent's own samples, and {store} does not "
                            "exist; run `pluribus selfsamples RECIPE` first (or `pluribus run RECIPE`)")
    match = {b.kind: b.rows for b in built}
    missing = [k for k in kinds if k not in match]
    if missing:
        raise PluribusError(f"experts with data: self train on {missing}, which build.kinds does not make for "
                            "the team; add them to build.kinds so both sides have the same kind of data")
    # the samples must be the ones this recipe asks for (its agent, prompt, seed and sample count), as the team's
    # store must be the team's: a store sampled before a change of build.prompt_template is refused, not built
    from pluribus.data.store import TrajectoryStore
    from pluribus.seats import fingerprints, seated_recipe
    from pluribus.stages.debate import config_hash, older_config_hashes
    from pluribus.stages.selfsamples import self_recipe

    # generation g's self student samples with its weights: its store is keyed by them, as the sampling keyed it
    mine, folders = seated_recipe(self_recipe(recipe), check=False)
    hashes = [config_hash(mine, seats=fingerprints(folders) if folders else None), *older_config_hashes(mine)]
    with TrajectoryStore(store) as existing:
        if existing.manifest["config_hash"] not in hashes:
            raise PluribusError(f"the single agent's samples in {store} were drawn with other settings (its model, "
                                "prompt, sample count or seed) than this recipe's; run `pluribus selfsamples RECIPE "
                                "--new-run` to sample them again")
    layout = recipe.layout
    return build(cfg, [store], kinds=kinds, out_root=layout.datasets("self"),
                 team=self_team(recipe), seed=recipe.seed, overwrite=True, trust_remote_code=recipe.trust_remote_code,
                 progress=progress, match_rows=match, problem_ids=[p.id for p in load_problems(recipe.require("task"))],
                 config_hashes=hashes, device=recipe.device)


def summary_of(built: list[Built], mine: list[Built] | None = None, output: Path | None = None,
               notes: tuple[str, ...] = ()) -> StageSummary:
    """The datasets a build wrote (the team's, then the single agent's own when there are any)."""
    both = [(b, "") for b in built] + [(b, "self/") for b in mine or []]
    rows = [(f"{prefix}{b.kind}", str(b.rows), str(b.stats["counts"]["problems with rows"]), shown_path(b.path))
            for b, prefix in both]
    line = ", ".join(f"{b.kind}: {b.rows} rows" for b in built)
    if mine:
        line += "; self: " + ", ".join(f"{b.kind}: {b.rows} rows" for b in mine)
    output = output or (built[0].path.parent if built else None)
    ran = [f"{prefix}{b.kind}: the completer's rollouts ran on {describe(**b.stats['completer ran on'])}"
           for b, prefix in both if b.stats.get("completer ran on")]
    return StageSummary("build", output, line, ("dataset", "rows", "problems", "path"), tuple(rows),
                        tuple(w for b, _ in both for w in _warnings(b)), (*ran, *notes))


def build_run(recipe: Recipe, *, kinds: list[str] | None = None, overwrite: bool = False, new_run: bool = False,
              skip_corrupt: bool = False, progress: bool = True,
              prompt_completion: bool = False) -> tuple[list[Built], list[Built] | None]:
    """The datasets of ``recipe``'s run folder: the team's, then the single agent's own (``<run>/self/datasets``)
    of the kinds that experts with ``data: self`` train on: what `pluribus build RECIPE` and `pluribus run`'s
    build step both make. ``kinds`` restricts both sides to those kinds. Returns (the team's, the single agent's)."""
    wanted = [k for k in self_kinds(recipe) if kinds is None or k in kinds]
    built = build_recipe(recipe, None, kinds=kinds, overwrite=overwrite, new_run=new_run, skip_corrupt=skip_corrupt,
                         progress=progress, prompt_completion=prompt_completion)
    return built, build_self(recipe, built, wanted, progress=progress) if wanted else None


def run(recipe: Recipe | None, overrides: list[str] | None = None, *, stores: list[Path] | None = None,
        kinds: list[str] | None = None, out_root: Path | None = None, overwrite: bool = False, new_run: bool = False,
        skip_corrupt: bool = False, progress: bool = True, prompt_completion: bool = False,
        push: str | None = None) -> StageSummary:
    """``pluribus build``, summarized: a recipe's run folder as `pluribus run` builds it (``build_run``: the
    single agent's datasets included), or ``stores`` / ``out_root`` (``build_recipe``); with ``push``, the
    datasets pushed to that Hub repo. A bad repo id or a missing token fails before any work."""
    from pluribus.hub import check_push

    if push:
        check_push(push)
    mine, output = None, None
    if recipe is not None and not stores and out_root is None:
        built, mine = build_run(recipe, kinds=kinds, overwrite=overwrite, new_run=new_run, skip_corrupt=skip_corrupt,
                                progress=progress, prompt_completion=prompt_completion)
        output = recipe.layout.datasets()
    else:
        built = build_recipe(recipe, overrides, stores=stores, kinds=kinds, out_root=out_root, overwrite=overwrite,
                             new_run=new_run, skip_corrupt=skip_corrupt, progress=progress,
                             prompt_completion=prompt_completion)
    return summary_of(built, mine, output, notes=(f"pushed to {push_to_hub(built, push)}",) if push else ())


def plan(recipe: Recipe) -> list[Stage]:
    """The build step: its output follows the build, team and task sections and the stores it reads."""
    if recipe.build is None:
        return []
    layout, kinds = recipe.layout, self_kinds(recipe)

    def run(progress: bool, new_run: bool) -> StageSummary:
        # overwrite: a rerun reaches this step only when its inputs changed, so the old datasets are stale
        return summary_of(*build_run(recipe, overwrite=True, progress=progress), layout.datasets())

    return [Stage("build", run,
                  settings=lambda: {"build": json_of(recipe.build), "team": json_of(recipe.team),
                                    "task": json_of(recipe.task), "self": kinds},
                  inputs=lambda: {"store": layout.trajectories(),
                                  **({"self store": layout.trajectories("self")} if kinds else {})})]
