"""`pluribus run RECIPE`: every stage the recipe has a section for, in pipeline order, resumable.

debate (task + team) -> self samples (if an expert learns from them) -> build -> train (each expert, in
order) -> merge (each merge) -> eval -> export. Each step reads what the previous ones wrote in
``runs/<name>/``. A finished step is recorded in ``<run>/stages.json`` with a fingerprint of every setting that
changes its output (the seed included), of the contents of every file it read (the store, the datasets, the
adapters it starts from) and the pluribus version that ran it; a rerun skips it only while all match and its
output exists, and says why it reran.
The steps that keep answer stores (debate, self samples, eval) always run and generate only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pluribus import __version__
from pluribus.config import DATASET_OF_OBJECTIVE, Recipe, without_engine_settings, write_recipe
from pluribus.errors import PluribusError
from pluribus.io import atomic_write_text, content_fingerprint, make_dirs


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ran | skipped
    seconds: float
    summary: str


@dataclass
class Step:
    """One unit of the pipeline: a stage, or one expert / one merge of a stage."""

    key: str  # debate | self | build | train:<expert> | merge:<name> | eval | export
    run: Callable[[bool, bool], tuple[Path, str]]  # (progress, new_run) -> (output, summary)
    settings: Callable[[], Any] = lambda: None  # JSON of every setting that changes the output
    inputs: Callable[[], dict[str, Path]] = dict  # files it reads, by role
    keeps_store: bool = False  # resumes on its own: always runs, generates only what is missing
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def compute(self, seed: int) -> dict[str, Any]:
        settings = json.dumps({"settings": self.settings(), "seed": seed}, sort_keys=True, default=str)
        self.fingerprint = {"settings": hashlib.sha256(settings.encode()).hexdigest()[:16],
                            "inputs": {role: content_fingerprint(p) for role, p in sorted(self.inputs().items())},
                            "pluribus": __version__}
        return self.fingerprint


def _dump(section: Any) -> Any:
    # engine settings (vllm) size and schedule an engine: changing them reruns nothing (config.without_engine_settings)
    return without_engine_settings(section.model_dump(mode="json")) if section is not None else None


def plan(recipe: Recipe) -> list[Step]:
    """The steps ``recipe`` asks for, in order, each with what its freshness depends on."""
    layout = recipe.layout
    steps: list[Step] = []
    trainings = recipe.train.trainings() if recipe.train else []
    self_kinds = sorted({DATASET_OF_OBJECTIVE[t.objective] for t in trainings if t.data == "self"})
    if recipe.task is not None and recipe.team is not None:
        steps.append(Step("debate", lambda p, n: _debate(recipe, p, n), keeps_store=True))
        if self_kinds:
            steps.append(Step("self", lambda p, n: _self(recipe, p, n), keeps_store=True))
    if recipe.build is not None:
        def build_inputs() -> dict[str, Path]:
            return {"store": layout.trajectories(), **({"self store": layout.trajectories("self")} if self_kinds else {})}

        steps.append(Step("build", lambda p, n: _build(recipe, p, self_kinds),
                          settings=lambda: {"build": _dump(recipe.build), "team": _dump(recipe.team),
                                            "task": _dump(recipe.task), "self": self_kinds},
                          inputs=build_inputs))
    for cfg in trainings:
        steps.append(Step(f"train:{cfg.expert_name}", _train_step(recipe, cfg.expert_name),
                          settings=lambda cfg=cfg: _dump(cfg), inputs=lambda cfg=cfg: _train_inputs(recipe, cfg)))
    for m in recipe.merge.all() if recipe.merge else []:
        steps.append(Step(f"merge:{m.name}", _merge_step(recipe, m), settings=lambda m=m: _dump(m),
                          inputs=lambda m=m: _merge_inputs(recipe, m)))
    if recipe.eval is not None:
        steps.append(Step("eval", lambda p, n: _eval(recipe, p, n), keeps_store=True))
    if recipe.export is not None:
        steps.append(Step("export", lambda p, n: _export(recipe), settings=lambda: _dump(recipe.export),
                          inputs=lambda: _export_inputs(recipe)))
    return steps


# ------------------------------------------------------------------------------------------ the stages


def _debate(recipe: Recipe, progress: bool, new_run: bool) -> tuple[Path, str]:
    from pluribus.stages.debate import run_debate

    s = run_debate(recipe, progress=progress, new_run=new_run)
    return recipe.layout.trajectories(), (
        f"{s.problems} problems; round-0 accuracy {s.round0_accuracy:.1%}, team {s.team_accuracy:.1%}; "
        f"{s.corrected} corrected, {s.lost} lost")


def _self(recipe: Recipe, progress: bool, new_run: bool) -> tuple[Path, str]:
    from pluribus.stages.selfsamples import run_self_samples, self_team

    s = run_self_samples(recipe, progress=progress, new_run=new_run)
    k = len(self_team(recipe).agents)
    return recipe.layout.trajectories("self"), (
        f"{s.problems} problems x {k} samples of the single agent; {s.round0_accuracy:.1%} correct")


def _build(recipe: Recipe, progress: bool, self_kinds: list[str]) -> tuple[Path, str]:
    from pluribus.data.builders.datasets import build
    from pluribus.stages.build import build_recipe
    from pluribus.stages.selfsamples import self_team

    built = build_recipe(recipe, None, overwrite=True, progress=progress)
    summary = ", ".join(f"{b.kind}: {b.rows} rows" for b in built)
    if self_kinds:
        cfg = recipe.require("build")
        match = {b.kind: b.rows for b in built}
        missing = [k for k in self_kinds if k not in match]
        if missing:
            raise PluribusError(f"experts with data: self train on {missing}, which build.kinds does not make for "
                                "the team; add them to build.kinds so both sides have the same kind of data")
        layout = recipe.layout
        from pluribus.data.tasks import load_problems

        mine = build(cfg, [layout.trajectories("self")], kinds=self_kinds, out_root=layout.datasets("self"),
                     team=self_team(recipe), seed=recipe.seed, overwrite=True,
                     trust_remote_code=recipe.trust_remote_code, progress=progress, match_rows=match,
                     problem_ids=[p.id for p in load_problems(recipe.require("task"))])
        summary += "; self: " + ", ".join(f"{b.kind}: {b.rows} rows" for b in mine)
    return recipe.layout.datasets(), summary


def _train_inputs(recipe: Recipe, cfg: Any) -> dict[str, Path]:
    from pluribus.stages.train import expert_inputs

    return expert_inputs(recipe, cfg)


def _train_step(recipe: Recipe, name: str) -> Callable[[bool, bool], tuple[Path, str]]:
    def run(progress: bool, new_run: bool) -> tuple[Path, str]:
        from pluribus.stages.train import train_stage

        # overwrite: a rerun reaches this step only when its inputs changed, so the old adapter is stale
        folder = train_stage(recipe, expert=name, overwrite=True)
        metrics = json.loads((folder / "training_record.json").read_text()).get("metrics", {})
        shown = {k: v for k, v in metrics.items() if ("loss" in k or k.startswith("final_"))
                 and isinstance(v, int | float)}
        return folder, "  ".join(f"{k}={v:.4g}" for k, v in shown.items())
    return run


def _merge_inputs(recipe: Recipe, m: Any) -> dict[str, Path]:
    spec = m.load(recipe.layout)
    out: dict[str, Path] = {}
    for i, inp in enumerate(spec.inputs):
        out[f"input {i}"] = Path(inp.path)
        if inp.adapter:
            out[f"input {i} adapter"] = Path(inp.adapter)
    if spec.base:
        out["base"] = Path(spec.base)
    if m.config:
        out["config"] = Path(m.config)  # edited in place, the merge it names is another
    return {k: v for k, v in out.items() if v.exists()}  # hub ids are named by the settings


def _merge_step(recipe: Recipe, m: Any) -> Callable[[bool, bool], tuple[Path, str]]:
    def run(progress: bool, new_run: bool) -> tuple[Path, str]:
        from pluribus.merge import run_merge

        target = recipe.layout.merged(m.name)
        # overwrite: a rerun reaches this step only when its inputs changed, so the old merge is stale
        summary = run_merge(m.load(recipe.layout), target, overwrite=True)
        return target, " | ".join(summary.lines())
    return run


def _eval(recipe: Recipe, progress: bool, new_run: bool) -> tuple[Path, str]:
    from pluribus.eval.evaluate import run_eval

    payload = run_eval(recipe, progress=progress, new_run=new_run)
    main = payload["tasks"][0]
    return recipe.layout.eval / "results.json", ", ".join(
        f"{name} {r['accuracy']:.1%}" for name, r in main["systems"].items())


def export_source(recipe: Recipe) -> Path:
    """What export publishes by default: the first merge, else the first expert that is not a PRM."""
    cfg = recipe.require("export")
    if cfg.source:
        return Path(cfg.source)
    if recipe.merge is not None:
        return recipe.layout.merged(recipe.merge.all()[0].name)
    experts = [t for t in recipe.train.trainings() if t.objective != "prm"] if recipe.train else []
    return recipe.layout.adapter(experts[0].expert_name if experts else "rsft")


def _export_inputs(recipe: Recipe) -> dict[str, Path]:
    out = {"source": export_source(recipe)}
    results = recipe.layout.eval / "results.json"
    if results.is_file():
        out["eval"] = results
    return out


def _export(recipe: Recipe) -> tuple[Path, str]:
    from pluribus.hub import check_push, export_folder, push_folder

    cfg = recipe.require("export")
    if cfg.repo_id:
        check_push(cfg.repo_id, cfg.token_env)  # before the folder is written
    results = recipe.layout.eval / "results.json"
    out = export_folder(export_source(recipe), recipe.layout.export, datasets=cfg.datasets,
                        eval_results=results if results.is_file() else None, title=f"{recipe.name}",
                        overwrite=cfg.overwrite)
    if cfg.repo_id:
        return out, f"pushed to {push_folder(out, cfg.repo_id, private=cfg.private, token_env=cfg.token_env)}"
    return out, f"Hub-ready folder {out}"


# ------------------------------------------------------------------------------------------ freshness


def _done(recipe: Recipe) -> dict[str, Any]:
    path = recipe.layout.stages
    return json.loads(path.read_text()) if path.is_file() else {}


def _mark(recipe: Recipe, step: Step, output: Path | None) -> None:
    done = _done(recipe)
    done[step.key] = {**step.fingerprint, "output": str(output) if output else None,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(recipe.layout.stages, json.dumps(done, indent=2))


def stale_reason(recipe: Recipe, step: Step) -> str | None:
    """Why ``step`` must run (never ran, settings or an input changed, output gone), or None when it is current."""
    entry = _done(recipe).get(step.key)
    if not entry or "settings" not in entry:
        return "never ran"
    if entry["settings"] != step.fingerprint["settings"]:
        return "its settings changed"
    if entry.get("pluribus") != step.fingerprint["pluribus"]:
        # another version may compute the same settings differently (a fixed bug, a new default)
        before = entry.get("pluribus")
        return f"it ran with pluribus {before}, this is {__version__}" if before else \
            f"it ran with a pluribus before {__version__}"
    old, new = entry.get("inputs", {}), step.fingerprint["inputs"]
    changed = sorted(role for role in set(old) | set(new) if old.get(role) != new.get(role))
    if changed:
        return f"{', '.join(changed)} changed"
    if not entry.get("output") or not Path(entry["output"]).exists():
        return "its output is missing"
    return None


def run_recipe(recipe: Recipe, *, force: bool = False, progress: bool = True, new_run: bool = False,
               console: Console | None = None) -> list[StageResult]:
    """Run every step the recipe has a section for, in order; returns what each step did.

    ``new_run`` is passed to the steps that keep answer stores (debate, self samples, eval): stores written with
    other settings are moved aside instead of refused."""
    console = console or Console(stderr=True)
    steps = plan(recipe)
    if not steps:
        raise PluribusError("nothing to run: the recipe has no stage sections (team/build/train/merge/eval/export)")
    if recipe.export is not None and recipe.export.repo_id:
        from pluribus.hub import check_push

        check_push(recipe.export.repo_id, recipe.export.token_env)  # not after hours of training
    make_dirs(recipe.run_dir)  # an unusable root fails here, before any stage
    from pluribus.threads import apply_threads

    apply_threads(recipe.threads)  # before the first stage loads a model
    results = []
    for step in steps:
        if not step.keeps_store:
            step.compute(recipe.seed)  # now: the inputs are what the steps before it just wrote
            reason = "--force" if force else stale_reason(recipe, step)
            if reason is None:
                results.append(StageResult(step.key, "skipped", 0.0, "up to date (--force reruns it)"))
                console.print(f"[bold]{escape(step.key)}[/]: up to date, skipped")
                continue
            console.rule(f"[bold]{escape(step.key)}[/] [dim](runs: {escape(reason)})")
        else:
            console.rule(f"[bold]{escape(step.key)}")
        t0 = time.perf_counter()
        output, summary = step.run(progress, new_run)
        write_recipe(recipe)  # once a stage has accepted it: a refused config must not replace the run's recipe
        if not step.keeps_store:
            step.compute(recipe.seed)  # the inputs as read (a store step before it may have grown them)
            _mark(recipe, step, output)
        results.append(StageResult(step.key, "ran", time.perf_counter() - t0, summary))
        console.print(f"[bold]{escape(step.key)}[/]: {escape(summary)}", highlight=False)
    return results
