"""The eval stage: every system of the recipe on the same held-out problems (and each transfer task), reported.

Every system runs through the debate stage (a single agent is a team of N=1, R=1), into its own resumable
store under ``<run>/eval/<system>-<mode>/`` (the recipe's held-out split) or ``<run>/eval/tasks/<task>/...``
(``eval.tasks``, for transfer), so an interrupted eval picks up where it stopped and the trajectories behind every
number stay inspectable. A system with an adapter keeps its answers in a folder named by the adapter's contents,
so a retrained adapter is evaluated afresh. The systems are pluribus.eval.systems' registry, their scores
pluribus.eval.scoring's, the report pluribus.eval.report's.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pluribus.config import AgentConfig, EvalConfig, Recipe, TaskConfig, TeamConfig
from pluribus.device import ran_on, read_where
from pluribus.errors import PluribusError
from pluribus.eval.engines import EnginePool
from pluribus.eval.generations import family
from pluribus.eval.members import weights_of
from pluribus.eval.planning import Plan
from pluribus.eval.robustness import perturb
from pluribus.eval.scoring import (
    compare,
    coverage,
    early_stop_effect,
    outcomes,
    robustness_row,
    round_votes,
    score,
    seat_rounds,
    team_gain,
)
from pluribus.eval.systems import Ran, Store, System, TaskRun, plan_systems, store_of, system_of
from pluribus.io import atomic_write_text
from pluribus.layout import RunLayout
from pluribus.stages import Stage, StageSummary

COLUMNS = ("system", "accuracy", "95% interval", "vs single (p)", "first answer", "wrong first corrected",
           "tokens/problem", "s/problem")


def where_systems_ran(parts: dict[str, dict[str, dict[str, str]]]) -> str:
    """results.json's ``ran_on`` (system -> agent -> device and dtype) as one summary line: a system's agents by
    name only where they ran in different places (sc's 15 samples or a team on one device are the system)."""
    return ran_on({f"{system} {agent}" if len({(v.get("device"), v.get("dtype")) for v in agents.values()}) > 1
                   else system: w for system, agents in parts.items() for agent, w in agents.items()})


def summary_of(recipe: Recipe, payload: dict[str, Any]) -> StageSummary:
    """The main task's systems as a table; robustness lines and the report's path after it."""
    versus = {c["system"]: c for c in payload.get("comparisons", [])}
    rows = []
    for name, r in payload["systems"].items():
        c = versus.get(name)
        rows.append((name, f"{r['accuracy']:.1%}", f"{r['accuracy_low']:.0%}-{r['accuracy_high']:.0%}",
                     f"+{c['wins']}/-{c['losses']} ({c['p_value']:.2g})" if c else "",
                     f"{r['first_answer_accuracy']:.1%}", f"{r['wrong_first_corrected']:.1%}",
                     f"{r['tokens_per_problem']:.0f}", f"{r['seconds_per_problem']:.2f}"))
    notes = [f"{name} under {kind}: {r['accuracy']:.1%} ({r['change']:+.1%} vs clean; {r['lost']} lost, "
             f"{r['gained']} gained)" for name, kinds in (payload.get("robustness") or {}).items()
             for kind, r in kinds.items()]
    main = payload["tasks"][0]
    line = ", ".join(f"{name} {r['accuracy']:.1%}" for name, r in main["systems"].items())
    eval_dir = recipe.layout.eval
    warnings = [f"{task['name']}: {name} answered {g['answered']} of its {g['asked']} problems (the others were "
                "skipped: too long for its model); its accuracy is over those it answered, each comparison over "
                "the problems both answered" for task in payload["tasks"]
                for name, g in (task.get("unanswered") or {}).items()]
    warnings += [f"{name}: the token counts of {r['tokens_estimated']} of its {r['problems']} problems are estimates "
                 "(4 characters a token: its server sent no usage and the model's tokenizer is not available "
                 "offline), so its tokens per problem is approximate" for name, r in payload["systems"].items()
                 if r.get("tokens_estimated")]
    warnings += [f"{name}: its token budget is the team's, whose counts are estimates: {name}'s budget is approximate"
                 for name in payload["systems"] if family(name) in ("sc", "member-sc")  # each generation's own team
                 and payload["systems"].get(f"{name[: len(name) - len(family(name))]}team", {}).get("tokens_estimated")]
    where = where_systems_ran(payload.get("ran_on") or {})
    return StageSummary("eval", eval_dir / "results.json", line, COLUMNS, tuple(rows), tuple(warnings),
                        notes=(*notes, *([f"ran on: {where}"] if where else []), f"report: {eval_dir / 'report.md'}"))


def run(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> StageSummary:
    """``pluribus eval``: each system's answers stored (resumable), scored, compared and reported."""

    return summary_of(recipe, run_eval(recipe, progress=progress, new_run=new_run))


def plan(recipe: Recipe) -> list[Stage]:
    """The eval step: it keeps answer stores per system, so it always runs and generates only what is missing."""
    if recipe.eval is None:
        return []
    return [Stage("eval", lambda progress, new_run: run(recipe, progress=progress, new_run=new_run),
                  keeps_store=True)]


def _pending(store: Path, problems: list[Any]) -> bool:
    from pluribus.data.store import TrajectoryStore

    if not (store / "manifest.json").is_file():
        return True
    with TrajectoryStore(store) as existing:
        done = existing.done_ids()
    return any(p.id not in done for p in problems)


def _system_records(recipe: Recipe, folder: Path, team: TeamConfig, problems: list[Any], *, task: Any,
                    progress: bool, fingerprint: str | None = None, new_run: bool = False,
                    label: str = "eval", pool: EnginePool | None = None,
                    seats: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """Run (or resume) one system over ``problems`` in the store under ``folder``; its records for them.

    With ``fingerprint`` (of the weights every agent runs), the store's config hash follows the weights'
    contents, not where they lie, and the backend is built only when something is left to answer (a finished
    store resumes without loading the model). A team on vLLM answers from ``pool``'s engines. ``seats``: a team of
    experts' seat folders (its store follows their contents, as the debate's does).
    """
    from pluribus.data.backends import backend_key, make_backend
    from pluribus.data.store import TrajectoryStore
    from pluribus.stages.debate import run_debate

    sub = recipe.model_copy(update={"root": str(folder.parent), "name": folder.name, "task": task, "team": team,
                                    "train": None, "merge": None, "eval": None, "export": None})
    backends = None
    if pool is not None and pool.serves(team):
        backends = pool.backends(team) if _pending(sub.layout.trajectories(), problems) else {}
    elif fingerprint:
        backends = {}
        if _pending(sub.layout.trajectories(), problems):
            backend = make_backend(team.agents[0], trust_remote_code=recipe.trust_remote_code,
                                   batch_size=team.batch_size, device=recipe.device)
            for a in team.agents:
                backends[backend_key(a)] = backend
    run_debate(sub, problems=problems, progress=progress, backends=backends, new_run=new_run, label=label,
               weights=fingerprint, seats=seats)
    wanted = {p.id for p in problems}
    with TrajectoryStore(sub.layout.trajectories()) as store:
        return [r for r in store.iter_records() if r["problem_id"] in wanted]


def _eval_tasks(recipe: Recipe, cfg: EvalConfig) -> list[tuple[str, TaskConfig, Path]]:
    """(name, task config, store folder) of the recipe's held-out split, then each of ``eval.tasks``."""
    task = recipe.require("task")
    if task.split != "train":
        raise PluribusError(f"task.split is '{task.split}', so the debate (and every expert) already saw the "
                            "held-out problems eval would use; debate on task.split=train")
    main = task.model_copy(update={"split": "heldout", "n": cfg.n or task.n})
    out = [("heldout", main, recipe.layout.eval)]
    same = {"source", "path", "synthetic", "fields", "subset", "hf_split"}
    for t in cfg.tasks:
        one = TaskConfig.model_validate(t.model_dump(exclude={"name", "team"}))
        if one.model_dump(include=same) == task.model_dump(include=same):
            # the training task's own problems: its split decides what was trained on, not the eval task's
            one = one.model_copy(update={"seed": task.seed, "heldout_fraction": task.heldout_fraction})
            if one.split != "heldout":
                raise PluribusError(f"eval task '{t.name}' is the training task itself with split "
                                    f"'{one.split}', which holds training problems; use split: heldout")
        out.append((t.name, one, recipe.layout.eval / "tasks" / t.name))
    return out


def _task_label(task: TaskConfig) -> str:
    return f"{task.source}" + (f":{task.synthetic.level}" if task.source == "synthetic" and task.synthetic.level
                               else f":{Path(task.path).name}" if task.path else "")


def evaluate_task(recipe: Recipe, plans: list[Plan], name: str, task: TaskConfig, eval_dir: Path, *,
                  progress: bool, new_run: bool, robustness: bool, pool: EnginePool | None = None,
                  verifiers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every planned system on one task's problems: results, comparisons, the team's gain, early stopping, the
    team's seats round by round. ``verifiers`` holds the PRMs loaded so far, by folder (shared across tasks)."""
    run = _task_run(recipe, name, task, eval_dir, progress=progress, new_run=new_run, pool=pool, verifiers=verifiers)
    rows: dict[str, dict[str, Any]] = {}  # each system's row of results.json
    where: dict[str, dict[str, dict[str, str]]] = {}  # system -> its agents' device and dtype (pluribus.device)
    adapters: dict[str, dict[str, str | None]] = {}  # which weights each single-agent system's numbers belong to
    robust: dict[str, dict[str, Any]] = {}
    # in each system's order (pluribus.eval.systems): single-greedy first (sc sizes its draws from it), the team
    # before sc (sc spends the team's tokens), a system that re-chooses among another's samples after it
    for plan in sorted(plans, key=lambda p: system_of(p).order):
        system = system_of(plan)
        store = system.store(plan, eval_dir)
        ran = system.run(plan, run, store)
        run.records[plan.label] = ran.records
        rows[plan.label] = {**asdict(score(ran.records, plan.system, plan.mode)), **ran.extra}
        where[plan.label] = read_where(RunLayout(ran.folder).trajectories()) or {}  # where its answers were made
        if store.fingerprint:
            adapters[plan.label] = {"path": plan.adapter or plan.team.agents[0].model, "fingerprint": store.fingerprint}
        if robustness and system.perturbed and run.cfg.robustness:
            robust[plan.label] = _perturbed(run, plan, system, store, ran)
    return _task_results(run, plans, name, task, rows, where, adapters, robust)


def _task_run(recipe: Recipe, name: str, task: TaskConfig, eval_dir: Path, *, progress: bool, new_run: bool,
              pool: EnginePool | None, verifiers: dict[str, Any] | None) -> TaskRun:
    """The task's problems (the team's: the first eval.team_n) and how a system answers them: the debate stage
    over its resumable store, on ``pool``'s engines where its agents run on vLLM."""
    from pluribus.data.tasks import load_problems

    cfg = recipe.eval or EvalConfig()
    problems = load_problems(task)
    if not problems:
        raise PluribusError(f"eval task '{name}' selects no problems; check its source, split and n")

    def answer(folder: Path, team: TeamConfig, some: list[Any], *, fingerprint: str | None = None, label: str,
               seats: dict[str, Path] | None = None) -> list[dict[str, Any]]:
        return _system_records(recipe, folder, team, some, task=task, progress=progress, fingerprint=fingerprint,
                               new_run=new_run, label=label, pool=pool, seats=seats)

    return TaskRun(recipe=recipe, cfg=cfg, eval_dir=eval_dir, problems=problems,
                   team_problems=problems[: cfg.team_n] if cfg.team_n else problems, answer=answer,
                   verifiers={} if verifiers is None else verifiers)


def _perturbed(run: TaskRun, plan: Plan, system: System, store: Store, clean: Ran) -> dict[str, Any]:
    """``plan`` on perturbed copies of its problems (each of ``eval.robustness``), in stores of their own
    (``<eval>/<label>-<kind>/``), against its clean answers."""
    out = {}
    for kind in run.cfg.robustness:
        varied = [perturb(p, kind) for p in system.problems(run)]
        folder = run.eval_dir / f"{plan.label}-{kind}"
        folder = folder / store.key if store.key else folder
        answers = run.answer(folder, plan.team, varied, fingerprint=store.fingerprint, label=f"{plan.label}-{kind}",
                             seats=plan.seats)
        out[kind] = robustness_row(clean.records, answers, plan.system, plan.mode)
    return out


def _task_results(run: TaskRun, plans: list[Plan], name: str, task: TaskConfig, rows: dict[str, dict[str, Any]],
                  where: dict[str, Any], adapters: dict[str, Any], robust: dict[str, Any]) -> dict[str, Any]:
    """One task's entry of results.json: the systems' rows in the order the recipe asks, the comparisons with the
    single agent, who left problems unanswered, the team's gain, early stopping and seats, robustness."""
    records = run.records
    team_ids = {p.id for p in run.team_problems}
    out: dict[str, Any] = {
        "name": name, "task": _task_label(task), "split": task.split, "problems": len(run.problems),
        "team_problems": len(run.team_problems) if any(system_of(p).on_team_problems for p in plans) else 0,
        "systems": {p.label: rows[p.label] for p in plans},
        "comparisons": compare({k: outcomes(v) for k, v in records.items()}),
        "outcomes": {k: outcomes(v) for k, v in records.items()},  # per problem; run_eval drops it from results.json
        "ran_on": {p.label: where[p.label] for p in plans},
    }
    if adapters:
        out["adapters"] = adapters
    # sc runs on the team's answered problems by design (the report says so); every other system on all it was asked
    asked = {p.label: ids for p in plans if (ids := system_of(p).asked(run)) is not None}
    if gaps := coverage(records, asked):
        out["unanswered"] = gaps
    gain = team_gain(records, team_ids)
    if gain:
        out["team_gain"] = gain
    if debates := _debate_rounds(records):
        out["debate_rounds"] = debates
    if versus := _team_versus(records, out["outcomes"]):
        out["team_versus"] = versus
    if robust:
        out["robustness"] = robust
    return out


def run_eval(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> dict[str, Any]:
    """Evaluate every planned system on the held-out split and on ``eval.tasks``; write results.json, report.md
    and the plots. ``new_run`` moves aside a system's stored answers written with other settings (else refused)."""
    from pluribus.eval.report import write_report
    from pluribus.stages.debate import check_team_models

    cfg = recipe.eval or EvalConfig()
    plans = [*plan_systems(recipe), *generation_plans(recipe)]
    for p in plans:  # every system's models and adapter, before the first system writes anything
        check_team_models(p.team, progress=progress)
    tasks = []
    with_team = {t.name for t in cfg.tasks if t.team}
    pool = EnginePool(plans, trust_remote_code=recipe.trust_remote_code)
    verifiers: dict[str, Any] = {}  # the PRMs loaded, by folder: once for every task
    try:
        for i, (name, task, folder) in enumerate(_eval_tasks(recipe, cfg)):
            # the team and sc run on the recipe's own task; a transfer task measures the single-agent systems,
            # and the team and sc too where it says team: true
            mine = plans if i == 0 or name in with_team else [p for p in plans
                                                              if not system_of(p).on_team_problems]
            tasks.append(evaluate_task(recipe, mine, name, task, folder, progress=progress, new_run=new_run,
                                       robustness=i == 0, pool=pool, verifiers=verifiers))
    finally:
        pool.close()
    main = tasks[0]
    generations = per_generation(recipe, plans, main) if recipe.generations and recipe.generations.count > 1 \
        else None
    for t in tasks:
        t.pop("outcomes")
    payload: dict[str, Any] = {
        "run": recipe.name, "task": main["task"], "split": "heldout", "problems": main["problems"],
        "systems": main["systems"], "comparisons": main["comparisons"], "tasks": tasks,
        "ran_on": main["ran_on"],
    }
    distilled = next((a for k, a in main.get("adapters", {}).items() if k.startswith("distilled")), None)
    if distilled:
        payload["adapter"] = distilled  # which adapter the distilled numbers belong to
    if main.get("robustness"):
        payload["robustness"] = main["robustness"]
    eval_dir = recipe.layout.eval
    if generations is not None:
        payload["generations"] = generations
    elif recipe.team is not None and recipe.build is not None and recipe.train is not None:
        payload["next_generation"] = True  # a debate that trained experts: the report says how to go on
    atomic_write_text(eval_dir / "results.json", json.dumps(payload, indent=2))
    write_report(payload, eval_dir)
    if "generations" in payload:
        from pluribus.eval.report import write_generations_plot

        write_generations_plot(payload, eval_dir)
    return payload


# ------------------------------------------------------------------------------------------ generations


def generation_plans(recipe: Recipe, *, check: bool = True) -> list[Plan]:
    """The systems of generations 2.. that run (pluribus.generations.last_generation), labelled ``gen<g>/<name>``:
    each generation's team, sc at its team's budget, experts and merges. The single base agent and ``distilled``
    (one adapter) are generation 1's alone."""
    from pluribus.generations import generation_recipe, last_generation

    out = []
    for g in range(2, last_generation(recipe) + 1):
        gen = generation_recipe(recipe, g).model_copy(update={"eval": recipe.eval})
        out += _of_generation([p for p in plan_systems(gen, check=check) if system_of(p).per_generation], g)
    return out


def _of_generation(plans: list[Plan], g: int) -> list[Plan]:
    """``plans`` as systems of generation ``g``: labelled with its prefix (pluribus.generations.prefix)."""
    from dataclasses import replace

    from pluribus.generations import prefix

    return [replace(p, label=f"{prefix(g)}{p.label}", generation=g) for p in plans]


def students_accuracy(recipe: Recipe, g: int, *, progress: bool = True, new_run: bool = False
                      ) -> tuple[tuple[str, float], int]:
    """Generation ``g``'s best student (label, accuracy) on eval's held-out problems, and how many problems:
    every expert but PRMs and every merge, greedy (generation 0: the base single agent). The answers go to the
    stores eval keeps for the same systems, so eval reuses them."""
    from pluribus.data.tasks import load_problems
    from pluribus.generations import generation_recipe

    cfg = (recipe.eval or EvalConfig()).model_copy(update={"modes": ["greedy"], "systems": None})
    gen = (recipe if g == 0 else generation_recipe(recipe, g)).model_copy(update={"eval": cfg})
    plans = _of_generation([p for p in plan_systems(gen) if (p.system == "single" if g == 0 else
                                                             system_of(p).student)], max(1, g))
    if not plans:
        raise PluribusError(f"generation {g} has no student to compare (no expert but PRMs, no merge); "
                            "generations.stop_if_no_gain needs one")
    _, task, eval_dir = _eval_tasks(recipe, recipe.eval or EvalConfig())[0]
    problems = load_problems(task)
    scored = []
    for plan in plans:
        folder, fingerprint = store_of(plan, eval_dir)
        recs = _system_records(recipe, folder, plan.team, problems, task=task, progress=progress,
                               fingerprint=fingerprint, new_run=new_run, label=plan.label)
        scored.append((plan.label, score(recs, plan.system, plan.mode).accuracy))
    return max(scored, key=lambda s: s[1]), len(problems)


def _member(agent: AgentConfig, i: int, first: AgentConfig, previous: str) -> str:
    """The eval label of a team seat alone: its expert or merge of the generation before (greedy), or for an
    unseated agent single-greedy when it runs the first agent's weights (what the single agent runs); another
    unseated agent was not evaluated alone, and its label says so (the report lists it)."""
    if agent.expert is not None:
        return f"{previous}{agent.expert}-greedy"
    if weights_of(agent) == weights_of(first):
        return "single-greedy"
    return f"{agent.name or f'agent {i}'} ({agent.model}{'+' + agent.adapter if agent.adapter else ''})"


def _debate_rounds(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every generation's team (``team``, ``gen2/team``, ...), round by round: each round's vote, each seat's first
    round against its last, and what early stopping does; only teams that debated more than one round."""
    out = {}
    for label, recs in records.items():
        if family(label) != "team" or max((len(r["rounds"]) for r in recs), default=0) < 2:
            continue
        out[label] = {"votes": round_votes(recs), "seats": seat_rounds(recs), "early_stop": early_stop_effect(recs)}
    return out


def _team_versus(records: dict[str, Any], outcomes: dict[str, dict[str, bool]]) -> list[dict[str, Any]]:
    """Would the team's strongest member, at the team's budget, do as well as the debate? In each generation
    where member-sc ran: its team as it votes and as the PRM re-chooses its transcripts, against each chooser of
    each agent sampled at its budget (exact McNemar)."""
    from pluribus.eval.generations import team_against

    rows = []
    for prefix in dict.fromkeys(label[: len(label) - len("member-sc")] for label in records
                                if family(label) == "member-sc"):
        others = tuple((role, f"{prefix}{name}") for role, name in (
            ("member, vote", "member-sc"), ("member, PRM", "member-prm-bon"), ("base agent, vote", "sc"),
            ("base agent, PRM", "prm-bon")))
        rows += [row for team in ("team", "team-prm") for row in team_against(f"{prefix}{team}", others, outcomes)]
    return rows


def per_generation(recipe: Recipe, plans: list[Plan], main: dict[str, Any]) -> dict[str, Any]:
    """The report's question per generation (pluribus.eval.generations), from the main task's scored systems."""
    from pluribus.eval.generations import GenerationSystems, answer
    from pluribus.generations import CRITERION, generation_recipe, prefix, self_student

    student = self_student(recipe)
    first = recipe.require("team").agents[0]
    roles = []
    for g in sorted({p.generation for p in plans}):
        mine = [p for p in plans if p.generation == g]
        own, previous = prefix(g), prefix(max(1, g - 1))  # previous: where its seats were evaluated
        agents = generation_recipe(recipe, g).require("team").agents
        members = [_member(a, i, first, previous) for i, a in enumerate(agents)]
        roles.append(GenerationSystems(
            generation=g, team=f"{own}team" if any(p.system == "team" for p in mine) else None,
            members=tuple(dict.fromkeys(members)),
            sc=f"{own}sc" if any(p.system == "sc" for p in mine) else None,
            verifier=f"{own}prm-bon" if any(p.system == "prm-bon" for p in mine) else None,
            team_verifier=f"{own}team-prm" if any(p.system == "team-prm" for p in mine) else None,
            member_sc=f"{own}member-sc" if any(p.system == "member-sc" for p in mine) else None,
            member_verifier=f"{own}member-prm-bon" if any(p.system == "member-prm-bon" for p in mine) else None,
            students=tuple(p.label for p in mine if system_of(p).student and p.mode == "greedy"),
            self_baseline=f"{own}{student}-greedy" if student else None))
    out = answer(roles, main)
    record = recipe.layout.generations_record
    if recipe.generations is not None and recipe.generations.stop_if_no_gain:  # a record of an earlier run without it stops nothing
        out["stop_checks"] = json.loads(record.read_text()) if record.is_file() else {"criterion": CRITERION,
                                                                                      "checks": {}}
    return out
