"""Team seats: an agent (or the judge) that names an expert or a merge of a run, resolved to the weights it runs.

A seat ``expert: <name>`` means ``<run>/adapters/<name>`` on that expert's base model (``train.model`` or the
expert's own), or ``<run>/merged/<name>``: an adapter on the base of the experts it merges, or a full model. The
run is the recipe's own, or for generation g >= 2 the recipe of generation g-1 (``Recipe._previous``). Names are
checked when the recipe loads (config.seat_problem); folders when a stage runs. The folders a team seats are
what its debate's answers depend on: the debate store is keyed by their weights (stages.debate.config_hash).
"""

from __future__ import annotations

from pathlib import Path

from pluribus.config import AgentConfig, Recipe, TeamConfig, seat_base_model, seatable
from pluribus.errors import PluribusError


def source_of(recipe: Recipe) -> Recipe:
    """The recipe whose experts and merges ``recipe``'s seats name: generation g-1's, else its own."""
    return recipe._previous or recipe


def seat_folder(source: Recipe, name: str) -> Path:
    """Where seat ``name`` of ``source``'s run lies: its adapter folder, or its merge's folder."""
    kind = seatable(source).get(name)
    if kind is None:
        raise PluribusError(f"'{name}' is not an expert or merge of run '{source.run_dir}'; use one of: "
                            f"{', '.join(seatable(source)) or 'none'}")
    return source.layout.adapter(name) if kind == "expert" else source.layout.merged(name)


def resolve_agent(agent: AgentConfig, source: Recipe, *, check: bool = True) -> AgentConfig:
    """``agent`` with its seat turned into ``model`` and ``adapter`` (no seat: unchanged).

    ``check``: the folder must hold the trained weights (a stage about to generate), else the path is planned."""
    if agent.expert is None:
        return agent
    folder = seat_folder(source, agent.expert)
    if check and not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise PluribusError(f"agent '{agent.name or agent.expert}' seats '{agent.expert}', but '{folder}' holds no "
                            "adapter or model yet; train (or merge) it first: pluribus run RECIPE orders it so")
    if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        weights = {"model": str(folder), "adapter": None}  # a full merged model
    else:
        weights = {"model": seat_base_model(source, agent.expert), "adapter": str(folder)}
    return agent.model_copy(update={**weights, "expert": None})


def base_agent(agent: AgentConfig, source: Recipe) -> AgentConfig:
    """``agent`` on its seat's base model, without adapter or seat: the base single agent of a seated team."""
    if agent.expert is None:
        return agent
    return agent.model_copy(update={"model": seat_base_model(source, agent.expert), "adapter": None, "expert": None})


def base_team(team: TeamConfig, source: Recipe) -> TeamConfig:
    """``team`` with its first agent on its seat's base model (``base_agent``): what eval's single agent and sc run."""
    return team.model_copy(update={"agents": [base_agent(team.agents[0], source), *team.agents[1:]]})


def seated(team: TeamConfig, source: Recipe, *, check: bool = True) -> tuple[TeamConfig, dict[str, Path]]:
    """``team`` with every seat resolved, and the folders of its seats by role (``agents.<i>``, ``judge``)."""
    folders: dict[str, Path] = {}
    agents = []
    for i, agent in enumerate(team.agents):
        if agent.expert is not None:
            folders[f"agents.{i}"] = seat_folder(source, agent.expert)
        agents.append(resolve_agent(agent, source, check=check))
    judge = team.judge
    if judge is not None and judge.expert is not None:
        folders["judge"] = seat_folder(source, judge.expert)
        judge = resolve_agent(judge, source, check=check)
    if not folders:
        return team, {}
    return team.model_copy(update={"agents": agents, "judge": judge}), folders


def seated_recipe(recipe: Recipe, *, check: bool = True) -> tuple[Recipe, dict[str, Path]]:
    """``recipe`` with its team's seats resolved (see ``seated``), and their folders."""
    if recipe.team is None:
        return recipe, {}
    team, folders = seated(recipe.team, source_of(recipe), check=check)
    return (recipe.model_copy(update={"team": team}) if folders else recipe), folders


def fingerprints(folders: dict[str, Path]) -> dict[str, str]:
    """The fingerprint of each seat's weights (what the store of a seated debate is keyed by): eval's
    ``adapter_fingerprint``, so a retraining that leaves the weights as they were keeps the debate's answers."""
    from pluribus.adapter import adapter_fingerprint

    missing = [f"{role} ('{folder}')" for role, folder in folders.items() if not folder.is_dir()]
    if missing:
        raise PluribusError(f"the seat {missing[0]} does not exist; train or merge it first")
    return {role: adapter_fingerprint(folder) for role, folder in folders.items()}


def seat_steps(recipe: Recipe) -> list[str]:
    """The steps of `pluribus run` that make what ``recipe``'s team seats (``train:<name>``, ``merge:<name>``), so
    the debate runs after them. Only seats of the recipe's own run count (generation g-1's run before g anyway)."""
    if recipe._previous is not None or recipe.team is None:
        return []
    kinds = seatable(recipe)
    agents = [*recipe.team.agents, *([recipe.team.judge] if recipe.team.judge else [])]
    return [f"{'train' if kinds[a.expert] == 'expert' else 'merge'}:{a.expert}" for a in agents
            if a.expert is not None and a.expert in kinds]
