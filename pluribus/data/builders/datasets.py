"""The build stage: trajectory store(s) in, ``<run>/datasets/<kind>/`` out (parquet + dataset card).

    stores ─► trajectories ─► rsft rows | augmented rows | process traces ─► rollouts (stored, resumable)
           ─► labels ─► datasets/<kind>/{data/train-00000-of-00001.parquet, README.md, stats.json}

Every kind's rows (and the process traces) are chosen before anything is written or rolled out, so bad input
fails fast and leaves no empty dataset behind. Each dataset folder is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pluribus.config import AgentConfig, BuildConfig, SamplingConfig, TeamConfig, without_engine_settings
from pluribus.data.backends import Backend
from pluribus.data.builders.card import render_card
from pluribus.data.builders.process import (
    Completer,
    RolloutRequest,
    Trace,
    label_traces,
    math_shepherd,
    process_rows,
    traces_from,
)
from pluribus.data.builders.select import augmented_rows, rsft_rows
from pluribus.data.builders.steps import StepFormat
from pluribus.data.debate import conversation_seed
from pluribus.data.prompts import question_prompt
from pluribus.data.records import Trajectory
from pluribus.device import record_where, where_backend
from pluribus.errors import OutputExistsError, PluribusError, cannot_create, unknown_name
from pluribus.io import atomic_dir, atomic_write_text
from pluribus.layout import RunLayout

logger = logging.getLogger("pluribus.data")
KINDS = ("rsft", "augmented", "process")
PARQUET = "data/train-00000-of-00001.parquet"
SHEPHERD_PARQUET = "math_shepherd/train-00000-of-00001.parquet"
PROMPT_COMPLETION_PARQUET = "prompt_completion/train-00000-of-00001.parquet"


@dataclass
class Source:
    """One trajectory store being read; ``skipped`` lists ``shard:line`` of corrupt lines passed over,
    ``duplicates`` those repeating a problem already read (the first line of a problem is the one used)."""

    path: Path
    config_hash: str
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    outside: int = 0  # trajectories of problems the recipe's task does not select (left out)

    def card_row(self) -> dict[str, Any]:
        # the store by its run and folder name: a card may be pushed, and this machine's paths mean nothing there
        return {"path": f"{self.path.parent.name}/{self.path.name}", "config_hash": self.config_hash,
                "records": self.records, "skipped": len(self.skipped)}


@dataclass
class Built:
    """One written dataset: where, how many rows, and the statistics its card shows."""

    kind: str
    path: Path
    rows: int
    stats: dict[str, Any]


# ---------------------------------------------------------------------------------------- reading


def store_dir(path: str | Path) -> Path:
    """A run folder (holding ``trajectories/``) or a store folder (holding ``manifest.json``) -> the store."""
    p = Path(path)
    if (RunLayout(p).trajectories() / "manifest.json").is_file():
        return RunLayout(p).trajectories()
    if (p / "manifest.json").is_file():
        return p
    raise PluribusError(f"no trajectory store at '{p}' (neither {p}/trajectories/manifest.json nor "
                        f"{p}/manifest.json); run `pluribus debate RECIPE` first or pass the run folder")


def open_sources(paths: list[str | Path]) -> list[Source]:
    """Open each store read-only; stores written with different configs are refused (their data would mix)."""
    from pluribus.data.store import TrajectoryStore

    if not paths:
        raise PluribusError("no trajectory store given; pass --store RUN or a recipe whose run has trajectories/")
    sources = []
    for p in dict.fromkeys(store_dir(p).resolve() for p in paths):
        store = TrajectoryStore(p)
        sources.append(Source(p, str(store.manifest.get("config_hash"))))
    hashes = {s.config_hash for s in sources}
    if len(hashes) > 1:
        listing = ", ".join(f"{s.path} ({s.config_hash})" for s in sources)
        raise PluribusError(f"stores written with different configs cannot be mixed: {listing}; "
                            "build each on its own")
    return sources


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        yield from enumerate(f, 1)


def read_trajectories(sources: list[Source], *, skip_corrupt: bool = False, max_problems: int | None = None,
                      only: set[str] | None = None) -> list[Trajectory]:
    """Every trajectory of the stores, in storage order, each problem once, at most ``max_problems``; with
    ``only``, just those problems (the others are counted in ``Source.outside``).

    Reads the shards line by line (not ``TrajectoryStore.iter_records``) so that a line that parses as JSON but
    is not a Trajectory is reported with its file and line too. A bad line raises PluribusError naming file and
    line unless ``skip_corrupt``; skipped lines are listed in ``Source.skipped`` (and in the card).
    """
    from pluribus.data.store import SHARD_GLOB

    out: dict[str, Trajectory] = {}
    seen: set[str] = set()
    for src in sources:
        for shard in sorted(src.path.glob(SHARD_GLOB)):
            for lineno, raw in _lines(shard):
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("no newline at the end: a torn write")
                    traj = Trajectory.from_dict(json.loads(raw))
                except (ValueError, TypeError, KeyError, AttributeError) as e:
                    if not skip_corrupt:
                        raise PluribusError(
                            f"store shard '{shard}' line {lineno} is corrupt ({type(e).__name__}: {e}); "
                            "pass --skip-corrupt (build.skip_corrupt=true) to skip such lines, or run "
                            f"`pluribus repair {src.path}` to move them out of the store") from None
                    src.skipped.append(f"{shard.name}:{lineno}")
                    continue
                if traj.problem_id in seen:
                    src.duplicates.append(f"{shard.name}:{lineno}")
                    continue
                seen.add(traj.problem_id)
                if only is not None and traj.problem_id not in only:
                    src.outside += 1
                    continue
                src.records += 1
                if len(out) < (max_problems or float("inf")):
                    out.setdefault(traj.problem_id, traj)
    return list(out.values())


# -------------------------------------------------------------------------------------- completer


def default_completer(cfg: BuildConfig, team: TeamConfig | None) -> AgentConfig:
    """``build.completer``, else the team's first agent sampling at temperature 0.7 (rollouts must differ)."""
    if cfg.completer is not None:
        return cfg.completer
    if team is None:
        raise PluribusError("the process dataset needs a completer: set build.completer (an agent) in the recipe, "
                            "or give the recipe the team section that made the store")
    agent = team.agents[0]
    temperature = agent.sampling.temperature or (0.7 if cfg.rollouts_per_step > 1 else 0.0)
    return agent.model_copy(update={"sampling": agent.sampling.model_copy(update={"temperature": temperature})})


