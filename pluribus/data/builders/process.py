"""Process supervision: label each step of a solution by Monte-Carlo rollouts from its prefix.

For a solution split into steps s_1..s_m (``steps.split_steps``) and a completer that continues a prefix,

    score_i = (1/n) * #{j : check(prefix_i + completion_ij) reaches the target answer},   j = 1..n,  i < m
    score_m = check(solution)        (the last step is graded by the trace's own final answer, no rollouts)
    label_i = score_i > threshold    [and label_{i-1}, with monotone=True (BuildConfig.monotone_labels)]

``prefix_i`` is the solution text up to the end of step i and its separator (``steps.prefix_bounds``). With
threshold 0 and monotone off this is Math-Shepherd's hard estimate (a step is good if any rollout still reaches
the answer; the last step by the correctness of the answer itself). The last step is not rolled out because
nothing is left to complete: a rollout could only append text, and the last answer of a text is the one graded,
so a wrong trace whose continuation restates the right number would be labelled good. Monotone labels (every step
after the first bad one is bad) are a choice some PRM recipes make, not Math-Shepherd's, so it is an option.
Debate signals are recorded beside the labels, per step: ``final`` (a last-round trace), ``kept`` (the step
reappears in the agent's next-round answer), ``corrected`` (the trace was wrong, the agent's next answer right,
and the step did not survive) or ``revised`` (dropped without a wrong-to-right correction).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pluribus.data.builders.select import _norm, is_correct
from pluribus.data.builders.steps import Step, prefix_bounds, split_steps
from pluribus.data.records import Problem, Trajectory, Turn
from pluribus.errors import PluribusError

SHEPHERD_TAG = "ки"  # Math-Shepherd's step tag (a Cyrillic token that appears nowhere else in its text)


@dataclass(frozen=True)
class RolloutRequest:
    """Continue ``prefix`` (an assistant answer to ``problem.question`` cut after step ``step``)."""

    key: str
    step: int
    sample: int
    problem: Problem
    prefix: str


class Completer(Protocol):
    """Anything that continues prefixes: one continuation text (without the prefix) per request, in order."""

    def __call__(self, requests: list[RolloutRequest]) -> list[str]: ...


Check = Callable[[str, Problem], bool]


def answer_check(text: str, problem: Problem) -> bool:
    """The default check: the text's final answer equals ``problem.answer`` (``pluribus.data.answers.grade``)."""
    from pluribus.data.answers import grade

    return bool(grade(text, problem).correct)


@dataclass
class Trace:
    """A solution to label: ``problem.answer`` is the target (gold or consensus) the rollouts must reach."""

    key: str
    problem: Problem
    text: str
    steps: list[Step]
    agent: str = ""
    round: int = -1
    debate: list[str] = field(default_factory=list)

    @property
    def prefixes(self) -> list[str]:
        return [self.text[:b] for b in prefix_bounds(self.text, self.steps)]


def hard_labels(scores: list[float], threshold: float, monotone: bool = False) -> list[bool]:
    """``label_i = score_i > threshold``; with ``monotone``, also every earlier label good."""
    labels, ok = [], True
    for s in scores:
        ok = (ok or not monotone) and s > threshold
        labels.append(ok)
    return labels


def requests_for(trace: Trace, n: int) -> list[RolloutRequest]:
    """``n`` rollouts from each step's prefix but the last (graded by the trace's own answer instead)."""
    return [RolloutRequest(trace.key, i, j, trace.problem, p)
            for i, p in enumerate(trace.prefixes[:-1]) for j in range(n)]


def score_trace(trace: Trace, completions: list[str], n: int, check: Check) -> tuple[list[float], list[list[bool]]]:
    """Scores per step from the ``(len(steps) - 1) * n`` completions of ``requests_for(trace, n)`` (same order),
    the last step's from ``check(trace.text)``; the hits per step (one, the trace's own, for the last)."""
    hits = [[check(p + completions[i * n + j], trace.problem) for j in range(n)]
            for i, p in enumerate(trace.prefixes[:-1])]
    hits.append([check(trace.text, trace.problem)])
    return [sum(h) / len(h) for h in hits], hits


