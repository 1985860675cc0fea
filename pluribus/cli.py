"""The `pluribus` command line: one typer app, a thin sub-command per stage (parse -> config -> stage -> summary)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from pluribus.errors import PluribusError

app = typer.Typer(
    help="Distill a debating team of LLM agents into one model; merge expert adapters into one checkpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help: typer's rich panels print every flag with a type, as in "--overwrite <bool>"
    rich_markup_mode=None,
)
models_app = typer.Typer(help="List and resolve models (hub ids, local folders, .gguf files, aliases).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)

RecipeArg = Annotated[Path | None, typer.Argument(help="Recipe YAML (configs/quickstart.yaml).")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. team.rounds=3 train.lr=1e-4")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="CPU threads of torch (the recipe's `threads`); default 1 without a GPU, "
    "which does not collapse when other jobs share the cores ($OMP_NUM_THREADS is respected).")]
NewRunOpt = Annotated[bool, typer.Option("--new-run", help="Config changed: move the old store aside.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="Where models run (the recipe's `device`): auto (a CUDA GPU where there is one, else the "
    "CPU), cpu, cuda or cuda:N; a part's own device (an agent's, eval.device, ...) still wins.")]


def _with_threads(overrides: list[str] | None, threads: int | None, device: str | None = None) -> list[str]:
    """``--threads N`` / ``--device D`` as the overrides ``threads=N`` / ``device=D``: the recipe as run records
    them, and every stage reads them."""
    return [*(overrides or []), *([f"threads={threads}"] if threads is not None else []),
            *([f"device={device}"] if device is not None else [])]


def _checked(recipe: Any, *sections: str) -> Any:
    """``recipe`` once every device it names for ``sections`` exists here (pluribus.device; else exit 2)."""
    from pluribus.device import check_recipe

    check_recipe(recipe, sections)
    return recipe


def _threads(threads: int | None) -> None:
    from pluribus.threads import apply_threads

    apply_threads(threads)


def _show(summary: Any) -> None:
    """A stage's summary (pluribus.stages.StageSummary) as `pluribus run` shows it: the table and notes on stdout."""
    summary.print(Console(), console)


# ------------------------------------------------------------------------------------------- recipe


def _no_recipe(recipe: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """``config train.lr=1e-4``: a first argument that is an override, not a file, starts the overrides."""
    text = str(recipe)
    if recipe is not None and "=" in text and "/" not in text.split("=", 1)[0] and not recipe.exists():
        return None, [text, *(overrides or [])]
    return recipe, list(overrides or [])


@app.command("config")
def config_cmd(
    recipe: RecipeArg = None,
    overrides: OverridesArg = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Print every field of the recipe schema (type, default, description), section by "
        "section, instead of checking a recipe; a SECTION in place of RECIPE narrows it: pluribus config "
        "--explain train (or team.agents, ...).")] = False,
) -> None:
    """Validate RECIPE with OVERRIDES (fields and models) and print it as it would run; with --explain [SECTION],
    print the recipe schema's fields instead."""
    from pluribus.checks import check_recipe_models
    from pluribus.config import load_recipe

    if explain:
        from pluribus.config.explain import explain as reference

        if overrides:
            raise PluribusError("--explain describes the schema, not a recipe: give it at most one SECTION "
                                "(pluribus config --explain train)")
        print(reference(None if recipe is None else str(recipe)), end="")
        return
    recipe, overrides = _no_recipe(recipe, overrides)
    loaded = load_recipe(recipe, overrides)
    check_recipe_models(loaded)
    print(loaded.to_yaml(), end="")


# ------------------------------------------------------------------------------------------- debate


@app.command("debate")
def debate_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with task and team sections.")],
    overrides: OverridesArg = None,
    new_run: NewRunOpt = False,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Run the recipe's debate team over its problems into runs/<name>/trajectories (resumable)."""
    from pluribus.config import load_recipe
    from pluribus.stages import debate

    loaded = _checked(load_recipe(recipe, _with_threads(overrides, threads, device)), "team")
    _show(debate.run(loaded, new_run=new_run, progress=not no_progress))


# -------------------------------------------------------------------------------------------- build


