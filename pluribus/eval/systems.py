"""The registry of eval systems: each system says what it needs, how it plans and how it runs on one task.

A system is one small class registered by name (``@register_system("name")``), the name ``eval.systems`` takes:

- **single**: the base single agent (the team's first agent alone), greedy and/or sampled (``eval.modes``);
- **sc**: self-consistency at the team's token budget (the same model sampled until it has spent, on each problem,
  the tokens the team spent there, then a majority vote: the compute-matched baseline);
- **team**: the recipe's team as it debates (a team of experts with its seats' weights);
- **prm-bon** / **team-prm**: sc's very samples / the team's last round, the answer of the solution the run's PRM
  scores highest (no new generation: only the chooser differs);
- **member-sc** / **member-prm-bon**: sc and prm-bon with the team's strongest member (pluribus.eval.members) in
  place of the base agent: its own weights sampled at the team's budget; by default for a team of different weights;
- **experts**: every trained expert but PRMs (or one by its name); **merged**: every merge (or one by its name);
- **distilled**: the adapter named by ``eval.adapter``.

``plan`` turns the recipe into Plans (pluribus.eval.planning), checked before anything runs; ``run`` answers one
task's problems, most through ``TaskRun.answer`` (the debate stage into the system's resumable store), sc and the
PRM choosers from another system's stored samples. The class attributes say where a system runs (the team's
problems or all), in which order, and whether it has per-generation copies and perturbed runs. The eval stage
(pluribus.stages.eval) walks the registry. The recipe schema lists the same names (pluribus.config.SYSTEMS, which
cannot import this module: the schema sits below its implementations); tests/eval/test_systems.py holds them equal.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pluribus.adapter import adapter_fingerprint
from pluribus.config import EvalConfig, Recipe
from pluribus.errors import PluribusError
from pluribus.eval.members import choose_member, heterogeneous
from pluribus.eval.planning import (
    Plan,
    PlanContext,
    check_system_adapter,
    default_adapter,
    eval_verifier,
    sc_team,
    single_team,
    team_as_run,
)
from pluribus.eval.scoring import best_of_n, budget_vote, chooser_agreement, tokens
from pluribus.io import atomic_write_text, content_fingerprint

Records = list[dict[str, Any]]


@dataclass(frozen=True)
class Store:
    """Where a plan's answers are kept under ``<eval>/``."""

    folder: Path
    fingerprint: str | None  # of the weights every agent runs (an adapter, a full merged model): names the folder
    key: str | None  # the folder's name under the label (the weights' or the team's PRM's fingerprint), or None


@dataclass
class TaskRun:
    """One task as the systems see it: its problems, the records of the systems run so far, and how to answer."""

    recipe: Recipe
    cfg: EvalConfig
    eval_dir: Path
    problems: list[Any]
    team_problems: list[Any]  # the first eval.team_n of them: the team's and sc's
    # (folder, team, problems, *, fingerprint, label, seats) -> the records for problems: the debate stage over the
    # resumable store in folder (pluribus.stages.eval; a component never imports a stage, so it is handed in)
    answer: Callable[..., Records]
    records: dict[str, Records] = field(default_factory=dict)  # by label, as each system finishes
    verifiers: dict[str, Any] = field(default_factory=dict)  # the PRMs loaded so far, by folder (shared by tasks)


@dataclass(frozen=True)
class Ran:
    """What a system's run gave: its records, the store they were generated in, more fields of its results row."""

    records: Records
    folder: Path
    extra: dict[str, Any] = field(default_factory=dict)


