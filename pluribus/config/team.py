"""The team section: the debating agents, how they talk (rounds, topology) and how their answers become one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pluribus.config.agents import AgentConfig
from pluribus.config.base import Section


class TeamConfig(Section):
    agents: list[AgentConfig] = Field(
        default_factory=lambda: [AgentConfig()], min_length=1, description="The debating agents N, in order (at "
        "least one); the first is also the single agent eval compares the team with. Default: one smollm2-135m.")
    rounds: int = Field(2, ge=1, description="Debate rounds R; round 0 answers alone.")
    topology: Literal["all", "ring", "star"] = Field(
        "all", description="Whose previous answers an agent sees each round: all (every other agent), ring (the "
        "agent before it), star (agent 0 sees all others and they see agent 0; with a judge, every agent sees the "
        "judge's last turn).")
    aggregation: Literal["majority", "judge", "prm_best", "prm_vote"] = Field(
        "majority", description="How the last round becomes the team's answer: majority (vote of the parsed "
        "answers), judge (the judge agent's verdict), prm_best (the answer of the member whose final solution the "
        "verifier scores highest), prm_vote (each answer weighs the sum of its voters' verifier scores); see "
        "pluribus.data.verify.")
    verifier: str | None = Field(
        None, description="prm_best / prm_vote: the process reward model that scores each member's final solution "
        "step by step: a PRM expert of the run by name (<run>/adapters/<name>) or a PRM adapter folder. Its scores "
        "are kept in each trajectory (meta.verifier), and its contents key the store.")
    verifier_aggregate: Literal["min", "product", "last", "mean"] = Field(
        "min", description="How a solution's step scores become one score (prm_best, prm_vote, eval's prm-bon): "
        "min (its weakest step), product (every step right, steps taken as independent), last (its final step's "
        "score), mean.")
    judge: AgentConfig | None = Field(None, description="Judge agent for topology star / aggregation judge.")
    batch_size: int = Field(32, ge=1, description="Max conversations a transformers backend decodes at once (a "
                            "finished one's slot goes to the next).")
    peer_token_budget: int = Field(256, ge=16, description="Max tokens of each peer response shown to an agent.")
    prompts: dict[str, str] = Field(
        default_factory=dict,
        description="Prompt template overrides by name (question, debate, peer, judge); see pluribus.data.prompts.",
    )
    problems_per_step: int | None = Field(
        None, ge=1, description="Problems debated together (stored after each step); None: batch_size // agents."
    )
    early_stop: bool = Field(
        False, description="Stop debating a problem once every agent gives the same parsed answer (recorded in "
        "the trajectory's meta.stopped_after_round); eval reports the tokens it saves and its effect on accuracy.")
    too_long: Literal["error", "skip"] = Field(
        "error", description="A problem whose prompt does not fit an agent's context (after peer trimming), in any "
        "round: error (refuse, naming it and the numbers) or skip (leave it out, counted and named in the summary). "
        "Prompts are never cut.")

    def seat_names(self) -> list[str]:
        """The agents' names as the debate records them (``agent<i>`` for an unnamed one)."""
        return [a.name or f"agent{i}" for i, a in enumerate(self.agents)]

    @model_validator(mode="after")
    def _verifier_with_prm_aggregation(self) -> TeamConfig:
        if self.aggregation.startswith("prm_") and not self.verifier:
            raise ValueError(f"aggregation '{self.aggregation}' needs team.verifier: a PRM expert of the run by "
                             "name or a PRM adapter folder")
        if self.verifier and not self.aggregation.startswith("prm_"):
            raise ValueError(f"team.verifier is set but aggregation is '{self.aggregation}', which does not use it; "
                             "set aggregation: prm_best or prm_vote, or remove team.verifier")
        return self

