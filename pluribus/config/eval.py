"""The eval section: which systems run side by side on which problems, and how they decode."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pluribus.config.base import Section, _folder_name
from pluribus.config.task import TaskConfig


class EvalTask(TaskConfig):
    """A task eval runs on besides the recipe's own held-out split (another level, a file, a Hub dataset)."""

    name: str = Field(description="The task's name in the report and its folder <run>/eval/<name>/.")
    split: Literal["train", "heldout", "all"] = Field(
        "heldout", description="heldout: the held-out share (same hash split as training, so no question the "
        "students trained on); all: every problem of the source (a test file nobody trained on).")
    team: bool = Field(
        False, description="Also run the team and sc (at the team's budget on this task) here, as on the held-out "
        "split: does the team's edge transfer? They cost agents x rounds generations a problem (team_n, sc_n apply).")

    _name_is_a_folder = field_validator("name")(_folder_name)


SYSTEMS = ("single", "sc", "prm-bon", "member-sc", "member-prm-bon", "team", "team-prm", "experts", "merged",
           "distilled")


class EvalConfig(Section):
    """Every system side by side on the same problems: the base single agent, self-consistency at the team's
    token budget, the team, every expert, every merge, on the held-out split and on ``tasks``."""

    n: int | None = Field(None, ge=1, description="Held-out problems to evaluate (None: task.n, else the whole held-out split).")
    systems: list[str] | None = Field(
        None, description="single: the team's first agent's model alone (N=1, R=1); sc: that model sampled until it "
        "has spent the team's tokens on each problem, majority vote; prm-bon: sc's very samples, the one the verifier "
        "(eval.verifier) scores highest; member-sc, member-prm-bon: the same two with the team's strongest member "
        "(eval.member) in place of the single agent, by default when the team seats two different weights; "
        "team: the recipe's team; team-prm: the team's own last round, the solution "
        "the verifier scores highest (no new generation); experts: every "
        "trained expert but PRMs (or name experts one by one); merged: every merge of the merge section; "
        "distilled: the adapter in eval.adapter. None: every system the recipe has the sections for.",
    )
    team_n: int | None = Field(
        None, ge=1, description="Run the team and sc on the first team_n of the problems only (they cost "
        "agents x rounds generations each); None: all. The report says how many.")
    sc_max_samples: int = Field(32, ge=1, description="sc: at most this many samples per problem.")
    verifier: str | None = Field(
        None, description="prm-bon, team-prm: the process reward model that picks the best of sc's samples and of "
        "the team's last round: a PRM expert of "
        "the run by name or a PRM adapter folder. None: team.verifier, else the train section's PRM expert when it "
        "has exactly one. Step scores become one score by team.verifier_aggregate.")
    member: str | None = Field(
        None, description="member-sc, member-prm-bon: the team seat (an agent's name) whose weights are sampled at "
        "the team's budget. None: the seat with the highest round-0 accuracy in the run's debate (its training "
        "problems, against gold answers, or with build.target consensus by agreeing with the team's final answer; "
        "ties: the first seat). Setting it adds member-sc (and member-prm-bon, "
        "with a PRM) to the default systems, also for a team of copies of one model.")
    sc_n: int | None = Field(
        None, ge=1, description="Run sc on the first sc_n of the team's problems only (it draws many samples "
        "per problem); None: all of the team's. The report says how many.")
    adapter: str | None = Field(
        None, description="Adapter of the distilled system (default: <run>/adapters/<the first expert that is not "
        "a PRM>)."
    )
    modes: list[Literal["greedy", "sampled"]] = Field(
        default_factory=lambda: ["greedy"], min_length=1, description="Decoding of the single agent and the "
        "distilled systems (experts, merges).")
    temperature: float = Field(0.7, gt=0.0, description="Temperature of the sampled mode and of sc.")
    max_new_tokens: int | None = Field(None, ge=1, description="Override max_new_tokens of every agent eval runs: "
                                       "the team's agents and its judge, the single agent, sc's samples, every "
                                       "expert and merge.")
    tasks: list[EvalTask] = Field(default_factory=list, description="More tasks to evaluate every single-agent "
                                  "system on (transfer), each with a name; with team: true the team and sc too.")
    device: str | None = Field(
        None, description="Where eval's single-agent systems (single, sc, experts, merges, distilled) run (auto, "
        "cpu, cuda, cuda:N); None: the first agent's device, else the recipe's. The team runs as its agents say.")
    robustness: list[Literal["distractor", "typos"]] = Field(
        default_factory=list,
        description="Also run every system on perturbed copies of the held-out problems (same gold answers): "
        "distractor adds an irrelevant numeric sentence, typos swaps letters; reports each accuracy drop.",
    )

    @field_validator("systems")
    @classmethod
    def _systems(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("is empty; name at least one system, or leave it out for every system")
        return v

