"""Step segmentation: spans, rules, GSM8K gold solutions split into their own lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pluribus.data.builders.steps import compile_step_regex, prefix_bounds, split_steps
from pluribus.errors import PluribusError

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"


def gsm8k_solutions(limit: int | None = None) -> list[tuple[str, str, str]]:
    """(question, solution before '####', gold answer) from the shared GSM8K train file."""
    out = []
    with GSM8K.open() as f:
        for line in f:
            d = json.loads(line)
            sol, _, ans = d["answer"].rpartition("####")
            out.append((d["question"], sol.rstrip("\n"), ans.strip()))
            if limit and len(out) >= limit:
                break
    return out


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K file not present")
def test_gsm8k_lines_are_the_solutions_own_lines() -> None:
    sols = gsm8k_solutions()
    assert len(sols) > 7000
    for _, sol, _ in sols:
        steps = split_steps(sol, "lines")
        assert [s.text for s in steps] == [line for line in sol.split("\n") if line.strip()]
        assert all(sol[s.start : s.end] == s.text for s in steps)


def test_spans_and_prefixes() -> None:
    text = "  First step.\n\nSecond = 2\n  third line  \n"
    steps = split_steps(text, "lines")
    assert [s.text for s in steps] == ["First step.", "Second = 2", "third line"]
    for s in steps:
        assert text[s.start : s.end] == s.text
    bounds = prefix_bounds(text, steps)
    assert text[: bounds[0]] == "  First step.\n\n"
    assert text[: bounds[1]] == "  First step.\n\nSecond = 2\n  "
    assert text[: bounds[2]] == "  First step.\n\nSecond = 2\n  third line"


def test_paragraphs_sentences_regex() -> None:
    text = "We add 2 and 3.5 to get 5.5. Then double it!\nSo 11.\n\nThe answer is 11."
    assert [s.text for s in split_steps(text, "paragraphs")] == [
        "We add 2 and 3.5 to get 5.5. Then double it!\nSo 11.", "The answer is 11."]
    assert [s.text for s in split_steps(text, "sentences")] == [
        "We add 2 and 3.5 to get 5.5.", "Then double it!", "So 11.", "The answer is 11."]
    text2 = "Intro\nStep 1: a = 1\nnoise\nStep 2: b = 2\nDone"
    steps = split_steps(text2, "regex", r"(?m)^Step \d+:.*$")
    assert [s.text for s in steps] == ["Step 1: a = 1", "Step 2: b = 2"]
    assert split_steps("no steps here", "regex", r"(?m)^Step \d+:.*$") == []


def test_no_steps_and_bad_rules() -> None:
    assert split_steps("", "lines") == []
    assert split_steps(" \n\t\n", "paragraphs") == []
    with pytest.raises(PluribusError, match="unknown step rule 'words'"):
        split_steps("a", "words")
    with pytest.raises(PluribusError, match="needs build.step_regex"):
        compile_step_regex(None)
    with pytest.raises(PluribusError, match="not a valid regular expression"):
        compile_step_regex("(")


@given(st.text(alphabet=st.sampled_from(list("ab .!?\n\t")), max_size=60),
       st.sampled_from(["lines", "paragraphs", "sentences"]))
def test_steps_are_trimmed_ordered_spans(text: str, rule: str) -> None:
    steps = split_steps(text, rule)
    last = 0
    for s in steps:
        assert s.text and s.text == s.text.strip() and text[s.start : s.end] == s.text
        assert s.start >= last
        last = s.end
    bounds = prefix_bounds(text, steps)
    assert bounds == sorted(bounds) and all(text[: b].endswith(s.text) or text[: b].rstrip().endswith(s.text)
                                            for b, s in zip(bounds, steps, strict=True))