def label_traces(traces: list[Trace], completer: Completer, *, n: int, check: Check = answer_check,
                 batch_size: int = 64, done: dict[str, dict[str, Any]] | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Roll out every step of every trace; returns ``{key: record}`` with ``scores`` and the rollouts.

    Traces are sent to ``completer`` in groups of about ``batch_size`` requests (one call per group, the
    speed of batched generation). ``done`` holds records of an earlier, interrupted run: those traces are
    not rolled out again. ``on_record`` receives each new record as soon as its group finishes (the store's
    append), so an interruption loses at most one group.
    """
    out = dict(done or {})
    todo = [t for t in traces if t.key not in out]
    if on_progress and len(todo) < len(traces):
        on_progress(len(traces) - len(todo))
    for group in _groups(todo, n, batch_size):
        requests = [r for t in group for r in requests_for(t, n)]
        completions = completer(requests) if requests else []  # a group of one-step traces needs no rollout
        if len(completions) != len(requests):
            raise RuntimeError(f"completer returned {len(completions)} continuations for {len(requests)} prefixes")
        pos = 0
        for t in group:
            m = (len(t.steps) - 1) * n
            scores, hits = score_trace(t, completions[pos : pos + m], n, check)
            rec = {"problem_id": t.key, "source_problem": t.problem.id, "agent": t.agent, "round": t.round,
                   "steps": [s.text for s in t.steps], "scores": scores, "hits": hits,
                   "rollouts": [completions[pos + i * n : pos + (i + 1) * n] for i in range(len(t.steps) - 1)] + [[]]}
            pos += m
            out[t.key] = rec
            if on_record:
                on_record(rec)
        if on_progress:
            on_progress(len(group))
    return out


def _groups(traces: list[Trace], n: int, batch_size: int) -> Iterator[list[Trace]]:
    group: list[Trace] = []
    size = 0
    for t in traces:
        cost = (len(t.steps) - 1) * n
        if group and size + cost > batch_size:
            yield group
            group, size = [], 0
        group.append(t)
        size += cost
    if group:
        yield group


# ------------------------------------------------------------------------------------- from debates


def debate_signals(traj: Trajectory, turn: Turn, steps: list[Step], target: str) -> list[str]:
    """Per step, what the debate did to it (see the module docstring)."""
    if turn.round >= len(traj.rounds) - 1:
        return ["final"] * len(steps)
    nxt = next((t for t in traj.rounds[turn.round + 1] if t.agent == turn.agent), None)
    if nxt is None:
        return ["final"] * len(steps)
    later = _norm(nxt.response)
    fixed = not is_correct(turn, traj, target) and is_correct(nxt, traj, target)
    return ["kept" if _norm(s.text) in later else ("corrected" if fixed else "revised") for s in steps]


def traces_from(traj: Trajectory, *, target: str, rule: str, pattern: str | None, per_problem: int,
                max_steps: int, stats: dict[str, Any]) -> list[Trace]:
    """The traces of one trajectory to label: corrected wrong answers first (they carry the debate's
    signal), then the last round's answers; identical texts once; at most ``per_problem``.

    Updates ``stats``: ``no_steps`` (keys whose step rule found nothing), ``too_many_steps``, ``no_target``.
    """
    goal = traj.final_answer if target == "consensus" else traj.gold
    if not goal:
        stats["no_target"].append(traj.problem_id)
        return []
    meta = {"choices": traj.meta["choices"]} if "choices" in traj.meta else {}
    problem = Problem(traj.problem_id, traj.question, str(goal), meta=meta)
    corrected = [w for r in range(1, len(traj.rounds)) for w in traj.rounds[r - 1]
                 if not is_correct(w, traj, target)
                 and any(t.agent == w.agent and is_correct(t, traj, target) for t in traj.rounds[r])]
    traces, seen = [], set()
    for turn in [*corrected, *traj.rounds[-1]]:
        key = _norm(turn.response)
        if key in seen or len(traces) >= per_problem:
            continue
        seen.add(key)
        tkey = f"{traj.problem_id}/{turn.agent}/r{turn.round}"
        steps = split_steps(turn.response, rule, pattern)
        if not steps:
            stats["no_steps"].append(tkey)
            continue
        if len(steps) > max_steps:
            stats["too_many_steps"].append(tkey)
            continue
        traces.append(Trace(tkey, problem, turn.response, steps, turn.agent, turn.round,
                            debate_signals(traj, turn, steps, target)))
    return traces


def process_rows(traces: Iterable[Trace], records: dict[str, dict[str, Any]], threshold: float,
                 prompt_template: str, monotone: bool = False) -> list[dict[str, Any]]:
    """Stepwise-supervision rows: ``{prompt, completions, labels, scores, problem_id, agent, round, debate}``."""
    rows = []
    for t in traces:
        scores = [float(s) for s in records[t.key]["scores"]]
        rows.append({"prompt": prompt_template.replace("{question}", t.problem.question),
                     "completions": [s.text for s in t.steps], "labels": hard_labels(scores, threshold, monotone),
                     "scores": scores, "problem_id": t.problem.id, "agent": t.agent, "round": t.round,
                     "debate": list(t.debate)})
    return rows


# ------------------------------------------------------------------------------------- formats


def math_shepherd(row: dict[str, Any], tag: str = SHEPHERD_TAG) -> dict[str, str]:
    """Math-Shepherd's text format: ``input`` has ``tag`` after each step, ``label`` has ``+`` / ``-`` there."""
    def body(marks: list[str]) -> str:
        lines = []
        for i, (step, mark) in enumerate(zip(row["completions"], marks, strict=True)):
            head = "" if step.lower().startswith("step ") else f"Step {i + 1}: "
            lines.append(f"{head}{step} {mark}")
        return f"{row['prompt']} " + "\n".join(lines)

    return {"input": body([tag] * len(row["completions"])),
            "label": body(["+" if ok else "-" for ok in row["labels"]]), "problem_id": row["problem_id"]}


_STEP_HEAD = re.compile(r"^Step \d+:\s*")


def read_math_shepherd(row: dict[str, Any], tag: str = SHEPHERD_TAG, where: str = "row") -> dict[str, Any]:
    """A Math-Shepherd row (``input``: the question, then steps each ending with ``tag``; ``label``: the same text
    with ``+`` / ``-`` in place of each tag) as a stepwise one ``{prompt, completions, labels}``.

    The question is the text before the last ``Step 1:`` ahead of the first tag; each step is trimmed and loses its
    ``Step k:`` heading (format, as ``math_shepherd`` writes it). So ``read_math_shepherd(math_shepherd(row))``
    gives back the row's prompt, steps and labels (a step that began with its own ``Step k:`` loses it).
    Raises PluribusError naming ``where`` when the row is not in that format.
    """
    text, marked = row.get("input"), row.get("label")
    if not isinstance(text, str) or not isinstance(marked, str):
        raise PluribusError(f"{where}: Math-Shepherd's input and label must be text")
    pieces = text.split(tag)
    if len(pieces) < 2:
        raise PluribusError(f"{where}: no step tag {tag!r} in its input; set build.shepherd_tag to the tag it uses")
    if pieces[-1].strip():
        raise PluribusError(f"{where}: text after the last step tag {tag!r} ({pieces[-1].strip()[:40]!r}); every "
                            "step must end with the tag")
    labels, pos = [], 0
    for k, piece in enumerate(pieces[:-1]):
        mark = marked[pos + len(piece) : pos + len(piece) + 1]
        if marked[pos : pos + len(piece)] != piece or mark not in ("+", "-") or not mark:
            raise PluribusError(f"{where}: its label does not mark step {k + 1} with + or - where the input has "
                                f"the tag {tag!r} (the label must be the input with each tag replaced by + or -)")
        labels.append(mark == "+")
        pos += len(piece) + 1
    if marked[pos:] != pieces[-1]:
        raise PluribusError(f"{where}: its label differs from its input after the last step")
    head = pieces[0].rfind("Step 1:")
    if head < 0:
        raise PluribusError(f"{where}: no 'Step 1:' before the first step tag, so the question cannot be told from "
                            "the first step")
    steps = [pieces[0][head:], *pieces[1:-1]]
    return {"prompt": pieces[0][:head].strip(), "completions": [_STEP_HEAD.sub("", s.strip(), count=1) for s in steps],
            "labels": labels}


def tokenize_stepwise(prompt: str, completions: list[str], labels: list[bool], tokenizer: Any,
                      separator: str = "\n", train_on_last_step_only: bool = False) -> dict[str, list[int]]:
    """Tokenize one stepwise-supervision example the way axolotl's ``stepwise_supervised`` and TRL's PRM
    trainer (<0.29) did: each step tokenized alone, ``separator`` appended, the step's label on the last token of
    step + separator and -100 everywhere else (prompt included; a BOS token first when the tokenizer has one).

    Returns ``input_ids``, ``labels`` and ``step_ends`` (the index of each step's last token).
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sep = tokenizer.encode(separator, add_special_tokens=False)
    if not sep:
        raise ValueError(f"separator {separator!r} tokenizes to nothing")
    marks = [int(x) for x in labels]
    if train_on_last_step_only:
        marks = [-100] * (len(marks) - 1) + marks[-1:]
    out_labels = [-100] * len(ids)
    if tokenizer.bos_token_id is not None:
        ids, out_labels = [tokenizer.bos_token_id, *ids], [-100, *out_labels]
    ends = []
    for step, mark in zip(completions, marks, strict=True):
        piece = tokenizer(step, add_special_tokens=False)["input_ids"] + sep
        ids += piece
        out_labels += [-100] * (len(piece) - 1) + [mark]
        ends.append(len(ids) - 1)
    return {"input_ids": ids, "labels": out_labels, "step_ends": ends}
