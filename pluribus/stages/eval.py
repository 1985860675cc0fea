"""The eval stage: every system of the recipe on the same held-out problems (and each transfer task), reported.

Every system runs through the debate stage (a single agent is a team of N=1, R=1), into its own resumable
store under ``<run>/eval/<system>-<mode>/`` (the recipe's held-out split) or ``<run>/eval/tasks/<task>/...``
(``eval.tasks``, for transfer), so an interrupted eval picks up where it stopped and the trajectories behind every
number stay inspectable. A system with an adapter keeps its answers in a folder named by the adapter's contents,
so a retrained adapter is evaluated afresh. Scoring is pluribus.eval.evaluate's; the report pluribus.eval.report's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pluribus.adapter import adapter_fingerprint
from pluribus.config import AgentConfig, EvalConfig, Recipe, TaskConfig, TeamConfig
from pluribus.device import ran_on, read_where
from pluribus.errors import PluribusError
from pluribus.eval.evaluate import (
    Plan,
    _sc_team,
    _single,
    _tokens,
    best_of_n,
    budget_vote,
    chooser_agreement,
    compare,
    coverage,
    early_stop_effect,
    outcomes,
    plan_systems,
    robustness_row,
    score,
    seat_rounds,
    team_gain,
)
from pluribus.eval.robustness import perturb
from pluribus.io import atomic_write_text, content_fingerprint
from pluribus.layout import RunLayout
from pluribus.merge import merge_record
from pluribus.seats import base_team, source_of
from pluribus.stages import Stage, StageSummary

COLUMNS = ("system", "accuracy", "95% interval", "vs single (p)", "first answer", "wrong first corrected",
           "tokens/problem", "s/problem")


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
    team_guessed = bool(payload["systems"].get("team", {}).get("tokens_estimated"))
    warnings += [f"{name}: the token counts of {r['tokens_estimated']} of its {r['problems']} problems are estimates "
                 "(4 characters a token: its server sent no usage and the model's tokenizer is not available "
                 "offline), so its tokens per problem is approximate" for name, r in payload["systems"].items()
                 if r.get("tokens_estimated")]
    if team_guessed and "sc" in payload["systems"]:
        warnings.append("sc: its token budget is the team's, whose counts are estimates: sc's budget is approximate")
    where = ran_on({f"{system} {agent}" if len(parts) > 1 else system: w
                    for system, parts in (payload.get("ran_on") or {}).items() for agent, w in parts.items()})
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


class EnginePool:
    """The vLLM engines of one eval: one per base model, started on first use and shared by every system on it
    (the single agent, the team's agents, sc, each expert and adapter merge as a LoRA request), closed when the
    eval ends. An engine start costs half a minute to minutes on CPU, and an eval has a dozen systems."""

    def __init__(self, plans: list[Plan], *, trust_remote_code: bool) -> None:
        from pluribus.data.vllm_engine import adapter_rank

        agents = [a for p in plans if self.serves(p.team) for a in self._agents(p.team)]
        ranks = [adapter_rank(a.adapter) for a in agents if a.adapter]
        self.rank = max(ranks) if ranks else None  # one LoRA rank that holds every adapter the eval asks for
        self.bases = {self._key(a) for a in agents}  # engines at once: they share a GPU's memory evenly
        self.trust_remote_code = trust_remote_code
        self.engines: dict[tuple, Any] = {}
        self.lora_ids: dict[str, int] = {}

    @staticmethod
    def _agents(team: TeamConfig) -> list[Any]:
        return [*team.agents, *([team.judge] if team.judge else [])]

    @staticmethod
    def _key(agent: Any) -> tuple:
        from pluribus.data.backends import backend_key

        return backend_key(agent.model_copy(update={"adapter": None}))

    def serves(self, team: TeamConfig) -> bool:
        """Whether every agent of ``team`` runs on in-process vLLM (a mixed team builds its own backends)."""
        return all(a.backend == "vllm" for a in self._agents(team))

    def backends(self, team: TeamConfig) -> dict[tuple, Any]:
        """The team's backends, keyed as the debate keys them: views of the pool's engines."""
        from pluribus.data.backends import VLLMBackend, backend_key
        from pluribus.data.vllm_engine import GPU_MEMORY_SHARE

        out = {}
        for a in self._agents(team):
            key = self._key(a)
            if key not in self.engines:
                self.engines[key] = VLLMBackend(a.model_copy(update={"adapter": None}),
                                                trust_remote_code=self.trust_remote_code, lora_rank=self.rank,
                                                gpu_share=GPU_MEMORY_SHARE / max(1, len(self.bases)))
            lora_id = self.lora_ids.setdefault(str(a.adapter), len(self.lora_ids) + 1) if a.adapter else 0
            out[backend_key(a)] = self.engines[key].with_adapter(a.adapter, lora_id)
        return out

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()


def _pending(store: Path, problems: list[Any]) -> bool:
    from pluribus.data.store import TrajectoryStore

    if not (store / "manifest.json").is_file():
        return True
    with TrajectoryStore(store) as existing:
        done = existing.done_ids()
    return any(p.id not in done for p in problems)


def _system_records(recipe: Recipe, folder: Path, task: Any, team: TeamConfig, problems: list[Any],
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


def store_of(plan: Plan, eval_dir: Path) -> tuple[Path, str | None]:
    """Where ``plan``'s answers are stored under ``eval_dir``, and the fingerprint of its weights: a system with
    an adapter (or a full merged model) keeps them in a folder named by its contents."""
    fingerprint = adapter_fingerprint(plan.adapter) if plan.adapter else None
    if plan.system == "merged" and not plan.adapter:
        fingerprint = adapter_fingerprint(plan.team.agents[0].model)
    return (eval_dir / plan.label / fingerprint if fingerprint else eval_dir / plan.label), fingerprint


def _prm_best_of_n(recipe: Recipe, plan: Plan, among: str, voted: list[dict[str, Any]], eval_dir: Path,
                   verifiers: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """prm-bon's or team-prm's records (``best_of_n`` over sc's voted samples or the team's transcripts) and what
    the report says of it: the PRM, how it agrees with the vote, its own quality from its training record. The
    choices are written to ``<eval>/<system>/<the PRM's fingerprint>/choices.jsonl`` (every step score), to be
    inspected."""
    from pluribus.distill.prm import PRMScorer, prm_reading

    assert plan.verifier is not None
    how = recipe.require("team").verifier_aggregate
    if plan.verifier not in verifiers:
        # on eval's device where it names one, else the recipe's (pluribus.device)
        where = recipe.eval.device if recipe.eval is not None and recipe.eval.device else recipe.device
        verifiers[plan.verifier] = PRMScorer(plan.verifier, trust_remote_code=recipe.trust_remote_code,
                                             device=where)
    recs = best_of_n(voted, verifiers[plan.verifier], how)
    fingerprint = content_fingerprint(plan.verifier)
    atomic_write_text(eval_dir / plan.label / str(fingerprint) / "choices.jsonl",
                      "".join(json.dumps(r) + "\n" for r in recs))
    reading = prm_reading(plan.verifier)
    quality = ({"source": "prm_metrics", **reading["metrics"]} if reading["metrics"] else
               {"source": "held-out steps at training (eval_step_*)", **reading["step_metrics"]}
               if reading["step_metrics"] else None)
    return recs, {"verifier": plan.verifier, "verifier_fingerprint": fingerprint, "verifier_aggregate": how,
                  "verifier_prompt": reading["source"], "vote": among, "vs_vote": chooser_agreement(voted, recs),
                  "verifier_quality": quality}


def evaluate_task(recipe: Recipe, plans: list[Plan], name: str, task: TaskConfig, eval_dir: Path, *,
                  progress: bool, new_run: bool, robustness: bool, pool: EnginePool | None = None,
                  verifiers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every planned system on one task's problems: results, comparisons, the team's gain, early stopping, the
    team's seats round by round. ``verifiers`` holds the PRMs loaded so far, by folder (shared across tasks)."""
    from pluribus.data.tasks import load_problems

    verifiers = {} if verifiers is None else verifiers
    cfg = recipe.eval or EvalConfig()
    problems = load_problems(task)
    if not problems:
        raise PluribusError(f"eval task '{name}' selects no problems; check its source, split and n")
    team_problems = problems[: cfg.team_n] if cfg.team_n else problems
    team_ids = {p.id for p in team_problems}
    results: dict[str, dict[str, Any]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    robust: dict[str, dict[str, Any]] = {}
    sc_info: dict[str, Any] = {}
    bon_info: dict[str, Any] = {}
    adapters: dict[str, dict[str, str | None]] = {}  # which weights each single-agent system's numbers belong to
    where_of: dict[str, dict[str, dict[str, str]]] = {}  # system -> its agents' device and dtype (pluribus.device)
    # single-greedy first (sc sizes its draws from it), the team before sc (sc spends the team's tokens)
    order = sorted(plans, key=lambda p: {"single": 0, "team": 1, "sc": 2}.get(p.system, 3))
    for plan in order:
        mine = team_problems if plan.system in ("team", "sc") else problems
        folder, fingerprint = store_of(plan, eval_dir)
        # a team that aggregates with a PRM: a retrained PRM answers in stores of its own
        sub = f"prm-{content_fingerprint(plan.verifier)}" if plan.system == "team" and plan.verifier else None
        if sub:
            folder = eval_dir / plan.label / sub
        if plan.system == "sc":
            if f"{plan.prefix}team" not in records:
                raise PluribusError("eval system 'sc' spends the team's tokens: add 'team' to eval.systems")
            team_tokens = {r["problem_id"]: _tokens(r) for r in records[f"{plan.prefix}team"]}
            mine = [p for p in mine if p.id in team_tokens][: cfg.sc_n]  # a problem the team skipped has no budget
            if not mine:
                raise PluribusError("eval system 'sc' has no problem to run: the team answered none of them")
            single = _single(base_team(recipe.require("team"), source_of(recipe)), adapter=None, model=None,
                             mode="greedy", cfg=cfg, name="single", prompt=plan.team.prompts["question"])
            greedy = records.get("single-greedy") or _system_records(
                recipe, eval_dir / "single-greedy", task, single, problems, progress, None, new_run,
                label="single-greedy", pool=pool)
            # enough draws to reach the team's budget on 9 problems of 10 (the report says on how many it did)
            per_sample = sum(_tokens(r) for r in greedy) / max(1, len(greedy))
            spent = sorted(team_tokens.values())
            q90 = spent[min(len(spent) - 1, math.ceil(0.9 * len(spent)) - 1)]
            k = max(1, min(cfg.sc_max_samples, math.ceil(1.1 * q90 / max(1.0, per_sample))))
            draws = _system_records(recipe, eval_dir / "sc" / f"k{k}", task,
                                    _sc_team(plan.team, k, cfg.temperature, recipe.seed), mine, progress, None, new_run,
                                    label=f"sc (k={k})", pool=pool)
            voted, used = [], []
            for r in draws:
                v, u = budget_vote(r, team_tokens[r["problem_id"]])
                voted.append(v)
                used.append(u)
            reached = sum(_tokens(v) >= team_tokens[v["problem_id"]] for v in voted)
            sc_info = {"samples_drawn": k, "mean_samples_used": sum(used) / max(1, len(used)),
                       "budget_reached": reached / max(1, len(voted))}
            recs = voted
            folder = eval_dir / "sc" / f"k{k}"
        elif plan.system in ("prm-bon", "team-prm"):
            # the same generation's sc or team (generation g's labels start with gen<g>/)
            among = plan.prefix + ("sc" if plan.system == "prm-bon" else "team")
            if among not in records:
                raise PluribusError(f"eval system '{plan.system}' chooses among {among}'s answers, and {among} did "
                                    "not run here")
            recs, bon_info = _prm_best_of_n(recipe, plan, among, records[among], eval_dir, verifiers)
        else:
            recs = _system_records(recipe, folder, task, plan.team, mine, progress, fingerprint, new_run,
                                   label=plan.label, pool=pool, seats=plan.seats)
        where_of[plan.label] = read_where(RunLayout(folder).trajectories()) or {}  # where its answers were generated
        records[plan.label] = recs
        results[plan.label] = asdict(score(recs, plan.system, plan.mode))
        if fingerprint:
            adapters[plan.label] = {"path": plan.adapter or plan.team.agents[0].model, "fingerprint": fingerprint}
        if plan.system == "sc":
            results[plan.label].update(sc_info)
        if plan.system == "merged":  # what the merge is: exact, or truncated and by how much (its own record)
            results[plan.label]["merge"] = merge_record(Path(plan.adapter or plan.team.agents[0].model))
        if plan.system in ("prm-bon", "team-prm"):
            results[plan.label].update(bon_info)
        for kind in cfg.robustness if robustness and plan.system not in ("sc", "prm-bon", "team-prm") else []:
            varied = [perturb(p, kind) for p in mine]
            folder = eval_dir / f"{plan.label}-{kind}"
            folder = folder / (fingerprint or sub) if fingerprint or sub else folder
            perturbed = _system_records(recipe, folder, task, plan.team, varied, progress, fingerprint, new_run,
                                        label=f"{plan.label}-{kind}", pool=pool, seats=plan.seats)
            robust.setdefault(plan.label, {})[kind] = robustness_row(recs, perturbed, plan.system, plan.mode)
    ordered = {p.label: results[p.label] for p in plans}  # report in the order the recipe asks
    out: dict[str, Any] = {
        "name": name, "task": _task_label(task), "split": task.split, "problems": len(problems),
        "team_problems": len(team_problems) if any(p.system in ("team", "sc", "team-prm") for p in plans) else 0,
        "systems": ordered, "comparisons": compare({k: outcomes(v) for k, v in records.items()}),
        "outcomes": {k: outcomes(v) for k, v in records.items()},  # per problem; run_eval drops it from results.json
        "ran_on": {p.label: where_of[p.label] for p in plans},
    }
    if adapters:
        out["adapters"] = adapters
    # sc runs on the team's answered problems by design (the report says so); every other system on all it was asked
    asked = {p.label: team_ids if p.system == "team" else {q.id for q in problems} for p in plans if p.system != "sc"}
    if gaps := coverage(records, asked):
        out["unanswered"] = gaps
    gain = team_gain(records, team_ids)
    if gain:
        out["team_gain"] = gain
    if "team" in records and (effect := early_stop_effect(records["team"])):
        out["early_stop"] = effect
    if "team" in records and max((len(r["rounds"]) for r in records["team"]), default=0) > 1:
        out["seats"] = seat_rounds(records["team"])
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
        check_team_models(p.team)
    tasks = []
    with_team = {t.name for t in cfg.tasks if t.team}
    pool = EnginePool(plans, trust_remote_code=recipe.trust_remote_code)
    verifiers: dict[str, Any] = {}  # the PRMs loaded, by folder: once for every task
    try:
        for i, (name, task, folder) in enumerate(_eval_tasks(recipe, cfg)):
            # the team and sc run on the recipe's own task; a transfer task measures the single-agent systems,
            # and the team and sc too where it says team: true
            mine = plans if i == 0 or name in with_team else [p for p in plans
                                                              if p.system not in ("team", "sc", "prm-bon", "team-prm")]
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
        out += _of_generation([p for p in plan_systems(gen, check=check) if p.system not in ("single", "distilled")], g)
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
    if g == 0:
        gen, wanted = recipe, ("single",)
    else:
        gen, wanted = generation_recipe(recipe, g), ("expert", "merged")
    gen = gen.model_copy(update={"eval": cfg})
    plans = _of_generation([p for p in plan_systems(gen) if p.system in wanted], max(1, g))
    if not plans:
        raise PluribusError(f"generation {g} has no student to compare (no expert but PRMs, no merge); "
                            "generations.stop_if_no_gain needs one")
    _, task, eval_dir = _eval_tasks(recipe, recipe.eval or EvalConfig())[0]
    problems = load_problems(task)
    scored = []
    for plan in plans:
        folder, fingerprint = store_of(plan, eval_dir)
        recs = _system_records(recipe, folder, task, plan.team, problems, progress, fingerprint, new_run,
                               label=plan.label)
        scored.append((plan.label, score(recs, plan.system, plan.mode).accuracy))
    return max(scored, key=lambda s: s[1]), len(problems)


def _member(agent: AgentConfig, i: int, first: AgentConfig, previous: str) -> str:
    """The eval label of a team seat alone: its expert or merge of the generation before (greedy), or for an
    unseated agent single-greedy when it runs the first agent's weights (what the single agent runs); another
    unseated agent was not evaluated alone, and its label says so (the report lists it)."""
    if agent.expert is not None:
        return f"{previous}{agent.expert}-greedy"
    if (agent.backend, agent.model, agent.adapter) == (first.backend, first.model, first.adapter):
        return "single-greedy"
    return f"{agent.name or f'agent {i}'} ({agent.model}{'+' + agent.adapter if agent.adapter else ''})"


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
            students=tuple(p.label for p in mine if p.system in ("expert", "merged") and p.mode == "greedy"),
            self_baseline=f"{own}{student}-greedy" if student else None))
    out = answer(roles, main)
    record = recipe.layout.generations_record
    if recipe.generations is not None and recipe.generations.stop_if_no_gain:  # a record of an earlier run without it stops nothing
        out["stop_checks"] = json.loads(record.read_text()) if record.is_file() else {"criterion": CRITERION,
                                                                                      "checks": {}}
    return out
