"""The eval stage: single base agent vs debate team vs distilled model on the same held-out problems.

Every system runs through the debate engine (a single agent is a team of N=1, R=1), into its own resumable
store under ``<run>/eval/<system>-<mode>/``, so an interrupted eval picks up where it stopped and the
trajectories behind every number stay inspectable. The distilled system's answers depend on its adapter's
contents, not its path: its store is ``<run>/eval/distilled-<mode>/<adapter fingerprint>/``, so a retrained
or different adapter gets fresh answers, returning to an earlier one resumes its answers, and a moved run
folder resumes as before. Each accuracy comes with its 95% Wilson interval, each
system is compared with the single base agent on the same problems (exact McNemar test), and with
``eval.robustness`` every system also answers perturbed copies of the problems, stored under
``<run>/eval/<system>-<mode>-<perturbation>/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pluribus.config import EvalConfig, Recipe, TeamConfig
from pluribus.errors import PluribusError
from pluribus.eval.robustness import original_id, perturb
from pluribus.eval.stats import mcnemar_exact, paired, wilson_interval
from pluribus.io import atomic_write_text
from pluribus.models import read_adapter_config


@dataclass(frozen=True)
class SystemResult:
    """What one system scored on the held-out problems."""

    system: str
    mode: str
    problems: int
    correct: int
    accuracy: float
    accuracy_low: float  # 95% Wilson interval
    accuracy_high: float
    first_answer_accuracy: float  # round 0, averaged over agents
    tokens_per_problem: float
    seconds_per_problem: float
    wrong_first_corrected: float  # of round-0 wrong agent answers, the fraction right in the last round
    unparsable: float  # fraction of final-round turns with no parsable answer


def _single(team: TeamConfig, *, adapter: str | None, model: str | None, mode: str, cfg: EvalConfig,
            name: str) -> TeamConfig:
    """The team's first agent alone (N=1, R=1), asked with the team's prompts so every system gets the same question."""
    agent = team.agents[0]
    sampling = agent.sampling.model_copy(update={
        "temperature": cfg.temperature if mode == "sampled" else 0.0,
        **({"max_new_tokens": cfg.max_new_tokens} if cfg.max_new_tokens else {}),
    })
    member = agent.model_copy(update={"name": name, "persona": None, "adapter": adapter, "sampling": sampling,
                                      **({"model": model} if model else {})})
    return team.model_copy(update={"agents": [member], "rounds": 1, "topology": "all", "aggregation": "majority",
                                   "judge": None, "problems_per_step": None})


def _team(team: TeamConfig, cfg: EvalConfig) -> TeamConfig:
    if not cfg.max_new_tokens:
        return team
    agents = [a.model_copy(update={"sampling": a.sampling.model_copy(update={"max_new_tokens": cfg.max_new_tokens})})
              for a in team.agents]
    return team.model_copy(update={"agents": agents})


def default_adapter(recipe: Recipe) -> Path:
    stage = recipe.train.stage if recipe.train else "rsft"
    return recipe.run_dir / "adapters" / stage


def adapter_fingerprint(adapter: str | Path) -> str:
    """A short sha256 of the adapter's config and weights files: what the distilled system's answers depend on."""
    folder = Path(adapter)
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "adapter_config.json" or f.name.startswith("adapter_model."):
            digest.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def plan_systems(recipe: Recipe) -> list[tuple[str, str, TeamConfig]]:
    """(system, mode, team) for every requested system and decoding mode, validated before anything runs."""
    cfg = recipe.eval or EvalConfig()
    team = recipe.require("team")
    plans: list[tuple[str, str, TeamConfig]] = []
    for system in cfg.systems:
        if system == "team":
            plans.append(("team", "as-configured", _team(team, cfg)))
            continue
        for mode in cfg.modes:
            if system == "single":
                plans.append(("single", mode, _single(team, adapter=None, model=None, mode=mode, cfg=cfg,
                                                      name="single")))
            else:
                adapter = Path(cfg.adapter) if cfg.adapter else default_adapter(recipe)
                if cfg.adapter and not adapter.exists():
                    raise PluribusError(f"eval.adapter '{adapter}' does not exist; set eval.adapter to a trained "
                                        "adapter folder, or drop 'distilled' from eval.systems")
                if not (adapter / "adapter_config.json").is_file():
                    raise PluribusError(
                        f"the distilled system needs an adapter; '{adapter}' has none. Train one first "
                        "(pluribus train RECIPE) or set eval.adapter, or drop 'distilled' from eval.systems"
                    )
                read_adapter_config(adapter)
                student = recipe.train.model if recipe.train else None
                plans.append(("distilled", mode, _single(team, adapter=str(adapter), model=student, mode=mode,
                                                         cfg=cfg, name="distilled")))
    return plans


def score(records: list[dict[str, Any]], system: str, mode: str) -> SystemResult:
    """Accuracy (with its 95% interval), cost and self-correction over a system's stored trajectories."""
    n = len(records)
    first = [t for r in records for t in r["rounds"][0]]
    last = [t for r in records for t in r["rounds"][-1]]
    wrong_first = corrected = 0
    for r in records:
        for a, b in zip(r["rounds"][0], r["rounds"][-1], strict=True):
            if not a["correct"]:
                wrong_first += 1
                corrected += bool(b["correct"])
    correct = sum(bool(r["final_correct"]) for r in records)
    low, high = wilson_interval(correct, n)
    return SystemResult(
        system=system, mode=mode, problems=n, correct=correct,
        accuracy=correct / n if n else 0.0, accuracy_low=low, accuracy_high=high,
        first_answer_accuracy=sum(bool(t["correct"]) for t in first) / len(first) if first else 0.0,
        tokens_per_problem=sum(r["cost"]["tokens_in"] + r["cost"]["tokens_out"] for r in records) / n if n else 0.0,
        seconds_per_problem=sum(r["cost"]["seconds"] for r in records) / n if n else 0.0,
        wrong_first_corrected=corrected / wrong_first if wrong_first and len(records[0]["rounds"]) > 1 else 0.0,
        unparsable=sum(t["answer"] is None for t in last) / len(last) if last else 0.0,
    )


