"""Process labelling: Monte-Carlo step scores, hard labels, debate signals, Math-Shepherd and stepwise tokenization."""

from __future__ import annotations

import pytest

from pluribus.data.builders.process import (
    SHEPHERD_TAG,
    RolloutRequest,
    Trace,
    debate_signals,
    hard_labels,
    label_traces,
    math_shepherd,
    process_rows,
    tokenize_stepwise,
)
from pluribus.data.builders.steps import split_steps
from pluribus.data.records import Problem, Trajectory, Turn
from tests.data.test_build_steps import GSM8K, gsm8k_solutions


def gold_completer(solutions: dict[str, str]):
    """Continues a prefix with the rest of the gold solution; a prefix that left the gold path gets nothing."""

    def complete(requests: list[RolloutRequest]) -> list[str]:
        out = []
        for r in requests:
            gold = solutions[r.problem.id]
            out.append(gold[len(r.prefix):] if gold.startswith(r.prefix) else "")
        return out

    return complete


def trace(key: str, problem: Problem, text: str) -> Trace:
    return Trace(key, problem, text, split_steps(text, "lines"))


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K file not present")
def test_gold_continuation_marks_every_gold_step_good() -> None:
    sols = gsm8k_solutions(2000)  # the segmentation test covers all 7473; labelling 2000 keeps this quick
    full = {str(i): f"{sol}\n#### {ans}" for i, (_, sol, ans) in enumerate(sols)}
    traces = [trace(str(i), Problem(str(i), q, ans), full[str(i)]) for i, (q, _, ans) in enumerate(sols)]
    records = label_traces(traces, gold_completer(full), n=1, batch_size=256)
    rows = process_rows(traces, records, threshold=0.0, prompt_template="{question}")
    assert len(rows) == len(sols) == 2000
    for row, t in zip(rows, traces, strict=True):
        assert row["completions"] == [line for line in t.text.split("\n") if line.strip()]
        assert all(row["labels"]) and all(s == 1.0 for s in row["scores"])


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K file not present")
def test_a_wrong_step_and_every_later_step_are_bad() -> None:
    q, sol, ans = gsm8k_solutions(1)[0]  # Natalia: 48/2 = 24 in May; 48+24 = 72 altogether
    gold = f"{sol}\n#### {ans}"
    lines = gold.split("\n")
    wrong = "\n".join([lines[0], "Natalia sold 48+20 = <<48+20=68>>68 clips altogether in April and May.",
                       "#### 68"])
    p = Problem("0", q, ans)
    records = label_traces([trace("w", p, wrong)], gold_completer({"0": gold}), n=2)
    assert records["w"]["scores"] == [1.0, 0.0, 0.0]
    rows = process_rows([trace("w", p, wrong)], records, threshold=0.0, prompt_template="Q: {question}")
    assert rows[0]["labels"] == [True, False, False] and rows[0]["prompt"] == f"Q: {q}"


def test_scores_are_rollout_fractions_and_the_last_step_is_its_own_answer() -> None:
    p = Problem("p", "1+1+1+1?", "4")
    t = trace("t", p, "1+1 = 2\n2+1 = 3\nThe answer is 3+1 = 4")
    replies = iter(["The answer is 4", "The answer is 3", "The answer is 5", "The answer is 3",  # step 0
                    "", "The answer is 4", "", ""])  # step 1
    seen: list[RolloutRequest] = []

    def scripted(requests: list[RolloutRequest]) -> list[str]:
        seen.extend(requests)
        return [next(replies) for _ in requests]

    rec = label_traces([t], scripted, n=4)["t"]
    assert rec["scores"] == [0.25, 0.25, 1.0]
    assert [(r.step, r.sample) for r in seen] == [(i, j) for i in range(2) for j in range(4)]  # none for the last
    assert seen[0].prefix == "1+1 = 2\n" and seen[4].prefix == "1+1 = 2\n2+1 = 3\n"
    assert rec["hits"][-1] == [True] and rec["rollouts"][-1] == []
    assert hard_labels([0.25, 1.0], 0.0) == [True, True]
    assert hard_labels([0.25, 1.0], 0.5) == [False, True]


def test_a_wrong_trace_is_not_rescued_by_a_rollout_that_appends_the_right_answer() -> None:
    # Rolling out the full solution lets the continuation's last answer win: a wrong trace labelled all good.
    p = Problem("p", "What is 2 + 3 + 1?", "6")
    t = trace("t", p, "2 + 3 = 5\n5 + 1 = 7\nThe answer is 7")
    rec = label_traces([t], lambda requests: ["\nThe answer is 6"] * len(requests), n=2)["t"]
    assert rec["scores"] == [1.0, 1.0, 0.0]
    assert process_rows([t], {"t": rec}, 0.0, "{question}")[0]["labels"] == [True, True, False]
    one_step = trace("o", p, "The answer is 6")  # nothing to roll out: graded by its answer, no completer call
    assert label_traces([one_step], lambda requests: [] if not requests else 1 / 0, n=2)["o"]["scores"] == [1.0]


