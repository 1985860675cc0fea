"""Step segmentation: split a solution into steps, keeping each step's span in the original text.

A step is ``text[start:end]`` with surrounding whitespace trimmed. Keeping spans (not just strings) lets the
labeller roll out from the exact prefix the agent wrote: ``prefix(i) = text[:boundary(i)]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pluribus.errors import PluribusError, unknown_name

# A sentence ends at . ! or ? followed by whitespace; decimals like 0.5 and "x = 2." at the end both work.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")

STEP_RULES = ("lines", "paragraphs", "sentences", "regex")


@dataclass(frozen=True)
class Step:
    """One step: its trimmed text and its span ``[start, end)`` in the source text."""

    text: str
    start: int
    end: int


def _trimmed(text: str, start: int, end: int) -> Step | None:
    chunk = text[start:end]
    stripped = chunk.strip()
    if not stripped:
        return None
    lead = len(chunk) - len(chunk.lstrip())
    return Step(stripped, start + lead, start + lead + len(stripped))


def _split_on(text: str, pattern: re.Pattern[str]) -> list[Step]:
    steps, pos = [], 0
    for m in pattern.finditer(text):
        step = _trimmed(text, pos, m.start())
        if step:
            steps.append(step)
        pos = m.end()
    last = _trimmed(text, pos, len(text))
    return [*steps, last] if last else steps


def split_steps(text: str, rule: str = "lines", pattern: str | None = None) -> list[Step]:
    """Split ``text`` into steps by ``rule``.

    - ``lines``: every non-blank line is a step (GSM8K solutions: one computation a line).
    - ``paragraphs``: blocks separated by blank lines.
    - ``sentences``: split after ``.``, ``!`` or ``?`` followed by whitespace (and at newlines).
    - ``regex``: every match of ``pattern`` is a step (e.g. ``(?m)^Step \\d+:.*$``); text between matches is not.

    Returns an empty list when the rule finds no step (an empty response, or a regex that never matches).
    Raises PluribusError for an unknown rule or a missing/invalid regex.
    """
    if rule == "lines":
        return _split_on(text, re.compile(r"\n"))
    if rule == "paragraphs":
        return _split_on(text, _BLANK_LINE)
    if rule == "sentences":
        lines = _split_on(text, re.compile(r"\n"))
        return [s for line in lines for s in _offset(_split_on(line.text, _SENTENCE_END), line.start)]
    if rule == "regex":
        regex = compile_step_regex(pattern)
        return [s for m in regex.finditer(text) if (s := _trimmed(text, m.start(), m.end()))]
    raise PluribusError(unknown_name("step rule", rule, STEP_RULES))


def _offset(steps: list[Step], by: int) -> list[Step]:
    return [Step(s.text, s.start + by, s.end + by) for s in steps]


def compile_step_regex(pattern: str | None) -> re.Pattern[str]:
    """The compiled step regex, or a PluribusError saying how to set ``build.step_regex``."""
    if not pattern:
        raise PluribusError("step rule 'regex' needs build.step_regex, e.g. build.step_regex='(?m)^Step \\d+:.*$'")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PluribusError(f"build.step_regex '{pattern}' is not a valid regular expression: {e}") from None


def prefix_bounds(text: str, steps: list[Step]) -> list[int]:
    """``b[i]`` such that ``text[:b[i]]`` is the prefix that ends with step i and its separator.

    For step i < last, the prefix runs up to where step i+1 starts (so it ends with the separator the agent
    wrote, typically a newline); the last step's prefix ends where the step ends. ``text[:b[i]] +
    text[b[i]:]`` is the whole text, which is why a completer that returns ``text[b[i]:]`` reproduces it.
    """
    return [steps[i + 1].start for i in range(len(steps) - 1)] + ([steps[-1].end] if steps else [])


@dataclass(frozen=True)
class StepFormat:
    """How a question and a solution become a PRM's input; the one record of it (a process dataset's
    ``stats.json`` and a PRM's ``training_record.json`` hold it under ``step_format``).

    The input is the chat-templated user turn ``prompt_template`` with ``{question}`` filled in, then each step
    (``split_steps(solution, step_rule, step_regex)``, trimmed) followed by ``step_separator``; a step's score is
    read at the last token of step + separator.
    """

    prompt_template: str = "{question}"
    step_rule: str = "lines"
    step_regex: str | None = None
    step_separator: str = "\n"

    def prompt(self, question: str) -> str:
        """The user turn for ``question`` (other braces of the template are literal)."""
        return self.prompt_template.replace("{question}", question)

    def split(self, solution: str) -> list[str]:
        """The steps of a free-text solution, as the process builder split the training traces."""
        return [s.text for s in split_steps(solution, self.step_rule, self.step_regex)]

    def to_dict(self) -> dict[str, str | None]:
        return {"prompt_template": self.prompt_template, "step_rule": self.step_rule,
                "step_regex": self.step_regex, "step_separator": self.step_separator}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> StepFormat:
        """The format a record holds; a PluribusError naming ``where`` when a field is missing or not text."""
        fields = ("prompt_template", "step_rule", "step_separator")
        bad = [f for f in fields if not isinstance(data.get(f), str)]
        if bad or not isinstance(data.get("step_regex"), str | None) or data["step_rule"] not in STEP_RULES:
            raise PluribusError(f"{where}: step_format {data!r} is incomplete or invalid (needs text fields "
                                f"{', '.join(fields)}, step_rule one of {', '.join(STEP_RULES)}); rebuild or retrain")
        return cls(data["prompt_template"], data["step_rule"], data.get("step_regex"), data["step_separator"])