def outcomes(records: list[dict[str, Any]]) -> dict[str, bool]:
    """Whether each problem (by its original id, perturbation suffix stripped) was answered correctly."""
    return {original_id(r["problem_id"]): bool(r["final_correct"]) for r in records}


def compare(results: dict[str, dict[str, bool]]) -> list[dict[str, Any]]:
    """Every system against the single base agent of the same decoding (greedy if it has none), paired by problem."""
    singles = [k for k in results if k.startswith("single-")]
    if not singles:
        return []
    fallback = "single-greedy" if "single-greedy" in results else singles[0]
    out = []
    for label, solved in results.items():
        if label in singles:
            continue
        same_mode = f"single-{label.rsplit('-', 1)[-1]}"
        baseline = same_mode if same_mode in results else fallback
        wins, losses, shared = paired(solved, results[baseline])
        out.append({"system": label, "baseline": baseline, "problems": shared, "wins": wins, "losses": losses,
                    "p_value": mcnemar_exact(wins, losses)})
    return out


def _folder(eval_dir: Path, label: str, fingerprint: str | None) -> Path:
    return eval_dir / label / fingerprint if fingerprint else eval_dir / label


def _pending(store: Path, problems: list[Any]) -> bool:
    from pluribus.data.store import TrajectoryStore

    if not (store / "manifest.json").is_file():
        return True
    with TrajectoryStore(store) as existing:
        done = existing.done_ids()
    return any(p.id not in done for p in problems)