class System(ABC):
    """One eval system: override ``plan`` (and ``default``, ``run``, ``store`` where it differs)."""

    name: ClassVar[str] = ""  # set by register_system: the name eval.systems takes
    kind: ClassVar[str] = ""  # its plans' Plan.system and results' "system" (default: name)
    order: ClassVar[int] = 3  # run order within a task (lower first; see SelfConsistency)
    on_team_problems: ClassVar[bool] = False  # runs on the team's problems (eval.team_n), transfer tasks only
    perturbed: ClassVar[bool] = True  # runs on eval.robustness's perturbed problems too
    per_generation: ClassVar[bool] = True  # each generation g >= 2 has its own (pluribus.generations)
    student: ClassVar[bool] = False  # a trained student (the generations' stop rule and report compare them)

    def default(self, recipe: Recipe) -> bool:
        """Whether it runs when ``eval.systems`` is unset."""
        return False

    @abstractmethod
    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        """Its plans for ``name`` (its own name, or an expert's or merge's), checked; raises PluribusError."""

    def store(self, plan: Plan, eval_dir: Path) -> Store:
        """Its store: ``<eval>/<label>/``, or under its adapter's fingerprint (a retrained adapter answers anew)."""
        fingerprint = adapter_fingerprint(plan.adapter) if plan.adapter else None
        return Store(eval_dir / plan.label / fingerprint if fingerprint else eval_dir / plan.label, fingerprint,
                     fingerprint)

    def problems(self, run: TaskRun) -> list[Any]:
        """The problems it is asked."""
        return run.team_problems if self.on_team_problems else run.problems

    def asked(self, run: TaskRun) -> set[str] | None:
        """The ids of the problems its coverage is counted over (None: not counted)."""
        return {p.id for p in run.problems}

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        """Its records on this task: the debate of ``plan.team`` over its problems, in ``store``."""
        recs = run.answer(store.folder, plan.team, self.problems(run), fingerprint=store.fingerprint,
                          label=plan.label, seats=plan.seats)
        return Ran(recs, store.folder)


SYSTEMS: dict[str, System] = {}  # by name, in registration order (the order of the defaults and of the report)


def register_system(name: str) -> Callable[[type[System]], type[System]]:
    """Register a System subclass as ``name`` (what eval.systems takes); the class stays importable as is."""

    def add(cls: type[System]) -> type[System]:
        if name in SYSTEMS:
            raise ValueError(f"eval system '{name}' is registered twice")
        cls.name, cls.kind = name, cls.kind or name
        SYSTEMS[name] = cls()
        return cls

    return add


def system(name: str, recipe: Recipe | None = None) -> System:
    """The system ``name`` answers to: a registered one, or (with ``recipe``) experts for an expert's name and merged
    for a merge's. A miss names every valid name."""
    if name in SYSTEMS:
        return SYSTEMS[name]
    experts = [t.expert_name for t in recipe.train.trainings()] if recipe is not None and recipe.train else []
    merges = [m.name for m in recipe.merge.all()] if recipe is not None and recipe.merge else []
    if name in experts:
        return SYSTEMS["experts"]
    if name in merges:
        return SYSTEMS["merged"]
    raise PluribusError(f"unknown eval system '{name}'; use {', '.join(SYSTEMS)}, an expert "
                        f"({', '.join(experts) or 'none'}) or a merge ({', '.join(merges) or 'none'})")


def system_of(plan: Plan) -> System:
    """The registered system that made ``plan`` (by its kind)."""
    for s in SYSTEMS.values():
        if s.kind == plan.system:
            return s
    raise PluribusError(f"unknown eval system kind '{plan.system}'; registered: "
                        f"{', '.join(s.kind for s in SYSTEMS.values())}")


def requested(recipe: Recipe) -> list[str]:
    """``eval.systems``, or every registered system whose ``default`` holds for the recipe, in registry order."""
    cfg = recipe.eval or EvalConfig()
    if cfg.systems is not None:
        return cfg.systems
    return [name for name, s in SYSTEMS.items() if s.default(recipe)]


def plan_systems(recipe: Recipe, *, check: bool = True) -> list[Plan]:
    """Every requested system and decoding mode, validated before anything runs (adapters must exist)."""
    from pluribus.eval.planning import plan_context

    ctx = plan_context(recipe, requested(recipe), check=check)
    plans = [p for name in ctx.requested for p in system(name, recipe).plan(ctx, name)]
    labels = [p.label for p in plans]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise PluribusError(f"eval systems {dup} are named twice (an expert or merge named like a system?); "
                            "rename the expert or merge")
    return plans


def store_of(plan: Plan, eval_dir: Path) -> tuple[Path, str | None]:
    """Where ``plan``'s answers are stored under ``eval_dir``, and the fingerprint of its weights."""
    store = system_of(plan).store(plan, eval_dir)
    return store.folder, store.fingerprint


