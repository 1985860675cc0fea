"""Trace selection: verified-correct final reasoning, diversity by n-gram overlap, corrective transcripts."""

from __future__ import annotations

from pluribus.config import BuildConfig
from pluribus.data.builders.select import (
    augmented_rows,
    corrective_pairs,
    ngrams,
    rsft_rows,
    select_diverse,
    similarity,
)
from pluribus.data.records import Trajectory, Turn


def turn(agent: str, rnd: int, response: str, answer: str | None, correct: bool | None) -> Turn:
    return Turn(agent, rnd, "m", response, answer, correct, 10, 10, 0.1)


def traj(rounds: list[list[Turn]], gold: str = "12", final: str | None = "12", pid: str = "p1") -> Trajectory:
    return Trajectory(pid, "What is 5+7?", gold, sorted({t.agent for r in rounds for t in r}), rounds, final,
                      final == gold, "majority", {"tokens_in": 1, "tokens_out": 1, "seconds": 1.0}, "run")


def test_similarity_measures_closed_form() -> None:
    a, b = ngrams("one two three four", 2), ngrams("two three four five six", 2)
    # a: {12, 23, 34}; b: {23, 34, 45, 56}; shared 2
    assert similarity(a, b, "jaccard") == 2 / 5
    assert similarity(a, b, "containment") == 2 / 3
    assert similarity(a, a) == 1.0 and similarity(a, frozenset()) == 0.0
    assert ngrams("Hi", 3) == frozenset({("hi",)})


def test_select_diverse_is_farthest_first_and_drops_near_duplicates() -> None:
    texts = ["5 plus 7 is 12 so the answer is 12",
             "5 plus 7 is 12 so the answer is 12 .",       # near duplicate of 0
             "Adding seven to five gives twelve",           # far from 0
             "5 plus 7 is 12 , hence 12"]                   # partly like 0
    assert select_diverse(texts, 2, n=2) == [0, 2]
    assert select_diverse(texts, 4, n=2, max_similarity=0.8) == [0, 2, 3]
    assert select_diverse(texts, 4, n=2, max_similarity=1.0) == [0, 2, 3, 1]
    assert select_diverse([], 3) == []


def test_rsft_keeps_correct_final_round_once() -> None:
    t = traj([[turn("a", 0, "I think 11", "11", False), turn("b", 0, "5+7=12", "12", True)],
              [turn("a", 1, "5+7=12", "12", True), turn("b", 1, " 5+7=12 ", "12", True),
               turn("c", 1, "It is 13", "13", False)]])
    rows = rsft_rows([t], target="gold", prompt_template="Q: {question}")
    assert len(rows) == 1
    assert rows[0]["messages"] == [{"role": "user", "content": "Q: What is 5+7?"},
                                   {"role": "assistant", "content": "5+7=12"}]
    assert (rows[0]["agent"], rows[0]["round"], rows[0]["problem_id"]) == ("a", 1, "p1")


def test_consensus_target_for_tasks_without_gold() -> None:
    t = traj([[turn("a", 0, "x is 4", "4", None), turn("b", 0, "x is 5", "5", None)]], gold="", final="4")
    assert rsft_rows([t], target="gold", prompt_template="{question}") == []
    rows = rsft_rows([t], target="consensus", prompt_template="{question}")
    assert [r["agent"] for r in rows] == ["a"]


def test_augmented_diverse_and_corrective() -> None:
    cfg = BuildConfig()
    t = traj([[turn("a", 0, "5+7 = 11", "11", False), turn("b", 0, "Five and seven make 12", "12", True)],
              [turn("a", 1, "5+7 = 12, the answer is 12", "12", True), turn("b", 1, "Five and seven make 12", "12", True)]])
    assert [(w.agent, w.round, r.round) for w, r in corrective_pairs(t, "gold")] == [("a", 0, 1)]
    rows = augmented_rows([t], target="gold", prompt_template="{question}", k=cfg.k, ngram=cfg.ngram,
                          measure=cfg.similarity, max_similarity=cfg.max_similarity, corrective=True,
                          corrective_template=cfg.corrective_template)
    diverse = [r for r in rows if r["kind"] == "diverse"]
    corrective = [r for r in rows if r["kind"] == "corrective"]
    assert [(r["agent"], r["round"]) for r in diverse] == [("a", 1), ("b", 1)]  # b's identical round-0 text once
    assert len(corrective) == 1
    text = corrective[0]["messages"][1]["content"]
    assert text.startswith("5+7 = 11\n\n") and text.endswith("5+7 = 12, the answer is 12")
    assert "11 is not right" in text
    custom = augmented_rows([t], target="gold", prompt_template="{question}", k=1, ngram=3, measure="jaccard",
                            max_similarity=0.9, corrective=True,
                            corrective_template="{first_attempt} | check | {corrected_answer}")
    assert [r["messages"][1]["content"] for r in custom if r["kind"] == "corrective"] == ["5+7 = 11 | check | 12"]
    assert len([r for r in custom if r["kind"] == "diverse"]) == 1