@app.command("build")
def build_cmd(
    recipe: RecipeArg = None,
    overrides: OverridesArg = None,
    store: Annotated[list[Path] | None, typer.Option("--store", help="Run folder or trajectory store (repeatable).")] = None,
    kind: Annotated[list[str] | None, typer.Option("--kind", help="rsft | augmented | process (repeatable).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for <kind>/ (default <run>/datasets).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing datasets.")] = False,
    skip_corrupt: Annotated[bool, typer.Option("--skip-corrupt", help="Skip corrupt store lines (reported).")] = False,
    new_run: Annotated[bool, typer.Option("--new-run", help="Rollout config changed: move old rollouts aside.")] = False,
    push: Annotated[str | None, typer.Option("--push-to-hub", help="Push the datasets to this Hub repo (HF_TOKEN).")] = None,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    prompt_completion: Annotated[bool, typer.Option(
        "--prompt-completion", help="Also write rsft as TRL prompt/completion (rsft/prompt_completion/).")] = False,
    device: DeviceOpt = None,
) -> None:
    """Build rsft / augmented / process datasets from a run's trajectories into <run>/datasets/<kind>/."""
    from pluribus.config import load_recipe
    from pluribus.stages import build

    recipe, overrides = _no_recipe(recipe, overrides)  # `build --store RUN build.k=2`
    overrides = _with_threads(overrides, threads, device)
    loaded = _checked(load_recipe(recipe, overrides), "build") if recipe is not None else None
    summary = build.run(loaded, None if loaded else overrides, stores=store, kinds=kind, out_root=out,
                        overwrite=overwrite, new_run=new_run, skip_corrupt=skip_corrupt, progress=not no_progress,
                        prompt_completion=prompt_completion, push=push)
    if loaded is not None and not (store or out or kind or skip_corrupt):
        from pluribus.run import record_step

        record_step(loaded, "build", summary.output)  # what `pluribus run`'s build step makes, made now
    _show(summary)


@app.command("selfsamples")
def selfsamples_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with task, team, and an expert with data: self.")],
    overrides: OverridesArg = None,
    new_run: NewRunOpt = False,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Sample the training problems with the single agent alone into runs/<name>/self/trajectories (resumable):
    the data of the single-agent baseline (experts with data: self), which `pluribus build` then builds."""
    from pluribus.config import load_recipe
    from pluribus.stages import selfsamples

    loaded = _checked(load_recipe(recipe, _with_threads(overrides, threads, device)), "team")
    _show(selfsamples.run(loaded, new_run=new_run, progress=not no_progress))


@app.command("repair")
def repair_cmd(
    store: Annotated[Path, typer.Argument(help="Run folder or store folder (trajectories/, rollouts/, an eval store).")],
) -> None:
    """Move corrupt and duplicated lines out of a store's shards into removed-<time>.jsonl; the next
    `pluribus debate` (or eval, build) generates their problems again."""
    from pluribus.data.builders.datasets import store_dir
    from pluribus.data.records import Trajectory
    from pluribus.data.store import repair_store

    folder = store_dir(store)
    # rollout stores hold rollout records; every other store holds trajectories
    report = repair_store(folder, check=None if folder.name == "rollouts" else Trajectory.from_dict)
    if report["moved_to"] is None:
        Console().print(f"{folder}: no corrupt or duplicated line", markup=False, soft_wrap=True)
        return
    for what in ("corrupt", "duplicates"):
        if report[what]:
            Console().print(f"{len(report[what])} {what} line(s): {', '.join(report[what][:10])}", markup=False, soft_wrap=True)
    Console().print(f"moved to {report['moved_to']}; rerun the stage to generate their problems again", markup=False, soft_wrap=True)


# -------------------------------------------------------------------------------------------- train


@app.command("train")
def train_cmd(
    recipe: RecipeArg = None,
    overrides: OverridesArg = None,
    expert: Annotated[str | None, typer.Option("--expert", help="Train this expert of the recipe (by name).")] = None,
    all_experts: Annotated[bool, typer.Option("--all", help="Train every expert of the recipe, in order.")] = False,
    objective: Annotated[str | None, typer.Option(
        "--objective", help="rsft | augmented | prm | rl (sets train.objective).")] = None,
    dataset: Annotated[Path | None, typer.Option("--dataset", help="Dataset folder/file, or a Hub dataset id (default "
                                               "<run>/datasets/<kind>).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Adapter folder (default <run>/adapters/<expert>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint of this expert.")] = False,
    resume_from: Annotated[Path | None, typer.Option("--resume-from", help="Continue from this checkpoint folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing adapter folder.")] = False,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Train a LoRA/QLoRA expert of RECIPE; writes a PEFT adapter + training_record.json."""
    from pluribus.config import load_recipe
    from pluribus.stages import train

    loaded = _checked(load_recipe(recipe, [*_with_threads(overrides, threads, device),
                                           *([f"train.objective={objective}"] if objective else [])]), "train")
    _threads(loaded.threads)
    names = [expert] if expert else None
    if all_experts:
        if expert or dataset or out:
            raise PluribusError("--all trains every expert into its own folder; leave out --expert, --dataset and --out")
        names = [t.expert_name for t in loaded.require("train").trainings()]
    for name in names or [None]:
        if dataset is None:
            _self_data_current(loaded, name)
        # several processes: rank 0 wrote the adapter, and only its summary has lines
        _show(train.run(loaded, expert=name, dataset=dataset, out=out,
                        resume=str(resume_from) if resume_from else resume, overwrite=overwrite,
                        progress=not no_progress))