def _debates(recipe: Recipe) -> bool:
    return recipe.team is not None and len(recipe.team.agents) * recipe.team.rounds > 1


# ------------------------------------------------------------------------------------------ the systems


@register_system("single")
class Single(System):
    """The team's first agent alone, in each of ``eval.modes``: the baseline every system is compared with."""

    order = 0  # first: sc sizes its draws from single-greedy's tokens
    per_generation = False  # the base model: generation 1's alone

    def default(self, recipe: Recipe) -> bool:
        return True

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        return ctx.single_agent("single", "single", None, None)


@register_system("sc")
class SelfConsistency(System):
    """The single agent sampled ``k`` times per problem, then a majority vote over the first samples whose tokens
    come closest to what the team spent on that problem (``budget_vote``): the compute-matched baseline."""

    order = 2  # after single (its tokens per sample size k) and the team (its tokens are the budget)
    on_team_problems = True
    perturbed = False

    def default(self, recipe: Recipe) -> bool:
        return _debates(recipe)

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        single = single_team(ctx.team, adapter=None, model=None, mode="sampled", cfg=ctx.cfg, name="sc",
                             prompt=ctx.prompt)
        return [Plan("sc", "sc", "sampled", single)]

    def asked(self, run: TaskRun) -> set[str] | None:
        return None  # it runs on the team's answered problems by design (the report says so)

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        budget, mine = team_budget(plan, run)
        k = self._draws(plan, run, budget)
        folder = run.eval_dir / "sc" / f"k{k}"
        draws = run.answer(folder, sc_team(plan.team, k, run.cfg.temperature, run.recipe.seed), mine,
                           label=f"sc (k={k})")
        voted, extra = vote_at_budget(draws, budget)
        return Ran(voted, folder, {"samples_drawn": k, **extra})

    @staticmethod
    def _draws(plan: Plan, run: TaskRun, budget: dict[str, int]) -> int:
        """``draws_for`` from single-greedy's tokens per answer (run here if it was not asked for)."""
        from pluribus.seats import base_team, source_of

        greedy = run.records.get("single-greedy")
        if not greedy:
            single = single_team(base_team(run.recipe.require("team"), source_of(run.recipe)), adapter=None,
                                 model=None, mode="greedy", cfg=run.cfg, name="single",
                                 prompt=plan.team.prompts["question"])
            greedy = run.answer(run.eval_dir / "single-greedy", single, run.problems, label="single-greedy")
        return draws_for(sum(tokens(r) for r in greedy) / max(1, len(greedy)), budget, run.cfg)


def team_budget(plan: Plan, run: TaskRun) -> tuple[dict[str, int], list[Any]]:
    """sc's (and member-sc's) budget: the tokens the same generation's team spent on each problem it answered,
    and the problems drawn for (the team's answered ones, the first ``eval.sc_n``)."""
    team = f"{plan.prefix}team"  # the same generation's team
    name = plan.system
    if team not in run.records:
        raise PluribusError(f"eval system '{name}' spends the team's tokens: add 'team' to eval.systems")
    budget = {r["problem_id"]: tokens(r) for r in run.records[team]}
    mine = [p for p in run.team_problems if p.id in budget][: run.cfg.sc_n]  # a skipped problem has no budget
    if not mine:
        raise PluribusError(f"eval system '{name}' has no problem to run: the team answered none of them")
    return budget, mine


def draws_for(per_sample: float, budget: dict[str, int], cfg: EvalConfig) -> int:
    """Enough draws to reach the team's budget on 9 problems of 10 (the report says on how many it did), at
    ``per_sample`` tokens an answer, at most ``eval.sc_max_samples``."""
    spent = sorted(budget.values())
    q90 = spent[min(len(spent) - 1, math.ceil(0.9 * len(spent)) - 1)]
    return max(1, min(cfg.sc_max_samples, math.ceil(1.1 * q90 / max(1.0, per_sample))))


