"""The single agent's own samples of the training problems: the data of the single-agent distillation baseline.

The baseline asks whether the team's data beats what the model gets from itself: the team's first agent's
model, alone (no persona, no peers), samples each training problem ``build.self_samples`` times (by default
the team's agents x rounds, the generations the team spent) into ``<run>/self/trajectories``, a store like
the debate's; ``build`` makes the same datasets of it with as many rows as the team's, and an expert with
``data: self`` trains on them exactly as its team twin does.
"""

from __future__ import annotations

from pluribus.config import DATASET_OF_OBJECTIVE, BuildConfig, Recipe, TeamConfig
from pluribus.data.prompts import question_prompt
from pluribus.stages import Stage, StageSummary
from pluribus.stages.debate import DebateSummary, run_debate, summary_of


def self_team(recipe: Recipe) -> TeamConfig:
    """The single agent sampled ``self_samples`` times as a team of independent agents (R=1, each its own seed)."""
    from pluribus.seats import base_agent, source_of

    team = recipe.require("team")
    build = recipe.build or BuildConfig()
    k = build.self_samples or len(team.agents) * team.rounds
    # generation g >= 2 samples with generation g-1's self student (the baseline iterated; pluribus.generations)
    # (generation 1: the first agent's base model, also when it seats an expert, as eval's single agent)
    agent = recipe._self_agent or base_agent(team.agents[0], source_of(recipe))
    members = [agent.model_copy(update={
        "name": f"self{i}", "persona": None,
        "sampling": agent.sampling.model_copy(update={"temperature": build.self_temperature,
                                                      "seed": 7919 * (i + 1) + 1_000_003 * recipe.seed}),
    }) for i in range(k)]
    return team.model_copy(update={"agents": members, "rounds": 1, "topology": "all", "aggregation": "majority",
                                   "verifier": None, "judge": None, "early_stop": False,
                                   "prompts": {**team.prompts, "question": question_prompt(build, team)}})


def self_recipe(recipe: Recipe) -> Recipe:
    """The recipe of the self store: the run's task and the self team, in ``<run>/self/``."""
    return recipe.model_copy(update={"root": str(recipe.run_dir), "name": "self", "team": self_team(recipe),
                                     "train": None, "merge": None, "eval": None, "export": None})


def run_self_samples(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> DebateSummary:
    """Sample (or resume sampling) the training problems with the single agent into ``<run>/self/trajectories``
    (a seated agent, as generation g-1's self student, samples with its weights; its store follows them)."""
    from pluribus.seats import seated_recipe

    seated, folders = seated_recipe(self_recipe(recipe))
    return run_debate(seated, progress=progress, new_run=new_run, seats=folders, label="self samples")


def self_kinds(recipe: Recipe) -> list[str]:
    """The dataset kinds an expert with ``data: self`` trains on: what the self samples are built into."""
    trainings = recipe.train.trainings() if recipe.train else []
    return sorted({DATASET_OF_OBJECTIVE[t.objective] for t in trainings if t.data == "self"})


def run(recipe: Recipe, *, progress: bool = True, new_run: bool = False) -> StageSummary:
    """The single agent's own samples of ``recipe``'s training problems, summarized."""
    from pluribus.errors import PluribusError

    if not self_kinds(recipe):
        raise PluribusError("no expert of the recipe has data: self, so nothing learns from the single agent's own "
                            "samples; add one (train.experts: [{name: self-rsft, objective: rsft, data: self}])")
    s = run_self_samples(recipe, progress=progress, new_run=new_run)
    k = len(self_team(recipe).agents)
    return summary_of(s, "self", recipe.layout.trajectories("self"),
                      line=f"{s.problems} problems x {k} samples of the single agent; {s.round0_accuracy:.1%} correct")


def plan(recipe: Recipe) -> list[Stage]:
    """A step when some expert learns from the single agent's own samples (and there is a task and a team)."""
    if recipe.task is None or recipe.team is None or not self_kinds(recipe):
        return []
    return [Stage("self", lambda progress, new_run: run(recipe, progress=progress, new_run=new_run),
                  keeps_store=True)]
