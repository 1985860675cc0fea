"""Prompt templates of a team (the defaults and a recipe's overrides) and the one question prompt every stage asks."""

from __future__ import annotations

from collections.abc import Mapping

from pluribus.config import BuildConfig, TeamConfig
from pluribus.errors import PluribusError, unknown_name

DEFAULT_PROMPTS: dict[str, str] = {
    "question": (
        "Can you solve the following problem? {question}\n"
        "Explain your reasoning step by step. Your final answer should be in the form \\boxed{answer}, "
        "at the end of your response."
    ),
    "peer": "One agent solution: ```{response}```",
    "debate": (
        "These are the solutions to the problem from other agents:\n\n{peers}\n\n"
        "Using the reasoning from other agents as additional information, can you provide your answer to the "
        "problem? Examine your solution and that of the other agents step by step. "
        "The original problem is: {question}\n"
        "Your final answer should be in the form \\boxed{answer}, at the end of your response."
    ),
    "reflect": (
        "Review your previous answer step by step and correct any mistake. The original problem is: {question}\n"
        "Your final answer should be in the form \\boxed{answer}, at the end of your response."
    ),
    "judge": (
        "Several agents solved this problem: {question}\n\n{peers}\n\n"
        "Compare their reasoning, decide which final answer is correct, and explain why. "
        "Your final answer should be in the form \\boxed{answer}, at the end of your response."
    ),
}


PROMPT_FIELDS = {"question": ["{question}"], "peer": ["{response}"], "debate": ["{peers}"], "reflect": [],
                   "judge": ["{question}", "{peers}"]}


def fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` for the given names only, so a literal ``\\boxed{answer}`` needs no escaping."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def resolve_prompts(overrides: Mapping[str, str]) -> dict[str, str]:
    """Defaults overlaid with the recipe's templates; a PluribusError names an unknown template or missing field."""
    unknown = sorted(set(overrides) - set(DEFAULT_PROMPTS))
    if unknown:
        raise PluribusError(unknown_name("team.prompts template(s)", unknown, DEFAULT_PROMPTS))
    prompts = {**DEFAULT_PROMPTS, **overrides}
    for name, needed in PROMPT_FIELDS.items():
        missing = [f for f in needed if f not in prompts[name]]
        if missing:
            raise PluribusError(f"prompt template team.prompts.{name} must contain {', '.join(missing)}")
    return prompts


def question_prompt(build: BuildConfig | None, team: TeamConfig | None) -> str:
    """The one question prompt that training rows, rollouts, the PRM and eval's single systems use.

    ``build.prompt_template`` when a recipe sets one, else the team's own ``question`` template, so a distilled
    model is trained on exactly what the agents were asked and examined on it.
    """
    if build is not None and build.prompt_template is not None:
        return build.prompt_template
    return resolve_prompts(team.prompts if team is not None else {})["question"]