def vote_at_budget(draws: Records, budget: dict[str, int]) -> tuple[Records, dict[str, Any]]:
    """Each problem's draws voted at its budget (``budget_vote``), and how many samples that used on average and
    on how many problems the budget was reached."""
    voted, used = [], []
    for r in draws:
        v, u = budget_vote(r, budget[r["problem_id"]])
        voted.append(v)
        used.append(u)
    reached = sum(tokens(v) >= budget[v["problem_id"]] for v in voted)
    return voted, {"mean_samples_used": sum(used) / max(1, len(used)), "budget_reached": reached / max(1, len(voted))}


@register_system("team")
class Team(System):
    """The recipe's team as it debates (its seats' weights; ``eval.max_new_tokens`` for every agent)."""

    order = 1  # before sc, which spends its tokens
    on_team_problems = True

    def default(self, recipe: Recipe) -> bool:
        return _debates(recipe)

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        mine = team_as_run(ctx.seated, ctx.cfg)
        if mine.verifier:  # resolved here: the team's store lives under eval/, where the run's names are not
            mine = mine.model_copy(update={"verifier": str(ctx.prm_folder(mine.verifier).resolve())})
        return [Plan("team", "team", "as-configured", mine, seats=ctx.seat_folders, verifier=mine.verifier)]

    def store(self, plan: Plan, eval_dir: Path) -> Store:
        if not plan.verifier:
            return super().store(plan, eval_dir)
        # a team that aggregates with a PRM: a retrained PRM answers in stores of its own
        key = f"prm-{content_fingerprint(plan.verifier)}"
        return Store(eval_dir / plan.label / key, None, key)

    def asked(self, run: TaskRun) -> set[str] | None:
        return {p.id for p in run.team_problems}


def _verifier(ctx: PlanContext, name: str) -> str:
    """The PRM a system that chooses by one uses (eval.verifier, team.verifier, the run's one PRM expert)."""
    verifier = eval_verifier(ctx.recipe)
    if verifier is None:
        raise PluribusError(f"eval system '{name}' needs a process reward model: set eval.verifier (a PRM "
                            "expert of the run or a PRM folder), or train one prm expert")
    return verifier


# bump when the PRM's reading of a solution (step split, encoding, score head) changes: older scores are not reused
SCORES_VERSION = 1


def scored_with(device: Any) -> str:
    """What a PRM's scores depend on besides its weights and the text: the device type and dtype it runs in
    (``load_prm``'s policy) and ``SCORES_VERSION``; kept with each choice, a remembered score must match it."""
    from pluribus import device as devices

    target = devices.resolve(device) if device is None or isinstance(device, str) else device
    return f"{target.type}:{str(devices.dtype_for(target, 'bfloat16')).removeprefix('torch.')}:v{SCORES_VERSION}"


class RememberedScores:
    """A PRM's step scores, read back from the choices a finished eval wrote (``choices.jsonl`` under the PRM's
    content fingerprint) where it scored the very same group (question and solutions, in order) on the same
    device type and dtype (``scored_with``), the PRM loaded and run only for the others: a rerun rescores nothing
    it has, with the same scores, since ``PRMScorer`` scores each group in chunks of its own."""

    def __init__(self, name: str, scorer: Callable[[], Any], choices: Path, tag: str) -> None:
        self.name = name
        self._scorer = scorer
        self.known: dict[tuple[str, tuple[str, ...]], list[list[float]]] = {}
        for line in choices.read_text().splitlines() if choices.is_file() else []:
            r = json.loads(line)
            turns, verifier = r["rounds"][-1], (r.get("meta") or {}).get("verifier") or {}
            members = verifier.get("members") or []
            if verifier.get("scored_with") == tag and [m["agent"] for m in members] == [t["agent"] for t in turns]:
                self.known[(r["question"], tuple(t["response"] for t in turns))] = [m["step_scores"] for m in members]

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[list[float]]]:
        """Each group's step scores per solution: remembered, or scored now (each new group once)."""
        keys = [(q, tuple(solutions)) for q, solutions in groups]
        missing = list(dict.fromkeys(k for k in keys if k not in self.known))
        if missing:
            scored = self._scorer().score([(q, list(solutions)) for q, solutions in missing])
            self.known.update(zip(missing, scored, strict=True))
        return [self.known[k] for k in keys]