def _self_data_current(recipe: Any, name: str | None) -> None:
    """An expert with ``data: self`` trains on ``<run>/self/datasets``, which only the build step makes: refuse
    them missing or stale (the build step's freshness, as `pluribus run` judges it), naming the command to run."""
    from pluribus.run import staleness

    train = recipe.require("train")
    cfg = train.expert(name) if name else train.trainings()[0]
    if cfg.data != "self":
        return
    reason = staleness(recipe, "build")
    if reason is None:
        return
    layout = recipe.layout
    fix = ("run `pluribus selfsamples RECIPE`, then `pluribus build RECIPE`"
           if not layout.trajectories("self").is_dir() else
           "run `pluribus build RECIPE`" if not layout.datasets("self").is_dir() else
           "run `pluribus selfsamples RECIPE`, then `pluribus build RECIPE --overwrite`")
    raise PluribusError(f"expert '{cfg.expert_name}' trains on the single agent's datasets "
                        f"({layout.datasets('self')}), which are not current with this recipe (the build step: "
                        f"{reason}); {fix} (or `pluribus run RECIPE`)")


@app.command("score")
def score_cmd(
    adapter: Annotated[Path, typer.Argument(help="PRM adapter folder (from a prm expert: `pluribus train --objective prm`).")],
    question: Annotated[str, typer.Option("--question", help="The problem statement (filled into the prompt the PRM "
                                          "was trained with).")],
    solution: Annotated[str, typer.Option("--solution", help="Solution text, split into steps by the PRM's step rule "
                                          "(one step a line by default); @FILE or - (stdin).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Score each step of SOLUTION with a process reward model (probability that the step is correct), on the
    input it was trained on: its prompt template, step rule and separator (from its training record)."""
    import json

    from rich.table import Table

    from pluribus.io import read_text_file
    from pluribus.stages import print_table

    text = (sys.stdin.read() if solution == "-" else read_text_file(solution[1:], "solution file")
            if solution.startswith("@") else solution)
    if not text.strip():
        raise PluribusError("--solution is empty: there is no step to score")
    from pluribus.distill.prm import load_prm, score_solutions  # heavy: after the cheap checks

    _threads(threads)
    prm = load_prm(adapter, device=device)
    steps = prm.step_format.split(text)  # what score_solutions scores, for the table
    if not steps:
        raise PluribusError(f"--solution has no step under the PRM's step rule '{prm.step_format.step_rule}' "
                            f"(regex {prm.step_format.step_regex!r})" if prm.step_format.step_regex else
                            f"--solution has no step under the PRM's step rule '{prm.step_format.step_rule}'")
    scores = score_solutions(prm, [question], [text])[0]
    if as_json:
        print(json.dumps([{"step": s, "score": round(v, 6)} for s, v in zip(steps, scores, strict=True)]))
        return
    table = Table("#", "score", "step")
    for i, (s, v) in enumerate(zip(steps, scores, strict=True)):
        table.add_row(str(i), f"{v:.3f}", escape(s))
    print_table(Console(), table)


# -------------------------------------------------------------------------------------------- merge


def _opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help)


def _method_help() -> str:
    from pluribus.merge.registry import METHODS

    return " | ".join(METHODS) + " (the README's table says what each computes)"


@app.command("merge")
def merge_cmd(
    config: Annotated[Path | None, typer.Argument(help="Merge YAML (pluribus or mergekit) or a recipe with merge: "
                                                  "(every merge of it, or the one --name picks).")] = None,
    out: Annotated[Path | None, _opt("Output folder (a recipe's merge: <run>/merged/<name> by default).", "-o", "--out")] = None,
    name: Annotated[str | None, _opt("The one merge of a recipe's merge.merges to run (default: every one).", "--name")] = None,
    method: Annotated[str | None, _opt(_method_help(), "--method")] = None,
    adapters: Annotated[list[str] | None, _opt("Adapter folders (space- or comma-separated).", "--adapters")] = None,
    models: Annotated[list[str] | None, _opt("Model folders, or model+adapter (space- or comma-separated).", "--models")] = None,
    base: Annotated[str | None, _opt("Base model folder (full merges, folding).", "--base")] = None,
    weights: Annotated[list[str] | None, _opt("One weight per input (space- or comma-separated; default 1 each: "
                                              "task_arithmetic sums, --normalize averages).", "--weights")] = None,
    density: Annotated[float | None, _opt("TIES / magnitude / PCB: fraction kept (DARE: use --drop).", "--density")] = None,
    drop: Annotated[float | None, _opt("DARE drop rate p.", "--drop")] = None,
    seed: Annotated[int | None, _opt("Seed of the DARE masks (mergekit's --random-seed; default 0).", "--seed")] = None,
    rank: Annotated[int | None, _opt("Output adapter rank (default: exact for cat, linear, task_arithmetic; the "
                                     "largest input rank for svd and the dense methods).", "--rank")] = None,
    energy: Annotated[float | None, _opt("Per-module rank keeping this energy fraction.", "--energy")] = None,
    lam: Annotated[float | None, _opt("Scale lambda of the merged task vector.", "--lambda")] = None,
    normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Divide by the summed weights "
                                                   "(default: the method's; task_arithmetic's is no).")] = None,
    output: Annotated[str | None, _opt("auto | adapter | model (fold adapters into base).", "--output")] = None,
    mergekit: Annotated[bool, typer.Option("--mergekit", help="Reproduce mergekit's semantics.")] = False,
    no_check_base: Annotated[bool, typer.Option("--no-check-base",
                                                help="Merge adapters even if their recorded bases differ.")] = False,
    extract: Annotated[str | None, _opt("Extract a LoRA from this fine-tuned model (with --base, --rank/--energy).", "--extract")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="Where folding adapters into a model (--output model) and --extract's SVDs compute: auto, "
        "cpu, cuda or cuda:N (default auto); other merges stream on the CPU.")] = None,
) -> None:
    """Merge adapters (low-rank, any ranks) or models (streaming) into OUT; mergekit YAML is accepted."""
    from pluribus.merge.resolve import resolve_merges
    from pluribus.stages import merge

    _threads(threads)
    if extract:
        _extract(extract, base, out, rank=rank, energy=energy, overwrite=overwrite, device=device)
        return
    merges = resolve_merges(config, out, name, method=method, adapters=adapters, models=models, base=base,
                            weights=weights, density=density, drop=drop, seed=seed, rank=rank, energy=energy,
                            output=output, mergekit=mergekit or None, check_base=False if no_check_base else None,
                            normalize=normalize, **({"lambda": lam} if lam is not None else {}))
    _check_merges(merges, overwrite=overwrite, device=device)
    for merge_name, spec, target in merges:
        _show(merge.run(spec, target, overwrite=overwrite, device=device, progress=not no_progress,
                        name=f"merge:{merge_name}" if len(merges) > 1 else "merge"))


def _extract(tuned: str, base: str | None, out: Path | None, *, rank: int | None, energy: float | None,
             overwrite: bool, device: str | None) -> None:
    """``merge --extract``: a LoRA of ``tuned - base`` into ``out``, and its figures printed."""
    from pluribus.device import resolve
    from pluribus.merge.extract import extract_lora

    if not (base and out):
        raise PluribusError("--extract needs --base (the model it was tuned from) and -o OUT")
    r = extract_lora(base, tuned, out, rank=rank, energy=energy, overwrite=overwrite, device=resolve(device))
    Console().print(f"{r['modules']} modules, ranks {r['rank_min']}..{r['rank_max']}, relative error {r['error']:.3e}, "
                    f"uncaptured (non-linear weights) {r['uncaptured']:.3e} -> {out}", highlight=False,
                    markup=False, soft_wrap=True)


def _check_merges(merges: list[Any], *, overwrite: bool, device: str | None) -> None:
    """Before the first merge writes: no output exists (unless ``overwrite``), and ``--device`` names a device only
    where every merge folds adapters into a model (the others stream on the CPU)."""
    from pluribus.device import resolve

    if not overwrite:
        from pluribus.errors import OutputExistsError

        for _, _, target in merges:
            if target.exists():
                raise OutputExistsError(target)
    if device is not None and resolve(device).type != "cpu":
        from pluribus.merge import folds

        if not all(folds(spec) for _, spec, _ in merges):
            raise PluribusError(f"--device {device}: only folding adapters into a model (--output model) computes on "
                                "a device; this merge streams on the CPU (its seeded draws are the same on every "
                                "machine). Leave out --device")


# --------------------------------------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    recipe: RecipeArg = None,
    overrides: OverridesArg = None,
    new_run: Annotated[bool, typer.Option("--new-run", help="Move aside answers stored with other settings.")] = False,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Compare the single base agent, the team and the distilled model on the same held-out problems."""
    from pluribus.config import load_recipe
    from pluribus.stages import eval

    loaded = _checked(load_recipe(recipe, _with_threads(overrides, threads, device)), "team", "eval")
    _threads(loaded.threads)
    _show(eval.run(loaded, progress=not no_progress, new_run=new_run))


# ------------------------------------------------------------------------------------------- export


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="Adapter or model folder to export.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Hub-ready output folder.")],
    push: Annotated[str | None, typer.Option("--push-to-hub", help="Push to this Hub repo (token from HF_TOKEN).")] = None,
    eval_results: Annotated[Path | None, typer.Option("--eval", help="results.json of `pluribus eval`.")] = None,
    hub_dataset: Annotated[list[str] | None, typer.Option(
        "--hub-dataset", help="Hub dataset id for the card's datasets field (repeatable).")] = None,
    old_dataset: Annotated[list[str] | None, typer.Option("--dataset", hidden=True)] = None,
    public: Annotated[bool, typer.Option("--public", help="Create the Hub repo public (default private).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Write a Hub-ready folder (weights, tokenizer, model card) from SOURCE, and optionally push it."""
    from pluribus.stages.export import publish

    if old_dataset:  # `--dataset` is a folder in `train`; here it always was a Hub id
        console.print("export --dataset is now --hub-dataset (the old name still works; rename it)", markup=False,
                      highlight=False, soft_wrap=True)
    _show(publish(source, out, repo_id=push, private=not public, datasets=[*(hub_dataset or []), *(old_dataset or [])],
                  eval_results=eval_results, overwrite=overwrite))


# --------------------------------------------------------------------------------------------- view


@app.command("view")
def view_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder (runs/<name>).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="HTML file to write (default <run>/view.html).")] = None,
) -> None:
    """Write one self-contained HTML page of RUN: eval, debates round by round, process rows, experts, merges."""
    from pluribus.view import write_view

    Console().print(f"wrote {write_view(run, out)}", markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- run


@app.command("run")
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML; every stage with a section runs, in order.")],
    overrides: OverridesArg = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages that are up to date.")] = False,
    new_run: Annotated[bool, typer.Option("--new-run", help="Move aside debate/eval stores written with other settings.")] = False,
    no_progress: NoProgressOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Run the whole pipeline of RECIPE: debate, build, train, merge, eval, export (resumable)."""
    from rich.markup import escape
    from rich.table import Table

    from pluribus.config import load_recipe
    from pluribus.run import run_recipe
    from pluribus.stages import print_table

    loaded = _checked(load_recipe(recipe, _with_threads(overrides, threads, device)), "team", "build", "train", "eval")
    results = run_recipe(loaded, force=force, progress=not no_progress, new_run=new_run)
    table = Table("step", "status", "seconds", "summary")
    for r in results:
        table.add_row(escape(r.stage), r.status, f"{r.seconds:.1f}", escape(r.summary))
    print_table(Console(), table)


# ------------------------------------------------------------------------------------------- models


@models_app.command("list")
def models_list() -> None:
    """Show the aliases pluribus knows and whether each is available offline."""
    from rich.table import Table

    from pluribus.models import list_models
    from pluribus.stages import print_table

    table = Table("alias", "source", "status")
    for row in list_models():
        table.add_row(*(escape(str(row[k])) for k in ("alias", "source", "status")))
    print_table(Console(), table)


@models_app.command("resolve")
def models_resolve(model: Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file or alias.")],
                   no_progress: NoProgressOpt = False) -> None:
    """Print the local folder that `from_pretrained` loads for MODEL (dequantizing a GGUF once if needed)."""
    from pluribus.models import resolve_model

    print(resolve_model(model, progress=not no_progress))


# -------------------------------------------------------------------------------------- entry point


def interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C leaves, per command: a merge writes its output only when complete and never resumes."""
    if argv[:1] == ["merge"]:
        return "interrupted; a merge writes its output only when complete, so nothing was kept: a rerun starts it over"
    return "interrupted; what was finished is stored and a rerun resumes from there"


def _terminated(signum: int, frame: Any) -> None:
    # SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C, so temporary outputs are removed
    raise SystemExit(128 + signum)


LIST_OPTIONS = ("--adapters", "--models", "--weights")


def gather_lists(argv: list[str]) -> list[str]:
    """``merge --adapters a b c`` -> ``--adapters a,b,c`` (also ``--models``, ``--weights``): the short form
    takes space-separated lists, which click options cannot. A list runs to the next option; numbers such as
    ``-0.5`` are values, not options."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] in LIST_OPTIONS:
            values = []
            while i + 1 < len(argv) and (not argv[i + 1].startswith("-") or _is_number(argv[i + 1])):
                i += 1
                values.append(argv[i])
            if values:
                out.append(",".join(values))
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _error(message: str) -> None:
    """Print one error line and exit 2. The message is escaped: rich would read an install hint such as
    ``pip install 'pluribus[vllm]'`` as markup and print ``pip install 'pluribus'``."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def quiet_libraries() -> None:
    """The screen shows pluribus's own bars and lines: the libraries' tqdm bars ("Loading weights",
    "Generating train split", "Creating parquet") ignore --no-progress and break rich's bars, and a library's
    deprecation of another library's call is nothing a user can act on. A user's own setting of the
    variables wins."""
    # read at import by huggingface_hub and transformers (whose "Loading weights" bar follows it) and datasets
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # peft asks every model for is_gradient_checkpointing, which transformers 5 deprecates
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # bitsandbytes warns on every import on AVX512-BF16 CPUs that the `kernels` package is missing; installing
    # it would make bitsandbytes fetch code from the Hub at import time, which pluribus never wants
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # where `kernels` is installed, bitsandbytes asks it for a CPU kernel at import, and offline it logs that it
    # skips that repository's publisher check (then fails to find it, which the line above keeps quiet)
    logging.getLogger("kernels._internals.hf_hub").addFilter(
        lambda record: not record.getMessage().startswith("Skipping publisher trust check"))


def _one_process_unless_training(argv: list[str]) -> None:
    """Only ``train`` runs in several processes (accelerate / torchrun): every other stage would run once per
    process, each writing the same outputs."""
    command = next((a for a in argv if not a.startswith("-")), None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and command not in (None, "train"):
        raise PluribusError(f"`pluribus {command}` was launched in {world} processes; only `pluribus train` runs in "
                            f"several (data-parallel training); run `pluribus {command}` as one process")


def main() -> None:
    """Run the CLI; user errors print one line and exit with code 2; SIGTERM cleans up like Ctrl-C."""
    signal.signal(signal.SIGTERM, _terminated)
    quiet_libraries()
    try:
        _one_process_unless_training(sys.argv[1:])
        # without standalone mode typer *returns* the exit code of a ctx.exit / typer.Exit, and turns Ctrl-C
        # into Exit(130) after the command has unwound; commands themselves return None
        code = app(args=gather_lists(sys.argv[1:]), standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except PluribusError as e:
        _error(str(e))
    except OSError as e:
        # pluribus's own reads and folders word their errors where they happen (pluribus.io); what is left is a
        # library reading or writing a path of the user's (parquet, checkpoints) on a full disk or a path that
        # went away. An OSError naming no path is a bug and keeps its traceback.
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # the run resumes once space is freed
            _error(f"{e.strerror or 'no space left on device'} (errno {e.errno}); free space on the disk holding "
                   "the run folder and rerun: finished work is kept")
        if e.filename is None:
            raise
        path = e.filename if e.filename2 is None else f"{e.filename}' -> '{e.filename2}"
        _error(f"'{path}' does not exist" if isinstance(e, FileNotFoundError) else f"'{path}': {e.strerror or e}")
    except KeyboardInterrupt:
        console.print(interrupted_message(sys.argv[1:]))
        sys.exit(130)
    except Exception as e:
        # click's own usage errors (typer may vendor click, so match by shape rather than by class)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