def _system_records(recipe: Recipe, folder: Path, task: Any, team: TeamConfig, problems: list[Any],
                    progress: bool, fingerprint: str | None = None, new_run: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) one system over ``problems`` in the store under ``folder``; its records for them.

    With ``fingerprint``, the team's single agent is stored as using adapter ``sha256:<fingerprint>``: the
    store's config hash then follows the adapter's contents, not where it lies, and the backend is built here
    from the real path (only when something is left to answer, so a finished store resumes without loading).
    """
    from pluribus.data.backends import backend_key, make_backend
    from pluribus.data.debate import run_debate
    from pluribus.data.store import TrajectoryStore

    sub = recipe.model_copy(update={"root": str(folder.parent), "name": folder.name, "task": task, "team": team,
                                    "eval": None})
    backends = None
    if fingerprint:
        agent = team.agents[0]
        keyed = agent.model_copy(update={"adapter": f"sha256:{fingerprint}"})
        sub = sub.model_copy(update={"team": team.model_copy(update={"agents": [keyed]})})
        backends = {}
        if _pending(sub.run_dir / "trajectories", problems):
            backends[backend_key(keyed)] = make_backend(agent, trust_remote_code=recipe.trust_remote_code,
                                                        batch_size=team.batch_size)
    # the bar names the system (single-greedy, team, ...), not "debate"
    label = folder.parent.name if fingerprint else folder.name
    run_debate(sub, problems=problems, progress=progress, backends=backends, new_run=new_run, label=label)
    wanted = {p.id for p in problems}
    with TrajectoryStore(sub.run_dir / "trajectories") as store:
        return [r for r in store.iter_records() if r["problem_id"] in wanted]


def run_eval(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> dict[str, Any]:
    """Evaluate every planned system on the held-out split; write results.json, report.md and a plot.

    ``new_run`` moves aside a system's stored answers written with other settings (otherwise refused)."""
    from pluribus.data.debate import check_models
    from pluribus.data.tasks import load_problems
    from pluribus.eval.report import write_report

    cfg = recipe.eval or EvalConfig()
    task = recipe.require("task")
    task = task.model_copy(update={"split": "heldout", "n": cfg.n or task.n})
    problems = load_problems(task)
    if not problems:
        raise PluribusError("the held-out split is empty; raise task.heldout_fraction or the number of problems")
    plans = plan_systems(recipe)
    for _, _, team in plans:  # every system's models and adapter, before the first system writes anything
        check_models(team)
    eval_dir = recipe.run_dir / "eval"
    systems: dict[str, dict[str, Any]] = {}
    solved: dict[str, dict[str, bool]] = {}
    robustness: dict[str, dict[str, Any]] = {}
    adapter: dict[str, str] = {}
    for system, mode, team in plans:
        label = f"{system}-{mode}" if system != "team" else "team"
        fingerprint = None
        if system == "distilled":
            fingerprint = adapter_fingerprint(team.agents[0].adapter or "")
            adapter = {"path": team.agents[0].adapter or "", "fingerprint": fingerprint}
        records = _system_records(recipe, _folder(eval_dir, label, fingerprint), task, team, problems, progress,
                                  fingerprint, new_run)
        systems[label] = asdict(score(records, system, mode))
        solved[label] = outcomes(records)
        for kind in cfg.robustness:
            varied = [perturb(p, kind) for p in problems]
            perturbed = _system_records(recipe, _folder(eval_dir, f"{label}-{kind}", fingerprint), task, team,
                                        varied, progress, fingerprint, new_run)
            result = score(perturbed, system, mode)
            lost, gained, _ = paired(solved[label], outcomes(perturbed))
            robustness.setdefault(label, {})[kind] = {
                "accuracy": result.accuracy, "accuracy_low": result.accuracy_low,
                "accuracy_high": result.accuracy_high, "change": result.accuracy - systems[label]["accuracy"],
                "lost": lost, "gained": gained, "p_value": mcnemar_exact(lost, gained),
            }
    payload: dict[str, Any] = {
        "run": recipe.name,
        "task": f"{task.source}" + (f":{task.synthetic.level}" if task.source == "synthetic" and task.synthetic.level
                                    else ""),
        "split": "heldout",
        "problems": len(problems),
        "systems": systems,
        "comparisons": compare(solved),
    }
    if adapter:
        payload["adapter"] = adapter  # which adapter the distilled numbers belong to
    if robustness:
        payload["robustness"] = robustness
    atomic_write_text(eval_dir / "results.json", json.dumps(payload, indent=2))
    write_report(payload, eval_dir)
    return payload