def choose_by_verifier(plan: Plan, among: str, run: TaskRun, store: Store) -> Ran:
    """prm-bon's or team-prm's records (``best_of_n`` over ``among``'s: sc's voted samples or the team's
    transcripts) and what the report says of it: the PRM, how it agrees with the vote, its own quality from its
    training record. The choices are written to ``<eval>/<system>/<the PRM's fingerprint>/choices.jsonl`` (every
    step score, and what they were scored with), to be inspected and read back by a rerun (``RememberedScores``)."""
    from pluribus.distill.prm import PRMScorer, prm_reading

    if among not in run.records:
        raise PluribusError(f"eval system '{plan.system}' chooses among {among}'s answers, and {among} did "
                            "not run here")
    if plan.verifier is None:
        raise PluribusError(f"eval system '{plan.system}' has no verifier (a plan without eval.verifier)")
    voted = run.records[among]
    recipe = run.recipe
    how = recipe.require("team").verifier_aggregate
    # on eval's device where it names one, else the recipe's (pluribus.device)
    where = recipe.eval.device if recipe.eval is not None and recipe.eval.device else recipe.device

    def scorer() -> PRMScorer:  # loaded only when a group is not remembered
        if plan.verifier not in run.verifiers:
            run.verifiers[plan.verifier] = PRMScorer(plan.verifier, trust_remote_code=recipe.trust_remote_code,
                                                     device=where)
        return run.verifiers[plan.verifier]

    fingerprint = content_fingerprint(plan.verifier)
    choices = run.eval_dir / plan.label / str(fingerprint) / "choices.jsonl"
    tag = scored_with(where)
    recs = best_of_n(voted, RememberedScores(plan.verifier, scorer, choices, tag), how)
    for r in recs:
        r["meta"]["verifier"]["scored_with"] = tag
    atomic_write_text(choices, "".join(json.dumps(r) + "\n" for r in recs))
    reading = prm_reading(plan.verifier)
    quality = ({"source": "prm_metrics", **reading["metrics"]} if reading["metrics"] else
               {"source": "held-out steps at training (eval_step_*)", **reading["step_metrics"]}
               if reading["step_metrics"] else None)
    return Ran(recs, store.folder, {
        "verifier": plan.verifier, "verifier_fingerprint": fingerprint, "verifier_aggregate": how,
        "verifier_prompt": reading["source"], "vote": among, "vs_vote": chooser_agreement(voted, recs),
        "verifier_quality": quality})


@register_system("prm-bon")
class PRMBestOfN(System):
    """sc's very samples (the ones its budget vote used), the answer of the one the PRM scores highest."""

    on_team_problems = True
    perturbed = False

    def default(self, recipe: Recipe) -> bool:
        return _debates(recipe) and eval_verifier(recipe) is not None

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        verifier = _verifier(ctx, name)
        if "sc" not in ctx.requested:
            raise PluribusError("eval system 'prm-bon' chooses among self-consistency's samples: add 'sc' to "
                                "eval.systems")
        folder = ctx.prm_folder(verifier)
        single = single_team(ctx.team, adapter=None, model=None, mode="sampled", cfg=ctx.cfg, name="sc",
                             prompt=ctx.prompt)
        return [Plan("prm-bon", "prm-bon", "sampled", single, verifier=str(folder))]

    def asked(self, run: TaskRun) -> set[str] | None:
        return None  # sc's problems (eval.sc_n of the team's answered ones), as sc

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        return choose_by_verifier(plan, f"{plan.prefix}sc", run, store)  # the same generation's sc


def _member_plan(ctx: PlanContext, name: str, verifier: str | None = None) -> Plan:
    """member-sc's (or member-prm-bon's) plan: the chosen seat's agent alone, sampled as sc samples the first agent
    (the recipe's question prompt, no persona, eval.temperature, eval.device), on the seat's own weights."""
    member = choose_member(ctx.recipe, ctx.seated, check=ctx.check)
    agent = member.agent
    single = single_team(ctx.seated.model_copy(update={"agents": [agent]}), adapter=agent.adapter, model=agent.model,
                         mode="sampled", cfg=ctx.cfg, name=name, prompt=ctx.prompt)
    return Plan(name, name, "sampled", single, adapter=agent.adapter if verifier is None else None, verifier=verifier,
                member=member)


