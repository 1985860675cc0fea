"""Problem sources: GSM8K, field-mapped tables, multiple choice, the synthetic generator, and the seeded split."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pluribus.config import SyntheticConfig, TaskConfig
from pluribus.data.answers import extract_answer, grade, is_equivalent
from pluribus.data.tasks import (
    GSM8K_ENV,
    LEVELS,
    clean_gsm8k_solution,
    default_gsm8k_path,
    load_gsm8k,
    load_problems,
    load_table,
    split_of,
    synthetic,
    synthetic_problem,
)
from pluribus.errors import PluribusError

SAMPLE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"  # first 40 GSM8K lines (MIT, see GSM8K_LICENSE)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_sample_records() -> None:
    problems = load_gsm8k(SAMPLE)
    assert len(problems) == 40
    p = problems[0]
    assert p.id == "gsm8k-gsm8k_sample-000000"
    assert p.answer == "72" and p.source == "gsm8k"
    assert p.solution == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    for p in problems:
        assert "<<" not in p.solution and p.solution.splitlines()[-1].startswith("#### ")
        assert grade(p.solution, p).correct


def test_clean_gsm8k_solution_commas() -> None:
    solution, answer = clean_gsm8k_solution("He pays 12*100 = $<<12*100=1200>>1,200.\n\n#### 1,200")
    assert (solution, answer) == ("He pays 12*100 = $1,200.\n#### 1,200", "1200")
    with pytest.raises(ValueError):
        clean_gsm8k_solution("no final answer")


def test_gsm8k_ids_use_the_file_stem(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(SAMPLE.read_text())
    assert load_gsm8k(train)[123 % 40].id == "gsm8k-train-000003"
    assert load_gsm8k(tmp_path)[0].id == "gsm8k-train-000000"  # a folder: its train.jsonl


def test_gsm8k_default_path_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GSM8K_ENV, str(SAMPLE))
    assert default_gsm8k_path() == SAMPLE
    assert len(load_problems(TaskConfig(source="gsm8k", heldout_fraction=0.0))) == 40
    monkeypatch.setenv(GSM8K_ENV, str(tmp_path / "nope.jsonl"))
    with pytest.raises(PluribusError, match=GSM8K_ENV):
        default_gsm8k_path()


def test_gsm8k_default_path_repo_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GSM8K_ENV, raising=False)
    try:
        path = default_gsm8k_path()
    except PluribusError as e:  # a clone without ../shared: the error says how to fix it
        assert GSM8K_ENV in str(e) and "task.path" in str(e)
        return
    assert path.parts[-4:] == ("shared", "data", "gsm8k", "train.jsonl")


def test_gsm8k_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(PluribusError, match="does not exist"):
        load_gsm8k(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(PluribusError, match="GSM8K"):
        load_gsm8k(bad)
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(PluribusError, match="line 2 is not valid JSON"):
        load_gsm8k(bad)


def test_gsm8k_hub_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(PluribusError, match="could not load 'openai/gsm8k'.*local file"):
        load_problems(TaskConfig(source="gsm8k", path="openai/gsm8k"))


# ------------------------------------------------------------------------------------------ splits


def test_split_is_seeded_disjoint_and_independent_of_n() -> None:
    task = TaskConfig(source="jsonl", path=str(SAMPLE), heldout_fraction=0.3, seed=3)
    train, held = load_problems(task), load_problems(task.model_copy(update={"split": "heldout"}))
    assert len(train) + len(held) == 40
    assert not {p.question for p in train} & {p.question for p in held}
    assert [p.id for p in load_problems(task.model_copy(update={"n": 5}))] == [p.id for p in train[:5]]
    assert load_problems(task) == train  # deterministic
    other = load_problems(task.model_copy(update={"seed": 4, "split": "heldout"}))
    assert [p.id for p in other] != [p.id for p in held]  # the seed moves the split


def test_split_fraction_and_duplicates() -> None:
    questions = [f"question {i}" for i in range(4000)]
    held = sum(split_of(q, 0, 0.2) == "heldout" for q in questions)
    assert 0.17 < held / len(questions) < 0.23
    assert split_of("What is  1 + 2?", 0, 0.5) == split_of("What is 1 + 2?", 0, 0.5)  # whitespace-insensitive
    assert all(split_of(q, 0, 0.0) == "train" for q in questions[:100])


def test_empty_selection_is_an_error() -> None:
    with pytest.raises(PluribusError, match="no problems"):
        load_problems(TaskConfig(source="jsonl", path=str(SAMPLE), heldout_fraction=0.0, split="heldout"))


# ---------------------------------------------------------------------------------- field mapping


def test_field_mapping_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"uid": f"u{i}", "problem": f"What is {i} + {i}?", "final": f"{2 * i:,}", "work": f"{i}+{i}"} for i in range(600, 640)]
    fields = {"question": "problem", "answer": "final", "id": "uid", "solution": "work"}
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    problems = load_problems(TaskConfig(source="jsonl", path=str(path), fields=fields, heldout_fraction=0.0))
    assert problems[0].id == "mine-u600" and problems[0].question == "What is 600 + 600?"
    assert problems[0].answer == "1200" and problems[0].solution == "600+600" and problems[0].source == "mine"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mine.parquet")
    from_parquet = load_problems(
        TaskConfig(source="parquet", path=str(tmp_path / "mine.parquet"), fields=fields, heldout_fraction=0.0)
    )
    assert from_parquet == problems


def test_default_columns_gsm8k_style_and_solution_only(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"question": "q1", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},  # GSM8K-style answer: split it
            {"problem": "q2", "solution": "So it is $\\boxed{\\frac{1}{2}}$."},  # MATH-style: answer from solution
            {"prompt": "q3", "answer": 7},
        ],
    )
    p1, p2, p3 = load_table(str(path))
    assert (p1.answer, p1.solution) == ("4", "2 + 2 = 4\n#### 4")
    assert p2.answer == "1/2" and is_equivalent("0.5", p2.answer)
    assert p3.answer == "7" and p3.id == "t-000002"


def test_field_mapping_errors(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [{"q": "x", "a": "1"}])
    with pytest.raises(PluribusError, match="no question column.*task.fields.question"):
        load_table(str(path))
    with pytest.raises(PluribusError, match="no column 'quest'"):
        load_table(str(path), {"question": "quest"})
    with pytest.raises(PluribusError, match="unknown key 'qestion'"):
        load_table(str(path), {"qestion": "q"})
    with pytest.raises(PluribusError, match="no answer column"):
        load_table(str(path), {"question": "q"})
    with pytest.raises(PluribusError, match="is not a file"):
        load_problems(TaskConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(PluribusError, match="needs task.path"):
        load_problems(TaskConfig(source="parquet"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(PluribusError, match="not a readable parquet"):
        load_problems(TaskConfig(source="parquet", path=str(tmp_path / "bad.parquet")))


# -------------------------------------------------------------------------------- multiple choice


def test_multiple_choice_formats(tmp_path: Path) -> None:
    rows = [
        {"question": "Capital of France?", "choices": ["Paris", "London", "Rome"], "answer": 0},  # MMLU: index
        {  # ARC: labelled choices and an answerKey
            "question": "Largest planet?",
            "choices": {"text": ["Mars", "Jupiter", "Venus"], "label": ["1", "2", "3"]},
            "answerKey": "2",
        },
        {"question": "2 + 2?", "options": ["3", "4"], "answer": "B"},
        {"question": "Color of the sky?", "choices": ["green", "blue"], "answer": "blue"},
    ]
    problems = load_problems(TaskConfig(source="mc", path=str(_jsonl(tmp_path / "mc.jsonl", rows)), heldout_fraction=0.0))
    assert [p.answer for p in problems] == ["A", "B", "B", "B"]
    assert problems[0].meta["choices"] == ["Paris", "London", "Rome"]
    assert problems[0].question == "Capital of France?\n\nA) Paris\nB) London\nC) Rome"
    assert grade("The answer is (B)", problems[1]).correct
    assert not grade("The answer is a planet", problems[1]).correct


def test_multiple_choice_columns_and_errors(tmp_path: Path) -> None:
    rows = [{"q": "Pick one", "A": "x", "B": "y", "C": "z", "key": "C"}]
    path = _jsonl(tmp_path / "cols.jsonl", rows)
    (p,) = load_table(str(path), {"question": "q", "choices": "A,B,C", "answer": "key"}, multiple_choice=True)
    assert p.meta["choices"] == ["x", "y", "z"] and p.answer == "C"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": "E"}])
    with pytest.raises(PluribusError, match="not a letter, index or text"):
        load_table(str(bad), multiple_choice=True)
    none = _jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": "A"}])
    with pytest.raises(PluribusError, match="no choices column"):
        load_table(str(none), multiple_choice=True)


# -------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("style", ["expression", "word"])
def test_synthetic_steps_match_solution_lines(style: str) -> None:
    cfg = SyntheticConfig(steps=4, min_steps=1, digits=2, ops=["+", "-", "*"], style=style)
    steps_seen = set()
    for p in list(synthetic(cfg, seed=5, limit=200)):
        lines = p.solution.splitlines()
        assert lines[-1] == f"#### {p.answer}"
        assert len(lines) - 1 == p.meta["steps"] == len(p.meta["ops"])
        steps_seen.add(p.meta["steps"])
        # each step line holds "a op x = r", and chaining them reproduces the answer
        value = None
        for line, op in zip(lines[:-1], p.meta["ops"], strict=True):
            a, x, r = (int(v) for v in re.search(rf"(\d+) \{op} (\d+) = (\d+)", line).groups())
            assert value is None or a == value
            assert r == {"+": a + x, "-": a - x, "*": a * x}[op] and r >= 0
            value = r
        assert str(value) == p.answer
        assert extract_answer(p.solution).value == p.answer
    assert steps_seen == {1, 2, 3, 4}


def test_synthetic_is_seeded_and_stable() -> None:
    cfg = SyntheticConfig(level="quickstart")
    a = list(synthetic(cfg, seed=1, limit=30))
    assert a == list(synthetic(cfg, seed=1, limit=30))
    assert [p.question for p in a] != [p.question for p in synthetic(cfg, seed=2, limit=30)]
    assert a[7] == synthetic_problem(SyntheticConfig(**LEVELS["quickstart"]), 1, a[7].meta["index"], level="quickstart")
    assert a[0].id == f"synth-quickstart-1-{a[0].meta['index']}"
    assert len({p.question for p in a}) == 30  # no repeats


def test_synthetic_expression_parenthesizes() -> None:
    cfg = SyntheticConfig(steps=2, digits=1, ops=["*"], first_digits=2, style="expression")
    p = next(synthetic(cfg))
    assert p.question.startswith("What is ") and "(" not in p.question  # * then *: no parens needed
    mixed = [p for p in synthetic(SyntheticConfig(steps=2, ops=["+", "*"], style="expression"), limit=50) if p.meta["ops"] == ["+", "*"]]
    assert mixed and all(p.question.startswith("What is (") for p in mixed)


def test_synthetic_split_and_exhaustion() -> None:
    task = TaskConfig(synthetic=SyntheticConfig(level="add1"), heldout_fraction=0.25, seed=0)
    train = load_problems(task)
    held = load_problems(task.model_copy(update={"split": "heldout"}))
    assert len(train) + len(held) == 81  # every 1-digit addition exactly once, then the stream ends
    assert not {p.question for p in train} & {p.question for p in held}
    assert load_problems(task.model_copy(update={"n": 10})) == train[:10]


def test_asking_a_level_for_more_problems_than_it_has_warns(caplog: pytest.LogCaptureFixture) -> None:
    task = TaskConfig(synthetic=SyntheticConfig(level="add1"), heldout_fraction=0.25, seed=0, n=500)
    with caplog.at_level("WARNING", logger="pluribus.data.tasks"):
        got = load_problems(task)
    assert len(got) < 500 and "task.n=500 but synthetic level 'add1' has only" in caplog.text


def test_levels_exist_and_unknown_level_errors() -> None:
    assert {"add1", "add2x1", "word1", "quickstart"} <= set(LEVELS)
    for name in LEVELS:
        SyntheticConfig(**LEVELS[name])  # every level is a valid config
        assert next(synthetic(SyntheticConfig(level=name))).meta["level"] == name
    with pytest.raises(PluribusError, match="unknown synthetic level 'quick'.*quickstart"):
        load_problems(TaskConfig(synthetic=SyntheticConfig(level="quick")))


def test_custom_config_ids_differ_by_params() -> None:
    a = next(synthetic(SyntheticConfig(steps=2)))
    b = next(synthetic(SyntheticConfig(steps=3)))
    assert a.id.startswith("synth-custom") and a.id != b.id


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    rows = [{"question": f"What is {i} * 2?", "answer": f"{i} * 2 = <<{i}*2={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(12)]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    task = TaskConfig(source="hf", path=str(tmp_path / "ds"), hf_split="test", heldout_fraction=0.0)
    problems = load_problems(task)
    assert [p.answer for p in problems] == [str(2 * i) for i in range(12)]
    assert problems[3].id == "ds-000003" and problems[3].solution == "3 * 2 = 6\n#### 6"


# ------------------------------------------------------------------------------------ broken task files


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"question": "   ", "answer": "3"}, "line 3: question is empty"),
        ({"question": "", "answer": "3"}, "line 3: question is empty"),
        ({"question": None, "answer": "3"}, "line 3: question is null"),
        ({"question": "What is 1 + 2?", "answer": " "}, "line 3: answer is empty"),
        ({"question": "What is 1 + 2?", "answer": None}, "line 3: answer is null"),
        ({"question": "\u200b\u200c\u200d", "answer": "3"}, "line 3: question has only invisible characters "
                                                            "(U+200B U+200C U+200D)"),
        ({"question": " \u2060\ufeff\u00a0\u3000", "answer": "3"}, "line 3: question has only invisible"),
        ({"question": "What is 1 + 2?", "answer": "\u200b"}, "line 3: answer has only invisible characters"),
    ],
)
def test_empty_or_null_questions_and_answers_name_the_line(tmp_path: Path, record: dict, needle: str) -> None:
    # line 2 is blank: the number is the editor's line, not the record's index
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(PluribusError, match=re.escape(f"{path} {needle}")):
        load_table(str(path))


def test_parquet_records_count_from_one(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "What is 2 + 2?", "answer": "4"},
                                         {"question": "What is 1 + 1?", "answer": ""}]), path)
    with pytest.raises(PluribusError, match=re.escape(f"{path} record 2: answer is empty")):
        load_table(str(path), kind="parquet")


def test_a_task_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "What is 2 + 2?", "answer": "4"}).encode() + b"\n")
    (p,) = load_table(str(path))
    assert p.question == "What is 2 + 2?" and p.answer == "4"


def test_a_task_file_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    first = json.dumps({"question": "What is 2 + 2?", "answer": "4"}).encode() + b"\n"
    path.write_bytes(first + b'{"question": "Caf\xe9 has 2 cups", "answer": "2"}\n')
    offset = len(first) + len(b'{"question": "Caf')
    with pytest.raises(PluribusError, match=re.escape(f"{path} is not UTF-8 text: line 2, byte offset {offset}")):
        load_table(str(path))