class BackendCompleter:
    """Rollouts with a generation backend: the prefix is sent as an unfinished assistant turn and continued."""

    def __init__(self, backend: Backend, agent: AgentConfig, prompt: str, seed: int) -> None:
        self.backend, self.agent, self.prompt = backend, agent, prompt
        self.seed, self.calls = (agent.sampling.seed if agent.sampling.seed is not None else seed), 0

    def __call__(self, requests: list[RolloutRequest]) -> list[str]:
        convs = []
        for r in requests:
            system = [{"role": "system", "content": self.agent.persona}] if self.agent.persona else []
            user = self.prompt.replace("{question}", r.problem.question)  # as the debate fills it
            convs.append([*system, {"role": "user", "content": user}, {"role": "assistant", "content": r.prefix}])
        # Each rollout is seeded by what it is (trace, step, sample), not by when it is asked for: a resumed
        # build, or other rollout batches, draw the same continuations.
        seeds = [conversation_seed(self.seed, r.key, f"step {r.step}", r.sample) for r in requests]
        sampling: SamplingConfig = self.agent.sampling.model_copy(update={"seed": seeds[0] % 2**31 if seeds else 0})
        self.calls += 1
        gens = self.backend.generate(convs, sampling, **({"seeds": seeds} if self.backend.takes_seeds else {}))
        return [g.text for g in gens]


