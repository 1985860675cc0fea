"""The debate stage: the recipe's team over its task's problems into ``<run>/trajectories``, resumable.

Checks everything (team, problems, models, every round-0 prompt against the contexts) before the first file, then
debates fixed steps of the problem list through the engine (pluribus.data.debate), storing each step's
trajectories (flush + fsync) before the next starts; a rerun debates only the problems the store lacks. The store
is keyed by ``config_hash``. The progress bar counts generations, so it moves with each batch a backend finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluribus.config import Recipe, TeamConfig, without_engine_settings
from pluribus.data.backends import Backend, Generation, backend_key
from pluribus.data.debate import (
    build_team,
    check_prompts,
    debate_step,
    generations_per_problem,
    make_backends,
    validate_team,
)
from pluribus.data.records import Problem, Trajectory
from pluribus.data.store import TrajectoryStore
from pluribus.device import ran_on, record_where, where_backend
from pluribus.errors import PluribusError
from pluribus.eval.scoring import seat_rounds
from pluribus.io import content_fingerprint
from pluribus.stages import Stage, StageSummary


@dataclass(frozen=True)
class DebateSummary:
    """Over every stored trajectory: accuracies, cost per problem, and answers corrected/lost between rounds."""

    problems: int
    new: int
    round0_accuracy: float
    team_accuracy: float
    tokens_per_problem: float
    seconds_per_problem: float
    corrected: int  # an agent wrong in round r-1, right in round r
    lost: int  # an agent right in round r-1, wrong in round r
    tokens_per_second: float  # generated tokens / wall seconds of this invocation
    duplicates: tuple[str, ...] = ()  # "shard:line" of store lines repeating a stored problem (counted once)
    skipped: tuple[str, ...] = ()  # why each problem left out this run (team.too_long=skip) was
    ran_on: str = ""  # where this invocation's agents ran (pluribus.device.ran_on); "" when nothing was generated
    seats: tuple[dict[str, Any], ...] = ()  # per seat: round-0 vs last-round accuracy, answers it changed

    def rows(self) -> list[tuple[str, str]]:
        repeated = [("duplicated store lines (counted once)",
                     f"{len(self.duplicates)}: {', '.join(self.duplicates[:5])}"
                     f"{', ...' if len(self.duplicates) > 5 else ''} (pluribus repair removes them)")]
        skipped = [("skipped: prompt too long (team.too_long=skip)",
                    f"{len(self.skipped)}: {'; '.join(self.skipped[:3])}{'; ...' if len(self.skipped) > 3 else ''}")]
        return [*(repeated if self.duplicates else []), *(skipped if self.skipped else []),
            ("problems (new this run)", f"{self.problems} ({self.new})"),
            ("single-agent (round-0) accuracy", f"{self.round0_accuracy:.1%}"),
            ("team accuracy", f"{self.team_accuracy:.1%}"),
            ("tokens / problem", f"{self.tokens_per_problem:.0f}"),
            ("seconds / problem", f"{self.seconds_per_problem:.2f}"),
            ("wrong -> right (corrected)", str(self.corrected)),
            ("right -> wrong (lost)", str(self.lost)),
            ("generated tokens / s (this run)", f"{self.tokens_per_second:.1f}"),
            *([("ran on (this run)", self.ran_on)] if self.ran_on else []),
            *((f"seat {s['seat']}: round 0 -> last round",
               f"{s['round0_accuracy']:.1%} -> {s['final_accuracy']:.1%} ({s['right_to_wrong']} right -> wrong, "
               f"{s['wrong_to_right']} wrong -> right)") for s in self.seats),
        ]


def summarize(records: Sequence[Mapping[str, Any]], *, new: int = 0, tokens_per_second: float = 0.0,
              duplicates: Sequence[str] = (), skipped: Sequence[str] = ()) -> DebateSummary:
    n = len(records)
    r0 = [t["correct"] for r in records for t in r["rounds"][0]]
    corrected = lost = 0
    for r in records:
        for prev, cur in zip(r["rounds"], r["rounds"][1:], strict=False):
            for a, b in zip(prev, cur, strict=True):
                corrected += (not a["correct"]) and bool(b["correct"])
                lost += bool(a["correct"]) and not b["correct"]
    return DebateSummary(
        problems=n, new=new,
        round0_accuracy=sum(map(bool, r0)) / len(r0) if r0 else 0.0,
        team_accuracy=sum(bool(r["final_correct"]) for r in records) / n if n else 0.0,
        tokens_per_problem=sum(r["cost"]["tokens_in"] + r["cost"]["tokens_out"] for r in records) / n if n else 0.0,
        seconds_per_problem=sum(r["cost"]["seconds"] for r in records) / n if n else 0.0,
        corrected=corrected, lost=lost, tokens_per_second=tokens_per_second, duplicates=tuple(duplicates),
        skipped=tuple(skipped),
        seats=tuple(seat_rounds(list(records))) if any(len(r["rounds"]) > 1 for r in records) else (),
    )


# Agent settings that cannot change an answer: how the openai backend reaches its server. base_url is one
# of them: the served model is named by ``model``, which stays hashed, so moving the server (another host or
# port after a connection failure) must not orphan the trajectories already stored.
_TRANSPORT_FIELDS = {"base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries"}


def config_hash(recipe: Recipe, weights: str | None = None, seats: Mapping[str, str] | None = None) -> str:
    """What makes stored trajectories comparable: the task and team, minus settings that only change speed
    or how many problems run (``task.n``, ``team.batch_size``, ``team.problems_per_step``, ``team.too_long``,
    the agents' server connection settings), plus the seed.

    A conversation's seed does not depend on its batch (``conversation_seed``), but where an agent or the judge
    runs a local backend (transformers, vllm) in a 16-bit dtype, its logits do in their last bits, and that
    flips tokens: there the batch settings (``team.batch_size`` and the effective ``team.problems_per_step``)
    are hashed too, so a store is never continued with batches that would have drawn other turns. float32
    agents are batch invariant in practice and keep them out.

    ``weights``: a content fingerprint of the weights every agent runs (eval's systems), hashed in place of
    where they lie (the agents' adapter, else their model): a store follows what answered, not its path.
    ``seats``: the same for the seated agents of a team of experts (pluribus.seats), by role (``agents.<i>``,
    ``judge``): the fingerprint of its weights (pluribus.seats.fingerprints)."""
    team = recipe.require("team")
    batch = None
    if batch_sensitive(team):
        batch = [team.batch_size, team.problems_per_step or max(1, team.batch_size // len(team.agents))]
    return _hash(recipe, _CURRENT_EXCLUDE, batch=batch, weights=weights, seats=seats)


def seats_family(recipe: Recipe, seats: Mapping[str, str]) -> str:
    """``config_hash`` with each seat named by its role, not its contents: a store of the same family but another
    hash was debated by earlier weights of the same seats (a retrained expert), so it is stale by construction."""
    return config_hash(recipe, seats={role: f"seat:{role}" for role in seats})


_CURRENT_EXCLUDE = {"batch_size": True, "problems_per_step": True, "too_long": True,
                    "agents": {"__all__": _TRANSPORT_FIELDS}, "judge": _TRANSPORT_FIELDS}


def batch_sensitive(team: TeamConfig) -> bool:
    """Whether some agent (or the judge) generates on a local backend in 16 bits, where batching flips tokens."""
    return any(a.backend in ("transformers", "vllm") and a.dtype != "float32"
               for a in [*team.agents, *([team.judge] if team.judge else [])])


def older_config_hashes(recipe: Recipe, weights: str | None = None) -> list[str]:
    """The hashes earlier pluribus versions gave this config: stores written then are taken over on resume."""
    return [legacy_config_hash(recipe, weights), _hash(recipe, _CURRENT_EXCLUDE, weights=weights)]


def legacy_config_hash(recipe: Recipe, weights: str | None = None) -> str:
    """``config_hash`` as pluribus computed it while the connection settings were part of it: stores written
    then resume, taking the new hash."""
    return _hash(recipe, {"batch_size", "problems_per_step", "too_long"}, weights=weights)


def _hash(recipe: Recipe, team_exclude: Any, batch: list[int] | None = None, weights: str | None = None,
          seats: Mapping[str, str] | None = None) -> str:
    task = recipe.require("task").model_dump(mode="json", exclude={"n"})
    team = without_engine_settings(recipe.require("team").model_dump(mode="json", exclude=team_exclude))
    if recipe.require("team").verifier:
        # the verifier by what it holds, not by its name or path: a retrained PRM is a new store
        team["verifier"] = f"sha256:{content_fingerprint(verifier_path(recipe))}"
    else:  # not set: hashed as before the verifier settings existed, so every earlier store still resumes
        team.pop("verifier", None)
        team.pop("verifier_aggregate", None)
    for agent in team["agents"] if weights else []:
        agent["adapter" if agent.get("adapter") else "model"] = f"sha256:{weights}"
    for role, fp in (seats or {}).items():
        agent = team["judge"] if role == "judge" else team["agents"][int(role.split(".")[1])]
        agent["adapter" if agent.get("adapter") else "model"] = fp if fp.startswith("seat:") else f"sha256:{fp}"
    extra = {} if batch is None else {"batch": batch}
    payload = json.dumps({"task": task, "team": team, "seed": recipe.seed, **extra}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_verifier_cycle(recipe: Recipe) -> None:
    """Refuse a debate that aggregates with a PRM of the run trained on that same debate's data: the PRM needs
    the debate's trajectories before the debate can have them."""
    team = recipe.require("team")
    experts = {t.expert_name: t for t in recipe.train.trainings()} if recipe.train else {}
    prm = experts.get(team.verifier or "")
    if prm is not None and prm.data == "team":
        raise PluribusError(f"team.verifier '{team.verifier}' is this run's PRM, trained on the process data this "
                            "very debate makes (a cycle); aggregate this debate with majority and use the PRM in "
                            "eval (prm-bon), or give team.verifier a PRM folder trained on another run")


def verifier_path(recipe: Recipe, name: str | None = None, *, check: bool = True) -> Path:
    """``pluribus.data.verify.prm_folder`` of ``name`` (default ``team.verifier``)."""
    from pluribus.data.verify import prm_folder

    name = name or recipe.require("team").verifier
    if not name:
        raise PluribusError("no verifier is set; set team.verifier to a PRM expert of the run or a PRM folder")
    return prm_folder(recipe, name, check=check)


def load_verifier(recipe: Recipe) -> Any:
    """The team's verifier (pluribus.distill.prm.PRMScorer), or None when the team aggregates without one."""
    team = recipe.require("team")
    if not team.verifier:
        return None
    from pluribus.distill.prm import PRMScorer

    return PRMScorer(verifier_path(recipe), trust_remote_code=recipe.trust_remote_code, device=recipe.device)


def check_team_models(team: TeamConfig, *, progress: bool = True) -> None:
    """Fail before anything is written: every local model resolves (readable weights, a tokenizer; a GGUF is
    dequantized here, with a bar unless ``progress`` is off), every adapter is sound and made for its agent's
    model, every server setting exists."""
    import os

    from pluribus.adapter import check_adapter
    from pluribus.models import require_tokenizer_files, resolve_model

    for agent in [*team.agents, *([team.judge] if team.judge else [])]:
        if agent.backend in ("transformers", "vllm"):
            folder = resolve_model(agent.model, progress=progress)
            require_tokenizer_files(folder)
            if agent.adapter:
                check_adapter(agent.adapter, folder)
        elif agent.backend == "openai":
            if not agent.base_url:
                raise PluribusError(f"agent '{agent.name or agent.model}' uses the openai backend but sets no "
                                    "base_url (e.g. http://127.0.0.1:8000/v1)")
            if agent.api_key_env and not os.environ.get(agent.api_key_env):
                raise PluribusError(f"environment variable {agent.api_key_env} (api_key_env) is not set; "
                                    "export it with the server's API key")


def run_debate(
    recipe: Recipe,
    *,
    new_run: bool = False,
    problems: Sequence[Problem] | None = None,
    backends: Mapping[tuple, Backend] | None = None,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    label: str = "debate",
    weights: str | None = None,
    seats: Mapping[str, Path] | None = None,
    verifier: Any = None,
) -> DebateSummary:
    """Run the recipe's team over its task's problems into ``<run>/trajectories``, resuming a stopped run.

    Everything is validated (team, problems, models) before the first file is written. ``backends`` (keyed
    by ``backend_key``) replaces building them, for tests and benchmarks; ``verifier`` (a
    ``pluribus.data.verify.Verifier``) replaces loading ``team.verifier``. ``on_step(done, total)`` is called
    after each stored step. ``label`` names the progress bar (eval names its systems). ``weights`` keys the
    store by the contents of the agents' weights (``config_hash``). ``seats``: the folders of the seated agents of
    a team of experts, by role (pluribus.seats.seated; the team already resolved): the store is keyed by their
    contents, and a store debated by earlier weights of the same seats is moved aside and debated afresh.
    Returns the summary over every stored trajectory.
    """
    from pluribus.threads import apply_threads

    task = recipe.require("task")
    team_cfg = recipe.require("team")
    validate_team(team_cfg)
    if team_cfg.verifier:
        check_verifier_cycle(recipe)
        verifier_path(recipe)  # a missing or non-PRM verifier is refused before anything is written
    if problems is None:
        from pluribus.data.tasks import load_problems

        problems = load_problems(task)
    if not problems:
        raise PluribusError("the task selects no problems; check task.source, task.path, task.split and task.n")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PluribusError(f"problem ids must be unique; '{dup}' appears more than once in the task")
    apply_threads(recipe.threads)  # before a model loads: torch sizes its pools on first use
    fresh = not (recipe.layout.trajectories() / "manifest.json").is_file()
    owned: dict[str, Any] = {}  # backends built here are closed here: a vLLM engine holds its memory until then
    try:
        return _debate_into_store(recipe, problems, backends, fresh=fresh, new_run=new_run, progress=progress,
                                  on_step=on_step, label=label, holder=owned, weights=weights, seats=seats, verifier=verifier)
    finally:
        for backend in owned.get("backends", {}).values():
            backend.close()


def _debate_into_store(recipe: Recipe, problems: Sequence[Problem], backends: Mapping[tuple, Backend] | None, *,
                       fresh: bool, new_run: bool, progress: bool, on_step: Callable[[int, int], None] | None,
                       label: str, holder: dict[str, Any], weights: str | None = None,
                       seats: Mapping[str, Path] | None = None,
                       verifier: Any = None) -> DebateSummary:
    """``run_debate`` from its checks on; the backends it builds are left in ``holder`` for the caller to close."""
    from pluribus.config import write_recipe
    from pluribus.seats import fingerprints

    seat_prints = fingerprints(dict(seats)) if seats else None
    team_cfg = recipe.require("team")
    backends, too_long = _check_before_files(recipe, problems, backends, fresh=fresh, holder=holder,
                                             verifier=verifier, progress=progress)
    with _open_store(recipe, weights, seat_prints, new_run=new_run) as store:
        write_recipe(recipe)  # only now: a config the store refused must not replace the run's recipe
        done = store.done_ids()
        pending = [p for p in problems if p.id not in done]
        if pending and backends is None:
            backends = holder["backends"] = make_backends(team_cfg, trust_remote_code=recipe.trust_remote_code,
                                                          device=recipe.device)
        stored_before = len(problems) - len(pending)
        if pending:
            if verifier is None and team_cfg.verifier:
                verifier = load_verifier(recipe)  # only when something is left to debate
            team = build_team(team_cfg, backends, verifier)  # type: ignore[arg-type]
            if too_long is None:
                too_long = check_prompts(pending, team)  # a resumed run checks what it still has to debate
            pending = [p for p in pending if p.id not in too_long]
        skipped = [reason for pid, reason in (too_long or {}).items() if pid not in done]
        # A step with any problem pending is debated whole: one torn by a crash is batched again as the
        # uninterrupted run batched it.
        todo = {p.id for p in pending}
        steps = _steps(team_cfg, [p for p in problems if p.id not in (too_long or {})])
        tokens, new, t0 = 0, 0, time.perf_counter()
        with _Progress(progress, total=len(problems) - len(skipped), done=stored_before, label=label,
                       per_problem=generations_per_problem(team_cfg), agents=len(team_cfg.agents),
                       rounds=team_cfg.rounds) as bar:
            for chunk in steps:
                if not todo & {p.id for p in chunk}:
                    continue
                trajs = debate_step(chunk, team, run_id=store.run_id, seed=recipe.seed, on_batch=bar.batch,
                                    skipped=skipped)
                trajs = [t for t in trajs if t.problem_id in todo]
                store.append([t.to_dict() for t in trajs])
                tokens += sum(t.cost["tokens_out"] for t in trajs)
                new += len(trajs)
                bar.update(trajs)
                if on_step is not None:
                    on_step(stored_before + new, len(problems))
        wanted = {p.id for p in problems}
        records = [r for r in store.iter_records() if r["problem_id"] in wanted]
        where = _where(team_cfg, backends) if pending else {}
        if where:
            record_where(recipe.layout.trajectories(), label, where)
    elapsed = time.perf_counter() - t0
    return dataclasses.replace(
        summarize(records, new=new, tokens_per_second=tokens / elapsed if pending else 0.0,
                  duplicates=store.duplicates, skipped=skipped), ran_on=ran_on(where))


def _check_before_files(recipe: Recipe, problems: Sequence[Problem], backends: Mapping[tuple, Backend] | None, *,
                        fresh: bool, holder: dict[str, Any], verifier: Any, progress: bool = True
                        ) -> tuple[Mapping[tuple, Backend] | None, dict[str, str] | None]:
    """What a run checks before its first file: the team's models (a new run loads them, left in ``holder``),
    and a new run's round-0 prompts against the contexts; returns (the backends, the problems too long, by id:
    None where not checked yet)."""
    team_cfg = recipe.require("team")
    if backends is None:
        check_team_models(team_cfg, progress=progress)
        if fresh:
            # a new run loads its models before its first file, so a broken checkpoint leaves no run folder
            backends = holder["backends"] = make_backends(team_cfg, trust_remote_code=recipe.trust_remote_code,
                                                          device=recipe.device)
    too_long: dict[str, str] | None = None
    if fresh and backends is not None:
        # round 0 of every problem against the contexts: a refusal comes before any file, not hours in
        too_long = check_prompts(problems, build_team(team_cfg, backends, verifier or _NO_VERIFIER))
    return backends, too_long


def _open_store(recipe: Recipe, weights: str | None, seat_prints: dict[str, str] | None, *,
                new_run: bool) -> TrajectoryStore:
    """The run's trajectory store, keyed by the recipe's config hash (with its seats' fingerprints)."""
    return TrajectoryStore(recipe.layout.trajectories(), config_hash(recipe, weights, seat_prints), new_run=new_run,
                           same_config=older_config_hashes(recipe, weights), check=Trajectory.from_dict,
                           family=seats_family(recipe, seat_prints) if seat_prints else None)


def _steps(team: TeamConfig, debated: list[Problem]) -> list[list[Problem]]:
    """The debate's steps: slices of the whole task's debated problems (not of what is pending), so a resumed
    run batches as the uninterrupted one did; ``team.problems_per_step``, else as many as fill a batch."""
    step = team.problems_per_step or max(1, team.batch_size // len(team.agents))
    return [debated[s : s + step] for s in range(0, len(debated), step)]


def _where(team: TeamConfig, backends: Mapping[tuple, Backend] | None) -> dict[str, dict[str, str]]:
    """Where each agent (and the judge) of ``team`` generated: its backend's device and dtype."""
    if not backends:
        return {}
    agents = [(a.name or f"agent{i}", a) for i, a in enumerate(team.agents)]
    agents += [(team.judge.name or "judge", team.judge)] if team.judge else []
    return {name: where_backend(backends[backend_key(a)]) for name, a in agents if backend_key(a) in backends}


class _Unloaded:
    """Stands in for a verifier not loaded yet where only prompts are checked (it is never asked to score)."""

    name = "unloaded"

    def score(self, groups: list[tuple[str, list[str]]]) -> list[list[list[float]]]:
        raise PluribusError("internal: the verifier was asked to score before it was loaded")


_NO_VERIFIER = _Unloaded()


class _Progress:
    """A rich progress bar over generations (so it moves with every finished batch, also inside a long step),
    showing the problems stored, generated tokens/s, and the running accuracy of what the bar runs, named by it:
    a debate's final and round-0 answers ("team" for the debate stage, else the eval system's label), one agent's
    answers, or independent samples' (sc's draws, the single agent's own samples) accuracy per sample."""

    def __init__(self, enabled: bool, total: int, done: int, label: str = "debate", per_problem: int = 1,
                 agents: int = 1, rounds: int = 1) -> None:
        self.enabled, self.total, self.done, self.label = enabled, total, done, label
        self.agents, self.rounds = agents, rounds
        self.per_problem = max(1, per_problem)
        self.n = self.team_ok = self.r0_ok = self.r0_n = 0
        self.tokens, self.t0 = 0, time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(escape(self.label)), BarColumn(),
                                TextColumn("{task.fields[stored]}/{task.fields[problems]} problems"),
                                TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total * self.per_problem,
                                          completed=self.done * self.per_problem, stored=self.done,
                                          problems=self.total, stats="")
        return self

    def _stats(self) -> str:
        tps = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        if not self.n:
            return f"{tps:.1f} tok/s"
        name = "team" if self.label == "debate" else self.label
        final, first = self.team_ok / self.n, self.r0_ok / max(1, self.r0_n)
        if self.rounds > 1:
            return f"{tps:.1f} tok/s  {name} {final:.1%}  round-0 {first:.1%}"
        if self.agents > 1:  # no debate: independent samples, whose vote (sc's budget vote) is not this store's
            return f"{tps:.1f} tok/s  {name} per sample {first:.1%}"
        return f"{tps:.1f} tok/s  {name} {final:.1%}"

    def batch(self, gens: list[Generation]) -> None:
        """A batch of generations finished (called from inside a step)."""
        self.tokens += sum(g.tokens_out for g in gens)
        if self.enabled:
            self.bar.update(self.task, advance=len(gens), stats=self._stats())

    def update(self, trajs: list[Trajectory]) -> None:
        """A step's trajectories were stored."""
        self.n += len(trajs)
        self.team_ok += sum(bool(t.final_correct) for t in trajs)
        r0 = [bool(turn.correct) for t in trajs for turn in t.rounds[0]]
        self.r0_ok += sum(r0)
        self.r0_n += len(r0)
        if self.enabled:
            stored = self.done + self.n
            # the batches of a step add up to its generations; set it exactly, whatever a backend reported
            self.bar.update(self.task, completed=stored * self.per_problem, stored=stored, stats=self._stats())

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# ------------------------------------------------------------------------------------------ the protocol


def summary_of(s: DebateSummary, stage: str, output: Path, line: str | None = None) -> StageSummary:
    """A debate store's summary as a stage prints it (the debate and the single agent's own samples)."""
    line = line or (f"{s.problems} problems; round-0 accuracy {s.round0_accuracy:.1%}, team {s.team_accuracy:.1%}; "
                    f"{s.corrected} corrected, {s.lost} lost")
    return StageSummary(stage, output, line, ("debate", "value"), tuple(s.rows()))


def run(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> StageSummary:
    """The debate stage of ``recipe`` (``pluribus debate``), summarized; a team of experts debates with its seats'
    weights (pluribus.seats)."""
    from pluribus.seats import seated_recipe

    seated, folders = seated_recipe(recipe)
    summary = run_debate(seated, progress=progress, new_run=new_run, seats=folders)
    if folders and recipe._previous is None:
        from pluribus.config import write_recipe

        # the run's recipe names its seats, not the folders they resolved to (a later generation's recipe keeps
        # the folders: its seat names mean the previous generation's experts, which it cannot name itself)
        write_recipe(recipe)
    return summary_of(summary, "debate", recipe.layout.trajectories())


def plan(recipe: Recipe) -> list[Stage]:
    """A debate step when the recipe has a task and a team; it keeps a store, so it always runs (and resumes).
    It runs after the trainings and merges its team seats (``after``)."""
    from pluribus.seats import seat_steps

    if recipe.task is None or recipe.team is None:
        return []
    if recipe.team.verifier:
        check_verifier_cycle(recipe)  # before any step runs
    # the PRM it aggregates with is an input (a step that trains it comes first); its contents key the store
    inputs = (lambda: {"verifier": verifier_path(recipe, check=False)}) if recipe.team.verifier else dict
    return [Stage("debate", lambda progress, new_run: run(recipe, progress=progress, new_run=new_run),
                  inputs=inputs, keeps_store=True, after=tuple(seat_steps(recipe)))]
