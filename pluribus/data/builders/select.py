"""Choosing traces from trajectories: verified-correct final reasoning (rsft), diverse and corrective traces (augmented).

Pure functions over ``Trajectory`` records: no files, no models. A turn is *correct* when it matches the gold
answer (``target='gold'``: the debate's own grading, ``Turn.correct``) or the team's final answer
(``target='consensus'``, for tasks without gold).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from string import Formatter
from typing import Any

from pluribus.data.prompts import fill
from pluribus.data.records import Trajectory, Turn

CORRECTIVE_FIELDS = ("question", "first_attempt", "first_answer", "corrected", "corrected_answer")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def template_fields(template: str) -> set[str]:
    """The ``{name}`` fields a ``str.format`` template uses."""
    return {name for _, name, _, _ in Formatter().parse(template) if name is not None}


# ------------------------------------------------------------------------------------------ verdicts


def is_correct(turn: Turn, traj: Trajectory, target: str) -> bool:
    """Whether ``turn`` counts as correct: against the gold answer, or against the team's final answer."""
    if target == "consensus":
        if traj.final_answer is None or turn.answer is None:
            return False
        from pluribus.data.answers import is_equivalent

        return bool(is_equivalent(turn.answer, traj.final_answer))
    if turn.correct is not None:
        return bool(turn.correct)
    if not traj.gold or turn.answer is None:
        return False
    from pluribus.data.answers import is_equivalent

    return bool(is_equivalent(turn.answer, traj.gold))


def _norm(text: str) -> str:
    return " ".join(text.split())


def chat(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ---------------------------------------------------------------------------------------------- rsft


def rsft_rows(trajs: Iterable[Trajectory], *, target: str, prompt_template: str) -> list[dict[str, Any]]:
    """Reasoning SFT: per problem, the final-round responses judged correct, duplicates (same text) removed."""
    rows = []
    for traj in trajs:
        prompt = fill(prompt_template, question=traj.question)
        seen: set[str] = set()
        for turn in traj.rounds[-1]:
            key = _norm(turn.response)
            if not key or key in seen or not is_correct(turn, traj, target):
                continue
            seen.add(key)
            rows.append({"messages": chat(prompt, turn.response), "problem_id": traj.problem_id,
                         "agent": turn.agent, "round": turn.round})
    return rows


# ------------------------------------------------------------------------------------------ diversity


def ngrams(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """Word n-grams of the lower-cased text (punctuation marks are words); a text shorter than n is one gram."""
    toks = _TOKEN.findall(text.lower())
    if len(toks) < n:
        return frozenset([tuple(toks)]) if toks else frozenset()
    return frozenset(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def similarity(a: frozenset, b: frozenset, measure: str = "jaccard") -> float:
    """N-gram overlap in [0, 1]: ``jaccard`` = |A∩B| / |A∪B|; ``containment`` = |A∩B| / min(|A|, |B|)."""
    if not a or not b:
        return 1.0 if a == b else 0.0
    inter = len(a & b)
    if measure == "containment":
        return inter / min(len(a), len(b))
    return inter / len(a | b)


def select_diverse(texts: list[str], k: int, *, n: int = 3, measure: str = "jaccard",
                   max_similarity: float = 1.0) -> list[int]:
    """Greedy farthest-first choice of up to ``k`` texts (indices, in choice order).

    The first text is taken first (callers order by preference); then repeatedly the text whose highest
    similarity to the chosen ones is lowest. A text more similar than ``max_similarity`` to a chosen one is
    never taken, so near-duplicates do not fill the quota. Ties go to the earlier text (deterministic).
    """
    grams = [ngrams(t, n) for t in texts]
    chosen: list[int] = []
    closest = [0.0] * len(texts)  # highest similarity of each text to the chosen set
    while len(chosen) < min(k, len(texts)):
        pool = [i for i in range(len(texts)) if i not in chosen and (not chosen or closest[i] <= max_similarity)]
        if not pool:
            break
        pick = min(pool, key=lambda i: (closest[i], i))
        chosen.append(pick)
        for i in range(len(texts)):
            closest[i] = max(closest[i], similarity(grams[i], grams[pick], measure))
    return chosen


# ------------------------------------------------------------------------------------------ augmented


def corrective_pairs(traj: Trajectory, target: str) -> list[tuple[Turn, Turn]]:
    """(wrong turn in round r-1, right turn in round r) of the same agent, for every agent and round."""
    pairs = []
    for r in range(1, len(traj.rounds)):
        before = {t.agent: t for t in traj.rounds[r - 1]}
        for turn in traj.rounds[r]:
            prev = before.get(turn.agent)
            if prev is not None and not is_correct(prev, traj, target) and is_correct(turn, traj, target):
                pairs.append((prev, turn))
    return pairs


def corrective_text(template: str, traj: Trajectory, wrong: Turn, right: Turn) -> str:
    """The single-agent self-correction transcript: first attempt, a check, the corrected answer."""
    return template.format(question=traj.question, first_attempt=wrong.response.strip(),
                           first_answer=wrong.answer if wrong.answer is not None else "unclear",
                           corrected=right.response.strip(), corrected_answer=right.answer)


def augmented_rows(trajs: Iterable[Trajectory], *, target: str, prompt_template: str, k: int, ngram: int,
                   measure: str, max_similarity: float, corrective: bool,
                   corrective_template: str,
                   asked: Callable[[Trajectory, Turn], str] | None = None) -> list[dict[str, Any]]:
    """Up to ``k`` diverse correct traces per problem (``kind='diverse'``) plus corrective rows.

    Candidates are the correct turns of every round, latest round first, identical texts once. A corrective row
    is the question prompt answered by the self-correction transcript (``corrective_template``), or, given
    ``asked`` (``build.corrective_context: debate``), the debate prompt the agent was asked in the round it
    corrected itself (``asked(trajectory, right turn)``: its peers' replies included) answered by its corrected
    response.
    """
    rows = []
    for traj in trajs:
        prompt = fill(prompt_template, question=traj.question)
        cands: list[Turn] = []
        seen: set[str] = set()
        for rnd in reversed(traj.rounds):
            for turn in rnd:
                key = _norm(turn.response)
                if key and key not in seen and is_correct(turn, traj, target):
                    seen.add(key)
                    cands.append(turn)
        for i in select_diverse([t.response for t in cands], k, n=ngram, measure=measure,
                                max_similarity=max_similarity):
            t = cands[i]
            rows.append({"messages": chat(prompt, t.response), "problem_id": traj.problem_id,
                         "agent": t.agent, "round": t.round, "kind": "diverse"})
        if not corrective:
            continue
        for wrong, right in corrective_pairs(traj, target):
            shown = chat(asked(traj, right), right.response) if asked is not None else \
                chat(prompt, corrective_text(corrective_template, traj, wrong, right))
            rows.append({"messages": shown,
                         "problem_id": traj.problem_id, "agent": right.agent, "round": right.round,
                         "kind": "corrective"})
    return rows