def _member_default(recipe: Recipe) -> bool:
    """member-sc runs by default when the team debates and seats two different weights (a team of copies: its
    member-sc would be sc up to a persona), or when eval.member names its seat."""
    from pluribus.seats import seated, source_of

    if not _debates(recipe):
        return False
    return bool(recipe.eval is not None and recipe.eval.member) or heterogeneous(
        seated(recipe.require("team"), source_of(recipe), check=False)[0])


def _member_extra(plan: Plan) -> dict[str, Any]:
    """What results.json says of the member a plan sampled: its seat, its weights, why that seat."""
    m = plan.member
    return {"member": m.seat, "member_weights": m.weights(), "member_chosen_by": m.why} if m else {}


@register_system("member-sc")
class MemberSelfConsistency(System):
    """sc with the team's strongest member in place of the base agent (pluribus.eval.members): its weights sampled
    until they spent the team's tokens on each problem, then the same budget vote. Would the best expert alone, at
    the team's budget, do as well as the debate?"""

    order = 2  # after the team, whose tokens are the budget
    on_team_problems = True
    perturbed = False

    def default(self, recipe: Recipe) -> bool:
        return _member_default(recipe)

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        return [_member_plan(ctx, "member-sc")]

    def store(self, plan: Plan, eval_dir: Path) -> Store:
        model = plan.team.agents[0].model
        if plan.adapter or not Path(model).is_dir():
            return super().store(plan, eval_dir)
        fingerprint = adapter_fingerprint(model)  # a full merged model: named by its weights, as merged's
        return Store(eval_dir / plan.label / fingerprint, fingerprint, fingerprint)

    def asked(self, run: TaskRun) -> set[str] | None:
        return None  # sc's problems: the team's answered ones, at most eval.sc_n

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        budget, mine = team_budget(plan, run)
        seat = plan.member.index if plan.member else 0
        # the member's own tokens per answer: its round-0 turns in the same generation's team transcripts
        turns = [r["rounds"][0][seat] for r in run.records[f"{plan.prefix}team"]]
        k = draws_for(sum(t["tokens_in"] + t["tokens_out"] for t in turns) / max(1, len(turns)), budget, run.cfg)
        folder = store.folder / f"k{k}"
        draws = run.answer(folder, sc_team(plan.team, k, run.cfg.temperature, run.recipe.seed), mine,
                           fingerprint=store.fingerprint, label=f"{plan.label} (k={k})")
        voted, extra = vote_at_budget(draws, budget)
        return Ran(voted, folder, {"samples_drawn": k, **extra, **_member_extra(plan)})


@register_system("member-prm-bon")
class MemberPRMBestOfN(System):
    """member-sc's very samples (the ones its budget vote used), the answer of the one the PRM scores highest."""

    on_team_problems = True
    perturbed = False

    def default(self, recipe: Recipe) -> bool:
        return _member_default(recipe) and eval_verifier(recipe) is not None

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        verifier = _verifier(ctx, name)
        if "member-sc" not in ctx.requested:
            raise PluribusError("eval system 'member-prm-bon' chooses among member-sc's samples: add 'member-sc' to "
                                "eval.systems")
        return [_member_plan(ctx, "member-prm-bon", str(ctx.prm_folder(verifier)))]

    def asked(self, run: TaskRun) -> set[str] | None:
        return None  # member-sc's problems, as member-sc

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        ran = choose_by_verifier(plan, f"{plan.prefix}member-sc", run, store)  # the same generation's member-sc
        return Ran(ran.records, ran.folder, {**ran.extra, **_member_extra(plan)})


@register_system("team-prm")
class TeamPRM(System):
    """The team's own last round (no new generation), the answer of the solution the PRM scores highest."""

    on_team_problems = True
    perturbed = False

    def default(self, recipe: Recipe) -> bool:
        # a team that aggregates with its verifier already is team-prm
        return _debates(recipe) and eval_verifier(recipe) is not None and not recipe.require("team").verifier

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        verifier = _verifier(ctx, name)
        if "team" not in ctx.requested or ctx.team.verifier:
            raise PluribusError("eval system 'team-prm' re-chooses the answer of the team's own transcripts by the "
                                "PRM: add 'team' to eval.systems, with a team that aggregates without a verifier "
                                "(one with team.verifier is that system already)")
        folder = ctx.prm_folder(verifier)
        return [Plan("team-prm", "team-prm", "as-configured", team_as_run(ctx.team, ctx.cfg), verifier=str(folder))]

    def asked(self, run: TaskRun) -> set[str] | None:
        return {p.id for p in run.team_problems}  # the team's problems (eval.team_n), as the team

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        return choose_by_verifier(plan, f"{plan.prefix}team", run, store)  # the same generation's team


