"""Answer-preserving perturbations of held-out problems, to measure how robust each system's accuracy is.

Each perturbation rewrites the question text only, so the gold answer still holds, and is seeded by the
problem id so every system sees the same perturbed question:
  * ``distractor``: an irrelevant sentence carrying a number, placed before the question sentence (the
    GSM-IC construction, Shi et al. 2023, arXiv:2302.00093): a robust solver ignores it;
  * ``typos``: adjacent letters swapped inside about one word in eight (words of 4+ letters; never numbers):
    a robust solver reads through them.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import replace

from pluribus.data.records import Problem

PERTURBATIONS = ("distractor", "typos")

_NAMES = ("Priya", "Tomas", "Amara", "Kenji", "Lucia", "Omar", "Greta", "Idris", "Mei", "Sven")
_THINGS = (("bicycles", "has"), ("postcards", "collected"), ("plants", "watered"), ("songs", "learned"),
           ("stamps", "owns"), ("puzzles", "solved"), ("candles", "bought"), ("letters", "wrote"))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]{4,}")


def _rng(problem_id: str, kind: str) -> random.Random:
    digest = hashlib.sha256(f"{kind}\x00{problem_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def distractor(question: str, rng: random.Random) -> str:
    """``question`` with an irrelevant numeric sentence before its last sentence (or first, if it has one)."""
    thing, verb = rng.choice(_THINGS)
    extra = f"{rng.choice(_NAMES)}'s cousin {verb} {rng.randint(2, 97)} {thing} last year."
    parts = _SENTENCE_END.split(question.strip())
    return " ".join([*parts[:-1], extra, parts[-1]])


def typos(question: str, rng: random.Random, rate: float = 0.125) -> str:
    """``question`` with two adjacent interior letters swapped in ``rate`` of its words of 4+ letters (at least one)."""
    words = list(_WORD.finditer(question))
    if not words:
        return question
    chosen = [m for m in words if rng.random() < rate] or [rng.choice(words)]
    out, last = [], 0
    for m in chosen:
        w = m.group()
        i = rng.randint(1, len(w) - 3)  # keep the first and last letters
        out += [question[last : m.start()], w[:i], w[i + 1], w[i], w[i + 2 :]]
        last = m.end()
    out.append(question[last:])
    return "".join(out)


def original_id(problem_id: str) -> str:
    """The id a perturbed problem was made from (``<id>~<kind>`` -> ``<id>``); other ids unchanged."""
    base, _, kind = problem_id.rpartition("~")
    return base if base and kind in PERTURBATIONS else problem_id


def perturb(problem: Problem, kind: str) -> Problem:
    """The perturbed copy of ``problem`` (id ``<id>~<kind>``, ``meta.perturbation`` = kind); the answer is kept."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation '{kind}'; choose from {', '.join(PERTURBATIONS)}")
    rng = _rng(problem.id, kind)
    question = distractor(problem.question, rng) if kind == "distractor" else typos(problem.question, rng)
    return replace(problem, id=f"{problem.id}~{kind}", question=question,
                   meta={**problem.meta, "perturbation": kind, "original_id": problem.id})