def test_monotone_labels_are_an_option_off_by_default() -> None:
    from pluribus.config import BuildConfig

    assert BuildConfig().monotone_labels is False  # Math-Shepherd labels each step by its own score
    assert hard_labels([1.0, 0.0, 1.0], 0.0) == [True, False, True]
    assert hard_labels([1.0, 0.0, 1.0], 0.0, monotone=True) == [True, False, False]
    p = Problem("p", "q", "3")
    t = trace("t", p, "a\nb\nThe answer is 3")
    rec = {"t": {"scores": [1.0, 0.0, 1.0]}}
    assert process_rows([t], rec, 0.0, "{question}")[0]["labels"] == [True, False, True]
    assert process_rows([t], rec, 0.0, "{question}", monotone=True)[0]["labels"] == [True, False, False]


def test_batches_group_whole_traces_and_resume_skips_done() -> None:
    p = Problem("p", "q", "3")
    traces = [trace(f"t{i}", p, "a\nb\nThe answer is 3") for i in range(5)]  # 3 steps each, 2 rolled out
    calls: list[int] = []

    def count(requests: list[RolloutRequest]) -> list[str]:
        calls.append(len(requests))
        assert len({r.key for r in requests}) * 4 == len(requests)  # whole traces only
        return [""] * len(requests)

    stored: list[dict] = []
    first = label_traces(traces[:2], count, n=2, batch_size=8, on_record=stored.append)
    assert calls == [8] and [r["problem_id"] for r in stored] == ["t0", "t1"]
    calls.clear()
    done = {r["problem_id"]: r for r in stored}
    out = label_traces(traces, count, n=2, batch_size=8, done=done)
    assert calls == [8, 4] and set(out) == {f"t{i}" for i in range(5)}
    assert out["t0"] is first["t0"] or out["t0"] == first["t0"]
    assert out["t4"]["scores"] == [0.0, 0.0, 1.0]  # only the last prefix states the answer


def _turn(agent: str, rnd: int, response: str, correct: bool) -> Turn:
    return Turn(agent, rnd, "m", response, "9" if correct else "7", correct, 1, 1, 0.1)


def test_debate_signals() -> None:
    wrong = "a = 3\nb = 4\nThe answer is 7"
    right = "a = 3\nb = 6\nThe answer is 9"
    traj = Trajectory("p", "q", "9", ["x", "y"],
                      [[_turn("x", 0, wrong, False), _turn("y", 0, right, True)],
                       [_turn("x", 1, right, True), _turn("y", 1, "b = 6\nThe answer is 9", True)]],
                      "9", True, "majority", {}, "run")
    steps = split_steps(wrong, "lines")
    assert debate_signals(traj, traj.rounds[0][0], steps, "gold") == ["kept", "corrected", "corrected"]
    assert debate_signals(traj, traj.rounds[0][1], split_steps(right, "lines"), "gold") == ["revised", "kept", "kept"]
    assert debate_signals(traj, traj.rounds[1][0], split_steps(right, "lines"), "gold") == ["final"] * 3


def test_math_shepherd_format() -> None:
    row = {"prompt": "What is 2+3+4?", "completions": ["2+3 = 5", "Step 2: 5+4 = 10"],
           "labels": [True, False], "problem_id": "p"}
    out = math_shepherd(row)
    assert out["input"] == f"What is 2+3+4? Step 1: 2+3 = 5 {SHEPHERD_TAG}\nStep 2: 5+4 = 10 {SHEPHERD_TAG}"
    assert out["label"] == "What is 2+3+4? Step 1: 2+3 = 5 +\nStep 2: 5+4 = 10 -"
    assert out["input"].count(SHEPHERD_TAG) == len(row["completions"])


def test_stepwise_tokenization_puts_each_label_on_its_steps_last_token(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = "Tom has 3 apples and buys 4 more. How many?"
    steps = ["Tom starts with 3 apples.", "3 + 4 = 7", "#### 7"]
    labels = [True, False, True]
    enc = tokenize_stepwise(prompt, steps, labels, tok, separator="\n")
    ids, lab = enc["input_ids"], enc["labels"]
    assert len(ids) == len(lab)
    marked = [i for i, x in enumerate(lab) if x != -100]
    assert marked == enc["step_ends"] and [lab[i] for i in marked] == [1, 0, 1]
    # independently: the text up to each labelled token ends with that step and its separator
    for i, step in zip(marked, steps, strict=True):
        assert tok.decode(ids[: i + 1]).endswith(step + "\n")
    assert enc["step_ends"][-1] == len(ids) - 1
    last_only = tokenize_stepwise(prompt, steps, labels, tok, train_on_last_step_only=True)["labels"]
    assert [x for x in last_only if x != -100] == [1]


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K file not present")
def test_gold_continuation_on_task_loader_solutions() -> None:
    from pluribus.data.tasks import load_gsm8k

    problems = load_gsm8k(GSM8K)
    traces = [trace(p.id, p, p.solution) for p in problems]
    for p, t in zip(problems, traces, strict=True):
        assert [s.text for s in t.steps] == p.solution.split("\n")
    records = label_traces(traces, gold_completer({p.id: p.solution for p in problems}), n=1, batch_size=512)
    rows = process_rows(traces, records, threshold=0.0, prompt_template="{question}")
    bad = [r["problem_id"] for r in rows if not all(r["labels"])]
    assert bad == []
