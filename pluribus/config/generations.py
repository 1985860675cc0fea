"""The generations section: debate, train, evolve over several generations, and what generation g seats."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pluribus.config.base import Section


class GenerationsConfig(Section):
    """Debate, train, evolve (as DTE): generation 1 is the recipe's run; generation g >= 2 seats chosen experts
    and merges of generation g-1 in its team, debates the same training problems, builds, trains the same
    experts and merges them, all in <run>/gen<g>/ (pluribus.generations)."""

    count: int = Field(1, ge=1, le=20, description="Generations K; 1 is the recipe's run alone.")
    seats: list[str] = Field(
        default_factory=list, description="Generation g's team, one seat per team agent (same order: each keeps "
        "that agent's name, persona and sampling): the name of an expert (not a PRM) or a merge of generation "
        "g-1, or base (the agent as the recipe writes it).")
    init: Literal["base", "previous"] = Field(
        "base", description="Where generation g's experts start: base (the base model, so every generation is "
        "one step from it and comparable), or previous (each rsft, augmented and rl expert without an "
        "init_adapter of its own continues generation g-1's adapter of the same name).")
    self_student: str | None = Field(
        None, description="The data: self expert whose samples are generation g's self-distillation data (the "
        "single-agent baseline iterated). None: the first expert with data: self.")
    stop_if_no_gain: bool = Field(
        False, description="After generation g (< count), compare its best student (experts but PRMs, and "
        "merges, greedy, on eval's held-out problems) with generation g-1's (the base agent for g = 1); when it "
        "is not more accurate, stop: the later generations are skipped. Recorded in <run>/generations.json; "
        "the eval stores it fills are eval's own, so eval reuses them.")

    @model_validator(mode="after")
    def _seats_given(self) -> GenerationsConfig:
        if self.count > 1 and not self.seats:
            raise ValueError("count > 1 needs seats: the experts or merges of generation g-1 (or base) that "
                             "generation g's team seats, one per team agent")
        # not model_fields_set: a written recipe.yaml spells out every default
        idle = [k for k, f in type(self).model_fields.items() if k != "count" and getattr(self, k) != f.get_default(
            call_default_factory=True)]
        if self.count == 1 and idle:
            raise ValueError(f"{', '.join(idle)} act on generations 2 and later, and count is 1 (the recipe's run "
                             "alone); set count >= 2, or remove them")
        return self

