"""Every stepwise source a PRM trains from: TRL's format in jsonl/parquet or a Hub dataset id, Math-Shepherd's text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pluribus.data.builders.process import SHEPHERD_TAG, math_shepherd, read_math_shepherd
from pluribus.distill.data import fingerprint, is_hub_id, load_rows
from pluribus.errors import PluribusError

ROWS = [
    {"prompt": "What is 2 + 3 * 4?", "completions": ["3 * 4 = 12", "2 + 12 = 15", "The answer is 15"],
     "labels": [True, False, False]},
    {"prompt": "What is 10 - 4?", "completions": ["10 - 4 = 6", "The answer is 6"], "labels": [True, True]},
]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_id: str, rows: list[dict]) -> None:
    """``repo_id`` in a datasets cache as a Hub download leaves it (``<owner>___<name>/default/0.0.0/<hash>``), with
    the Hub offline: ``load_dataset(repo_id)`` must resolve it there, without network."""
    import datasets
    import huggingface_hub.constants
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "hf-datasets"
    owner, name = repo_id.split("/")
    source = write_jsonl(rows, tmp_path / "hub-source" / "train.jsonl")
    builder = Json(cache_dir=str(cache), dataset_name=name, config_name="default", hash="0123abcd",
                   data_files=DataFilesDict.from_patterns({"train": [str(source)]}))
    builder.download_and_prepare()
    (config,) = (cache / name).iterdir()  # default-<hash of the local file>: a Hub download's is "default"
    (cache / f"{owner}___{name}").mkdir()
    config.rename(cache / f"{owner}___{name}" / "default")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_trl_stepwise_files_load_as_they_are(tmp_path, fmt) -> None:
    from datasets import Dataset

    path = tmp_path / f"steps.{fmt}"
    if fmt == "jsonl":
        write_jsonl(ROWS, path)
    else:
        Dataset.from_list(ROWS).to_parquet(str(path))
    rows = load_rows(path, "process")
    assert [r["completions"] for r in rows] == [r["completions"] for r in ROWS]
    assert rows[0]["labels"] == [True, False, False] and rows[0]["scores"] == [1.0, 0.0, 0.0]
    assert len({r["problem_id"] for r in rows}) == 2


def test_a_hub_dataset_id_loads_through_datasets_offline_from_its_cache(tmp_path, monkeypatch) -> None:
    hub_cache(tmp_path, monkeypatch, "acme/stepwise-mini", ROWS)
    monkeypatch.chdir(tmp_path)  # no folder named acme/ here: the id is a Hub id
    assert is_hub_id("acme/stepwise-mini") and not is_hub_id(tmp_path)
    rows = load_rows("acme/stepwise-mini", "process")
    assert [r["labels"] for r in rows] == [r["labels"] for r in ROWS]
    prints = fingerprint("acme/stepwise-mini")
    assert len(prints) == 1 and next(iter(prints)).startswith("acme/stepwise-mini:")
    with pytest.raises(PluribusError, match="'acme/nothing-here' is not a file or folder here, and loading it as "
                                            "a Hub dataset failed"):
        load_rows("acme/nothing-here", "process")


def test_a_prm_trains_from_a_hub_id_and_records_it(tmp_path, monkeypatch, student_dir) -> None:
    from pluribus.distill.prm import train_prm
    from tests.distill.conftest import read_record
    from tests.distill.test_prm_format import prm_recipe

    hub_cache(tmp_path, monkeypatch, "acme/stepwise-mini", ROWS * 4)
    monkeypatch.chdir(tmp_path)
    out = train_prm(prm_recipe(tmp_path, student_dir, max_steps=1), dataset="acme/stepwise-mini", out=tmp_path / "prm")
    record = read_record(out)
    assert record["dataset"]["path"] == "acme/stepwise-mini" and list(record["dataset"]["files"]) == [
        "acme/stepwise-mini:stepwise-mini-train.arrow"]
    assert record["step_format"]["prompt_template"] == "{question}" and record["data"]["step_format_from"] == "rows"


def test_math_shepherd_text_reads_back_what_pluribus_writes(tmp_path) -> None:
    for row in ROWS:
        written = math_shepherd({**row, "problem_id": "p"})
        assert written["input"].count(SHEPHERD_TAG) == len(row["completions"])
        assert read_math_shepherd(written) == row
    # a folder of Math-Shepherd rows (as the build writes beside the stepwise ones) loads as the same rows
    write_jsonl([math_shepherd({**r, "problem_id": f"p{i}"}) for i, r in enumerate(ROWS)], tmp_path / "ms" / "a.jsonl")
    rows = load_rows(tmp_path / "ms", "process")
    assert [{k: r[k] for k in ("prompt", "completions", "labels")} for r in rows] == ROWS
    assert rows["problem_id"] == ["p0", "p1"]


def test_math_shepherd_original_text() -> None:
    # the published dataset's shape: the question, then "Step k:" steps each ending in the tag; + and - also
    # occur inside the math, only the ones in the tags' places are labels
    text = ("Janet has 3 + 4 apples - how many? Step 1: 3 + 4 = 7 ки\nStep 2: She has 7 - 0 = 7 apples. "
            "The answer is: 7 ки")
    label = ("Janet has 3 + 4 apples - how many? Step 1: 3 + 4 = 7 +\nStep 2: She has 7 - 0 = 7 apples. "
             "The answer is: 7 -")
    assert read_math_shepherd({"input": text, "label": label}) == {
        "prompt": "Janet has 3 + 4 apples - how many?",
        "completions": ["3 + 4 = 7", "She has 7 - 0 = 7 apples. The answer is: 7"], "labels": [True, False]}
    assert read_math_shepherd({"input": text.replace("ки", "<s>"), "label": label}, tag="<s>")["labels"] == [
        True, False]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, "row 1: 2 steps but 1 labels"),
    ({"prompt": "q", "completions": ["a", "b"], "labels": [True, 1]}, "row 1: label 1 is 1, not true/false"),
    ({"prompt": "q", "completions": ["a"], "labels": ["yes"]}, "row 1: label 0 is 'yes', not true/false"),
    ({"prompt": "q", "completions": [], "labels": []}, "row 1: completions must be a non-empty list"),
    ({"input": "q Step 1: a ки\nStep 2: b ки", "label": "q Step 1: a +\nStep 2: b ки"},
     "row 1: its label does not mark step 2 with \\+ or -"),
    ({"input": "q Step 1: a ки\nStep 2: b", "label": "q Step 1: a +\nStep 2: b"}, "row 1: text after the last step"),
    ({"input": "q a ки", "label": "q a +"}, "row 1: no 'Step 1:' before the first step tag"),
])
def test_bad_rows_are_named(tmp_path, row, message) -> None:
    good = ROWS[0] if "prompt" in row else math_shepherd({**ROWS[0], "problem_id": "p"})
    path = write_jsonl([good, row], tmp_path / "bad.jsonl")
    with pytest.raises(PluribusError, match=f"dataset '{path}' {message}"):
        load_rows(path, "process")