@register_system("experts")
class Experts(System):
    """Every trained expert but PRMs (or the one named), alone on its base model with its adapter."""

    kind = "expert"
    student = True

    def default(self, recipe: Recipe) -> bool:
        return recipe.train is not None

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        if name in ctx.experts and ctx.experts[name].objective == "prm":
            raise PluribusError(f"eval.systems: '{name}' is a process reward model, which scores steps "
                                "rather than answering; evaluate the rl expert it guides instead")
        chosen = [t for t in ctx.experts.values() if t.objective != "prm"] if name == "experts" else [ctx.experts[name]]
        out = []
        for t in chosen:
            path = ctx.recipe.layout.adapter(t.expert_name)
            if ctx.check:
                check_system_adapter(path, f"'{t.expert_name}' expert", "Train it first (pluribus train RECIPE "
                              f"--expert {t.expert_name}) or drop it from eval.systems")
            out += ctx.single_agent("expert", t.expert_name, str(path), t.model)
        return out


@register_system("merged")
class Merged(System):
    """Every merge of the merge section (or the one named): an adapter on the experts' base, or a full model."""

    student = True

    def default(self, recipe: Recipe) -> bool:
        return recipe.merge is not None

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        out = []
        recipe = ctx.recipe
        for m in ctx.merges.values() if name == "merged" else [ctx.merges[name]]:
            path = recipe.layout.merged(m.name)
            if ctx.check and not path.is_dir():
                raise PluribusError(f"the merged system '{m.name}' needs '{path}'; run the merge first "
                                    "(pluribus run RECIPE) or drop it from eval.systems")
            if (path / "adapter_config.json").is_file():
                # the base of the experts it merges (they share one: merge checks it)
                student = ctx.experts[m.experts[0]].model if m.experts else recipe.train.model if recipe.train else None
                out += ctx.single_agent("merged", m.name, str(path), student)
            else:  # a full model
                out += ctx.single_agent("merged", m.name, None, str(path))
        return out

    def store(self, plan: Plan, eval_dir: Path) -> Store:
        if plan.adapter:
            return super().store(plan, eval_dir)
        fingerprint = adapter_fingerprint(plan.team.agents[0].model)  # a full model: named by its weights too
        return Store(eval_dir / plan.label / fingerprint, fingerprint, fingerprint)

    def run(self, plan: Plan, run: TaskRun, store: Store) -> Ran:
        from pluribus.merge import merge_record

        ran = super().run(plan, run, store)
        # what the merge is: exact, or truncated and by how much (its own record)
        return Ran(ran.records, ran.folder, {"merge": merge_record(Path(plan.adapter or plan.team.agents[0].model))})


@register_system("distilled")
class Distilled(System):
    """The adapter ``eval.adapter`` names (default: the first expert that is not a PRM), on the student model."""

    per_generation = False  # one adapter: generation 1's alone

    def plan(self, ctx: PlanContext, name: str) -> list[Plan]:
        cfg, recipe = ctx.cfg, ctx.recipe
        adapter = Path(cfg.adapter) if cfg.adapter else default_adapter(recipe)
        if cfg.adapter and not adapter.exists():
            raise PluribusError(f"eval.adapter '{adapter}' does not exist; set eval.adapter to a trained "
                                "adapter folder, or drop 'distilled' from eval.systems")
        if ctx.check:
            check_system_adapter(adapter, "distilled", "Train one first (pluribus train RECIPE) or set eval.adapter, "
                          "or drop 'distilled' from eval.systems")
        student = recipe.train.model if recipe.train else None
        return ctx.single_agent("distilled", "distilled", str(adapter), student)
