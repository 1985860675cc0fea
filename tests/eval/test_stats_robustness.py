"""Eval statistics (closed forms and known values) and the answer-preserving perturbations."""

from __future__ import annotations

import re

import pytest

from pluribus.data.records import Problem
from pluribus.eval.robustness import PERTURBATIONS, original_id, perturb
from pluribus.eval.stats import mcnemar_exact, paired, wilson_interval


def test_wilson_interval_known_values_and_edges() -> None:
    # 8 of 10 at 95%: the textbook value (0.490, 0.943)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 27)
    assert low == 0.0 and 0.1 < high < 0.15  # never below 0, unlike the normal approximation
    low, high = wilson_interval(27, 27)
    assert high == 1.0 and 0.85 < low < 0.9
    # narrows as n grows at the same accuracy
    assert (lambda a, b: b - a)(*wilson_interval(300, 400)) < (lambda a, b: b - a)(*wilson_interval(30, 40))


def test_mcnemar_exact_matches_the_binomial_tails() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)  # both one-sided tails of Binomial(6, 1/2)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_paired_counts_only_shared_problems() -> None:
    a = {"p1": True, "p2": True, "p3": False, "p4": True}
    b = {"p1": False, "p2": True, "p3": True, "p5": False}
    assert paired(a, b) == (1, 1, 3)


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_keep_numbers_and_answer_and_are_seeded_by_id(kind: str) -> None:
    q = ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
         "How much did she earn?")
    p = Problem(id="gsm8k-7", question=q, answer="10", source="gsm8k")
    out = perturb(p, kind)
    assert out.id == "gsm8k-7~" + kind and out.answer == "10" and out.meta["original_id"] == "gsm8k-7"
    assert out.question != q and out.question.endswith("How much did she earn?")
    assert perturb(p, kind) == out  # the same for every system
    nums = re.findall(r"\d+", out.question)
    if kind == "typos":
        assert nums == ["12", "50"] and len(out.question) == len(q)
        assert sorted(out.question) == sorted(q)  # letters only moved
    else:
        assert nums[:2] == ["12", "50"] and len(nums) == 3  # one extra number, in a sentence before the question
    other = perturb(Problem(id="gsm8k-8", question=q, answer="10"), kind)
    assert other.question != out.question or kind == "typos"


def test_perturbing_a_one_sentence_question_and_an_unknown_kind() -> None:
    out = perturb(Problem(id="s1", question="What is 5 + 3?", answer="8"), "distractor")
    assert out.question.endswith("What is 5 + 3?") and len(re.findall(r"\d+", out.question)) == 3
    assert perturb(Problem(id="s1", question="What is 5 + 3?", answer="8"), "typos").question != "What is 5 + 3?"
    with pytest.raises(ValueError, match="unknown perturbation 'paraphrase'"):
        perturb(Problem(id="s1", question="q", answer="1"), "paraphrase")


def test_original_id_strips_only_a_known_perturbation() -> None:
    assert original_id(perturb(Problem(id="a~b", question="What is 5 + 3?", answer="8"), "typos").id) == "a~b"
    assert original_id("a~b") == "a~b" and original_id("gsm8k-1") == "gsm8k-1"
