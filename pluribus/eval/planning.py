"""What eval's systems are made of: a Plan per system, the teams it runs (single agent, team, sc), checks.

A plan is one system in one decoding mode: its label (its store's folder and its name in the report), its kind
(the registered system, pluribus.eval.systems), the team it runs as (a single agent is a team of N=1, R=1), and the
adapter whose contents name its store. ``PlanContext`` is what every system's planning reads: the recipe's team as
written and as seated, its question prompt, its experts and merges, and which systems were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pluribus.adapter import read_adapter_config
from pluribus.config import EvalConfig, Recipe, TeamConfig
from pluribus.errors import PluribusError
from pluribus.eval.members import Member


@dataclass(frozen=True)
class Plan:
    """One system to evaluate: its label, kind, decoding mode, team, and adapter (for its store's key)."""

    label: str
    system: str  # its registered system's kind: single | sc | team | expert | merged | distilled | prm-bon | ...
    mode: str
    team: TeamConfig
    adapter: str | None = None
    seats: dict[str, Path] = field(default_factory=dict)  # a team of experts: its seats' folders (pluribus.seats)
    generation: int = 1  # pluribus.generations; generation g >= 2's labels start with gen<g>/
    verifier: str | None = None  # the PRM folder of prm-bon, or of a team that aggregates with one
    member: Member | None = None  # member-sc's and member-prm-bon's seat (pluribus.eval.members)

    @property
    def prefix(self) -> str:
        """What its generation's labels start with: '' for generation 1, 'gen<g>/' after."""
        from pluribus.generations import prefix

        return prefix(self.generation)


def single_team(team: TeamConfig, *, adapter: str | None, model: str | None, mode: str, cfg: EvalConfig,
                name: str, prompt: str) -> TeamConfig:
    """The team's first agent alone (N=1, R=1), asked the recipe's one question prompt: greedy, or sampled at
    ``eval.temperature``; with ``adapter`` or another ``model`` (an expert, a merge), on ``eval.device`` when set."""
    agent = team.agents[0]
    sampling = agent.sampling.model_copy(update={
        "temperature": cfg.temperature if mode == "sampled" else 0.0,
        **({"max_new_tokens": cfg.max_new_tokens} if cfg.max_new_tokens else {}),
    })
    member = agent.model_copy(update={"name": name, "persona": None, "adapter": adapter, "sampling": sampling,
                                      **({"model": model} if model else {}),
                                      **({"device": cfg.device} if cfg.device else {})})  # eval.device
    return team.model_copy(update={"agents": [member], "rounds": 1, "topology": "all", "aggregation": "majority",
                                   "verifier": None, "judge": None, "problems_per_step": None, "early_stop": False,
                                   "prompts": {**team.prompts, "question": prompt}})


def team_as_run(team: TeamConfig, cfg: EvalConfig) -> TeamConfig:
    """The team as eval runs it: ``eval.max_new_tokens`` (when set) for every agent and the judge."""
    if not cfg.max_new_tokens:
        return team

    def capped(a: Any) -> Any:
        return a.model_copy(update={"sampling": a.sampling.model_copy(update={"max_new_tokens": cfg.max_new_tokens})})

    return team.model_copy(update={"agents": [capped(a) for a in team.agents],
                                   "judge": capped(team.judge) if team.judge else None})


def sc_team(single: TeamConfig, k: int, temperature: float, seed: int) -> TeamConfig:
    """k independent samples of the single agent (distinct seeds), R=1: the draws self-consistency votes over."""
    agent = single.agents[0]
    members = [agent.model_copy(update={"name": f"sc{i}", "sampling": agent.sampling.model_copy(
        update={"temperature": temperature, "seed": 104729 * (i + 1) + 1_000_003 * seed})}) for i in range(k)]
    return single.model_copy(update={"agents": members})


def default_adapter(recipe: Recipe) -> Path:
    """The distilled system's adapter when ``eval.adapter`` is unset: the first expert that is not a PRM."""
    experts = [t for t in recipe.train.trainings() if t.objective != "prm"] if recipe.train else []
    return recipe.layout.adapter(experts[0].expert_name if experts else "rsft")


def eval_verifier(recipe: Recipe) -> str | None:
    """The PRM prm-bon chooses with, by name or folder: ``eval.verifier``, else ``team.verifier``, else the train
    section's PRM expert when it has exactly one; None when there is none."""
    if recipe.eval is not None and recipe.eval.verifier:
        return recipe.eval.verifier
    if recipe.team is not None and recipe.team.verifier:
        return recipe.team.verifier
    prms = [t.expert_name for t in recipe.train.trainings() if t.objective == "prm"] if recipe.train else []
    return prms[0] if len(prms) == 1 else None


def check_system_adapter(path: Path, what: str, fix: str) -> None:
    """Refuse a system whose adapter folder has no readable PEFT adapter (``fix`` says what to do)."""
    if not (path / "adapter_config.json").is_file():
        raise PluribusError(f"the {what} system needs an adapter; '{path}' has none. {fix}")
    read_adapter_config(path)


@dataclass(frozen=True)
class PlanContext:
    """What every system's planning reads, resolved once per ``plan_systems``."""

    recipe: Recipe
    cfg: EvalConfig
    team: TeamConfig  # the team as written, its seats' base models (the single agent and sc are its first agent)
    seated: TeamConfig  # the team as it debates: a team of experts with its seats' weights
    seat_folders: dict[str, Path]
    prompt: str  # the recipe's one question prompt
    experts: dict[str, Any]  # the train section's trainings, by expert name
    merges: dict[str, Any]  # the merge section's merges, by name
    requested: list[str]  # eval.systems as asked (or the recipe's defaults)
    check: bool  # whether adapters and folders must exist now

    def single_agent(self, system: str, name: str, adapter: str | None, model: str | None) -> list[Plan]:
        """The plans of one single-agent system, one per decoding mode (``eval.modes``), labelled ``<name>-<mode>``."""
        return [Plan(f"{name}-{mode}", system, mode, single_team(self.team, adapter=adapter, model=model, mode=mode,
                                                                 cfg=self.cfg, name=name, prompt=self.prompt), adapter)
                for mode in self.cfg.modes]

    def prm_folder(self, name: str) -> Path:
        """The folder of the PRM ``name`` (an expert of the run, or a folder), checked when ``check`` is set."""
        from pluribus.data.verify import prm_folder

        return prm_folder(self.recipe, name, check=self.check)


def plan_context(recipe: Recipe, requested: list[str], *, check: bool) -> PlanContext:
    """The recipe's team (as written and as seated), question prompt, experts and merges, for ``requested``."""
    from pluribus.data.prompts import question_prompt
    from pluribus.seats import base_team, seated, source_of

    written = recipe.require("team")
    # a team of experts debates with its seats' weights; the single agent and sc are its first agent's base model
    seated_team, seat_folders = seated(written, source_of(recipe), check=check)
    team = base_team(written, source_of(recipe))
    return PlanContext(
        recipe=recipe, cfg=recipe.eval or EvalConfig(), team=team, seated=seated_team, seat_folders=seat_folders,
        prompt=question_prompt(recipe.build, team),
        experts={t.expert_name: t for t in recipe.train.trainings()} if recipe.train else {},
        merges={m.name: m for m in recipe.merge.all()} if recipe.merge else {}, requested=requested, check=check)