def rollout_hash(cfg: BuildConfig, completer: AgentConfig, source_hash: str, prompt: str) -> str:
    """What a stored rollout depends on; budgets (max_problems, traces_per_problem, max_steps) may change."""
    payload = {"source": source_hash, "completer": without_engine_settings(completer.model_dump(mode="json")),
               "n": cfg.rollouts_per_step, "rule": cfg.step_rule, "regex": cfg.step_regex,
               "target": cfg.target, "prompt": prompt,
               # stores from before it graded the last step by the trace's own answer rolled it out instead
               "last_step": "own-answer"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- the stage


def select_traces(trajs: list[Trajectory], cfg: BuildConfig) -> tuple[list[Trace], dict[str, list[str]]]:
    """The process traces of every trajectory and the per-trace problems (no steps, too many, no target)."""
    report: dict[str, list[str]] = {"no_steps": [], "too_many_steps": [], "no_target": []}
    traces = [t for traj in trajs for t in traces_from(traj, target=cfg.target, rule=cfg.step_rule,
                                                       pattern=cfg.step_regex, per_problem=cfg.traces_per_problem,
                                                       max_steps=cfg.max_steps, stats=report)]
    return traces, report


def _require_rows(kind: str, rows: list, trajs: list[Trajectory], sources: list[Source], target: str) -> None:
    if rows:
        return
    where = ", ".join(str(s.path) for s in sources)
    hint = ("the task may have no gold answers: try build.target=consensus" if target == "gold"
            else "no agent agreed with the team's final answer")
    raise PluribusError(f"no correct trajectory in {where} ({len(trajs)} trajectories, target={target}) for the "
                        f"'{kind}' dataset; nothing was written ({hint})")


def build(cfg: BuildConfig, stores: list[str | Path], *, kinds: list[str] | None = None,
          out_root: str | Path | None = None, rollouts_dir: str | Path | None = None,
          team: TeamConfig | None = None, completer: Completer | None = None, seed: int = 0,
          overwrite: bool = False, new_run: bool = False, trust_remote_code: bool = False,
          progress: bool = True, match_rows: dict[str, int] | None = None, prompt_completion: bool = False,
          task_source: str | None = None, config_hashes: Collection[str] | None = None,
          problem_ids: Collection[str] | None = None, device: str | None = None) -> list[Built]:
    """Build the datasets ``kinds`` (default ``cfg.kinds``) from the trajectory stores; returns what was written.

    Output goes to ``out_root/<kind>/`` (default ``<run>/datasets``, the run being the store's parent) and
    rollouts to ``rollouts_dir`` (default ``<run>/rollouts``). ``completer`` overrides the backend built from
    ``build.completer`` (tests pass a scripted one). ``match_rows`` caps a kind at that many rows, a seeded
    choice of problems' rows (the single-agent baseline trains on as many rows as its team twin).
    ``prompt_completion`` also writes rsft as TRL's prompt-completion format (``prompt_completion/``);
    ``task_source`` (the recipe's ``task.source``) gives the cards' license and language.
    ``config_hashes``: the store configs the caller's recipe accepts (``debate.config_hash`` and its older
    forms); a store written by another is refused. ``problem_ids``: build from these problems only (the
    recipe's task), saying how many stored ones are left out. Raises PluribusError on bad input before writing
    anything; OutputExistsError if a dataset exists and ``overwrite`` is False. ``device``: the recipe's device
    setting, where the completer runs unless it names its own (``pluribus.device``).
    """
    kinds = list(dict.fromkeys(kinds or cfg.kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PluribusError(unknown_name("dataset kind(s)", unknown, KINDS))
    sources = open_sources(list(stores))
    if config_hashes is not None:
        wanted = next(iter(config_hashes))
        for src in sources:
            if src.config_hash not in config_hashes:
                raise PluribusError(
                    f"the store '{src.path}' was written by another task, team or seed (config hash "
                    f"{src.config_hash}) than this recipe's ({wanted}); build with the recipe that made it "
                    f"(pluribus build --store {src.path.parent}) or debate this one first (pluribus debate "
                    "RECIPE --new-run)")
    run_dir = sources[0].path.parent
    out_root = Path(out_root) if out_root else RunLayout(run_dir).datasets()
    existing = next(p for p in [out_root, *out_root.parents] if p.exists())  # '.' or '/' at the latest
    if not existing.is_dir():
        raise PluribusError(cannot_create(out_root, f"'{existing}' is a file, not a folder"))
    if not overwrite:
        for kind in kinds:
            if (out_root / kind).exists():
                raise OutputExistsError(out_root / kind)
    only = None if problem_ids is None else set(problem_ids)
    trajs = read_trajectories(sources, skip_corrupt=cfg.skip_corrupt, max_problems=cfg.n, only=only)
    outside = sum(s.outside for s in sources)
    if outside:
        logger.warning("build: the recipe's task selects %d of the store's %d problems; building from those %d "
                       "(%d stored ones left out)", sum(s.records for s in sources),
                       sum(s.records for s in sources) + outside, len(trajs), outside)
    task_source = task_source or _recorded_task_source(run_dir)
    if not trajs:
        what = f" of the {len(only or ())} problems the recipe's task selects" if outside else ""
        raise PluribusError(f"store(s) {', '.join(str(s.path) for s in sources)} hold no readable trajectory"
                            f"{what}; nothing was written")

    # 1. choose every kind's rows before writing anything (bad input fails here)
    rows: dict[str, list[dict[str, Any]]] = {}
    prompt = question_prompt(cfg, team)
    if "rsft" in kinds:
        rows["rsft"] = rsft_rows(trajs, target=cfg.target, prompt_template=prompt)
        _require_rows("rsft", rows["rsft"], trajs, sources, cfg.target)
    if "augmented" in kinds:
        rows["augmented"] = augmented_rows(
            trajs, target=cfg.target, prompt_template=prompt, k=cfg.k, ngram=cfg.ngram,
            measure=cfg.similarity, max_similarity=cfg.max_similarity, corrective=cfg.corrective,
            corrective_template=cfg.corrective_template,
            asked=_debate_asked(team, trust_remote_code) if cfg.corrective_context == "debate" else None)
        _require_rows("augmented", rows["augmented"], trajs, sources, cfg.target)
    traces, report = select_traces(trajs, cfg) if "process" in kinds else ([], {})
    if "process" in kinds and not traces:
        raise PluribusError(
            f"the step rule '{cfg.step_rule}' found no labellable trace in {len(trajs)} trajectories "
            f"({len(report['no_steps'])} without steps, {len(report['too_many_steps'])} over "
            f"build.max_steps={cfg.max_steps}, {len(report['no_target'])} without a target); nothing was written")

    matched: dict[str, int] = {}
    for kind, n in (match_rows or {}).items():
        if kind in rows and len(rows[kind]) > n:
            matched[kind] = len(rows[kind])
            rank = sorted(range(len(rows[kind])), key=lambda i: hashlib.sha256(
                f"{seed}:{rows[kind][i]['problem_id']}:{i}".encode()).hexdigest())
            keep = set(rank[:n])
            rows[kind] = [r for i, r in enumerate(rows[kind]) if i in keep]

    # 2. Monte-Carlo rollouts for the process traces, stored as they finish (a rerun resumes)
    records: dict[str, dict[str, Any]] = {}
    completer_cfg = None
    if traces:
        if completer is None:
            completer_cfg = default_completer(cfg, team)
        records, where = _rollouts(traces, cfg, completer, completer_cfg, sources[0].config_hash, prompt,
                                   Path(rollouts_dir) if rollouts_dir else RunLayout(run_dir).rollouts(), seed=seed,
                                   new_run=new_run, trust_remote_code=trust_remote_code, progress=progress,
                                   device=device)
        rows["process"] = process_rows(traces, records, cfg.label_threshold, prompt,
                                       cfg.monotone_labels)

    # 3. write each dataset atomically, with its card
    config = cfg.model_dump(mode="json")
    if completer_cfg is not None:
        config["completer"] = completer_cfg.model_dump(mode="json", exclude_none=True)
    built = []
    for kind in kinds:
        stats = _stats(kind, rows[kind], trajs, report, cfg)
        if kind == "process":
            stats["step_format"] = step_format(cfg, prompt).to_dict()
        stats["skipped_lines"] = [f"{s.path.name}/{line}" for s in sources for line in s.skipped]
        stats["duplicate_lines"] = [f"{s.path.name}/{line}" for s in sources for line in s.duplicates]
        if problem_ids is not None:
            stats["counts"]["stored trajectories outside the recipe's task (left out)"] = outside
        if kind == "process" and where:
            stats["completer ran on"] = where
        if match_rows and kind in match_rows:
            stats["counts"]["rows to match"] = match_rows[kind]
            stats["counts"]["rows before matching"] = matched.get(kind, len(rows[kind]))
        built.append(_write(kind, rows[kind], out_root / kind, run_dir.name, sources, config, stats, cfg,
                            overwrite=overwrite, prompt_completion=prompt_completion and kind == "rsft",
                            task_source=task_source, model=team.agents[0].model if team else None))
    return built


def _debate_asked(team: TeamConfig | None, trust_remote_code: bool) -> Any:
    """``build.corrective_context: debate``: the debate engine's own prompt builder over the team that debated,
    each agent's peers counted and trimmed by its tokenizer (``backends.peer_reader``)."""
    from pluribus.data.backends import backend_key, peer_reader
    from pluribus.data.debate import debate_prompts

    if team is None:
        raise PluribusError("build.corrective_context: debate rebuilds the debate prompts, so it needs the team "
                            "that debated: build with the recipe whose team made the store")
    readers: dict[tuple, Any] = {}
    by_model: dict[tuple, Any] = {}  # one tokenizer per model, whatever the agents' other settings
    for agent in [*team.agents, *([team.judge] if team.judge else [])]:
        model = (agent.backend == "openai", agent.model)
        if model not in by_model:
            by_model[model] = peer_reader(agent, trust_remote_code=trust_remote_code)
        readers[backend_key(agent)] = by_model[model]
    return debate_prompts(team, readers)


def _rollouts(traces: list[Trace], cfg: BuildConfig, completer: Completer | None, agent: AgentConfig | None,
              source_hash: str, prompt: str, directory: Path, *, seed: int, new_run: bool, trust_remote_code: bool,
              progress: bool, device: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every trace's rollout record (stored ones, and the rest rolled out now), and where the completer ran this
    time (``{}`` when everything was stored or a completer object was passed in)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pluribus.data.store import TrajectoryStore

    # A completer passed in (not built from a config) is identified by its ``name``, else its class name.
    what = agent or AgentConfig(model=f"completer:{getattr(completer, 'name', type(completer).__name__)}")
    store = TrajectoryStore(directory, rollout_hash(cfg, what, source_hash, prompt), new_run=new_run)
    backend, where = None, {}
    try:
        wanted = {t.key for t in traces}
        done = {r["problem_id"]: r for r in store.iter_records() if r["problem_id"] in wanted}
        if completer is None and len(done) < len(traces):
            from pluribus.data.backends import make_backend

            backend = make_backend(agent, trust_remote_code=trust_remote_code, batch_size=cfg.rollout_batch_size,
                                   device=device)
            completer = BackendCompleter(backend, agent, prompt, seed)
            where = where_backend(backend)
            record_where(directory, "build", {"completer": where})
        with Progress(TextColumn("rollouts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task("rollouts", total=len(traces))
            return label_traces(traces, completer, n=cfg.rollouts_per_step, batch_size=cfg.rollout_batch_size,
                                done=done, on_record=lambda rec: store.append([rec]),
                                on_progress=lambda k: bar.advance(task, k)), where
    finally:
        if backend is not None:
            backend.close()
        store.close()


def _stats(kind: str, rows: list[dict[str, Any]], trajs: list[Trajectory], report: dict[str, list[str]],
           cfg: BuildConfig) -> dict[str, Any]:
    counts: dict[str, Any] = {"trajectories used": len(trajs), "rows": len(rows),
                              "problems with rows": len({r["problem_id"] for r in rows})}
    stats: dict[str, Any] = {"counts": counts}
    if kind == "augmented":
        for k, v in sorted(Counter(r["kind"] for r in rows).items()):
            counts[f"rows of kind {k}"] = v
    if kind == "process":
        steps = [(lab, s) for r in rows for lab, s in zip(r["labels"], r["scores"], strict=True)]
        counts["steps"] = len(steps)
        counts["rollouts"] = (len(steps) - len(rows)) * cfg.rollouts_per_step  # the last step is not rolled out
        counts["traces without steps"] = len(report["no_steps"])
        counts["traces over max_steps"] = len(report["too_many_steps"])
        counts["problems without a target"] = len(report["no_target"])
        debate = Counter(d for r in rows for d in r["debate"])
        stats["labels"] = {
            "good steps": sum(lab for lab, _ in steps), "bad steps": sum(not lab for lab, _ in steps),
            "good step fraction": sum(lab for lab, _ in steps) / max(len(steps), 1),
            "mean step score": sum(s for _, s in steps) / max(len(steps), 1),
            "traces all good": sum(all(r["labels"]) for r in rows),
            "label threshold": cfg.label_threshold, "monotone labels": cfg.monotone_labels,
            "rollouts per step": cfg.rollouts_per_step,
            **{f"steps marked {k} by the debate": v for k, v in sorted(debate.items())},
        }
        stats.update({k: list(v) for k, v in report.items()})
    return stats


def step_format(cfg: BuildConfig, prompt: str) -> StepFormat:
    """What a PRM trained on this build's process rows reads: the rows' prompt, their step rule, and
    ``build.step_separator`` after each step (written to the dataset's stats.json; the PRM trainer uses it)."""
    return StepFormat(prompt, cfg.step_rule, cfg.step_regex, cfg.step_separator)


def prompt_completion_row(row: dict[str, Any]) -> dict[str, Any]:
    """An rsft row as TRL's conversational prompt-completion: the turns before the last one, then the last."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:],
            **{k: v for k, v in row.items() if k != "messages"}}


def _recorded_task_source(run_dir: Path) -> str | None:
    """The task source of the recipe the debate wrote into its run folder, if there is one to read."""
    import yaml

    try:
        recipe = yaml.safe_load((RunLayout(run_dir).recipe).read_text())
        source = (recipe.get("task") or {}).get("source")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return source if isinstance(source, str) else None


def _write(kind: str, rows: list[dict[str, Any]], target: Path, run: str, sources: list[Source],
           config: dict[str, Any], stats: dict[str, Any], cfg: BuildConfig, *, overwrite: bool,
           prompt_completion: bool = False, task_source: str | None = None, model: str | None = None) -> Built:
    from datasets import Dataset

    extra = {"math_shepherd": "math_shepherd"} if kind == "process" else {}
    if prompt_completion:
        extra["prompt_completion"] = "prompt_completion"
    with atomic_dir(target, overwrite=overwrite) as tmp:
        (tmp / "data").mkdir()
        Dataset.from_list(rows).to_parquet(str(tmp / PARQUET))
        if kind == "process":
            (tmp / "math_shepherd").mkdir()
            Dataset.from_list([math_shepherd(r, cfg.shepherd_tag) for r in rows]).to_parquet(str(tmp / SHEPHERD_PARQUET))
        if prompt_completion:
            (tmp / "prompt_completion").mkdir()
            Dataset.from_list([prompt_completion_row(r) for r in rows]).to_parquet(str(tmp / PROMPT_COMPLETION_PARQUET))
        card = render_card(kind, run=run, sources=[s.card_row() for s in sources], config=config, stats=stats,
                           extra_configs=extra or None, task_source=task_source, model=model)
        atomic_write_text(tmp / "README.md", card)
        atomic_write_text(tmp / "stats.json", json.dumps({"kind": kind, "run": run, **stats}, indent=2) + "\n")
    return Built(kind, target, len(rows), stats)


# ------------------------------------------------------------------------------------ recipe / hub


_LISTS = ("tags", "task_categories", "language", "size_categories")


