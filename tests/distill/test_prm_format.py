"""What a PRM learned to read (prompt template, step rule, separator) is recorded once and used wherever it scores."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from pluribus.config import BuildConfig, Recipe
from pluribus.data.builders import build
from pluribus.data.builders.steps import StepFormat
from pluribus.distill.data import load_rows
from pluribus.distill.prm import (
    encode_steps,
    load_prm,
    prepare_examples,
    score_solutions,
    train_prm,
    training_step_format,
)
from pluribus.errors import PluribusError
from tests.data.test_builders import Scripted, make_run, sample_trajs
from tests.distill.conftest import read_record, synthetic_problems, write_parquet

TEMPLATE = "Q: {question}\nAnswer in steps."
FORMAT = StepFormat(TEMPLATE, "lines", None, " ;; ")


def prm_recipe(tmp_path: Path, student_dir: Path, build: dict | None = None, **train) -> Recipe:
    base = {"objective": "prm", "model": str(student_dir), "kernels": "off", "max_steps": 2, "batch_size": 4,
            "logging_steps": 1, "save_steps": 10, "eval_fraction": 0.0, "report_to": ["none"],
            "lora": {"r": 4}, "lr": 1e-2, "warmup_ratio": 0.0}
    return Recipe(name="t", root=str(tmp_path / "runs"), train={**base, **train},
                  **({"build": build} if build is not None else {}))


def formatted_dataset(folder: Path, fmt: StepFormat = FORMAT) -> Path:
    """A process dataset as the builder writes it: rows with the template's prompt, stats.json with the format."""
    rows = []
    for i, p in enumerate(synthetic_problems(12)):
        wrong = i % 2 == 1
        steps = [p["steps"][0], p["steps"][1].replace("=", "= 1 +") if wrong else p["steps"][1], p["steps"][2]]
        rows.append({"prompt": fmt.prompt(p["question"]), "completions": steps, "labels": [True, not wrong, not wrong],
                     "scores": [1.0, 0.0 if wrong else 1.0, 0.0 if wrong else 1.0], "problem_id": p["id"],
                     "question": p["question"]})
    write_parquet(rows, folder)
    (folder / "stats.json").write_text(json.dumps({"kind": "process", "step_format": fmt.to_dict()}))
    return folder


def test_build_step_separator_reaches_the_dataset_and_the_prm_input(tmp_path, student_dir) -> None:
    from transformers import AutoTokenizer

    # issue 26 item 5: " ;; " used to write byte-identical data and PRM inputs
    tok = AutoTokenizer.from_pretrained(student_dir)
    inputs = {}
    for name, sep in (("newline", "\n"), ("semicolons", " ;; ")):
        run = make_run(tmp_path / name, sample_trajs())
        cfg = BuildConfig(kinds=["process"], step_separator=sep)
        folder = build(cfg, [run], completer=Scripted(), progress=False)[0].path
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["step_format"]["step_separator"] == sep and stats["step_format"]["step_rule"] == "lines"
        assert f"followed by `{json.dumps(sep)}` (`build.step_separator`)" in (folder / "README.md").read_text()
        rows = load_rows(folder, "process")
        r = prm_recipe(tmp_path, student_dir, build={"kinds": ["process"], "step_separator": sep})
        fmt, source = training_step_format(folder, rows, r)
        assert (fmt.step_separator, source) == (sep, "dataset")
        ex = prepare_examples(rows, tok, r.train, fmt.step_separator)[0][0]
        inputs[name] = ex["input_ids"]
        ends = [i for i, y in enumerate(ex["labels"]) if y != -100]
        assert all(tok.decode(ex["input_ids"][: e + 1]).endswith(sep) for e in ends)  # read at the separator's end
    assert inputs["newline"] != inputs["semicolons"]


def test_a_recipe_that_disagrees_with_the_dataset_is_refused(tmp_path, student_dir) -> None:
    folder = formatted_dataset(tmp_path / "process")
    rows = load_rows(folder, "process")
    with pytest.raises(PluribusError, match=r"built with step_separator ' ;; ', but the recipe's build.step_separator"):
        training_step_format(folder, rows, prm_recipe(tmp_path, student_dir, build={"prompt_template": TEMPLATE}))
    with pytest.raises(PluribusError, match=r"built with prompt_template 'Q: \{question\}\\nAnswer in steps.', but "
                                            r"the recipe's question prompt"):
        training_step_format(folder, rows, prm_recipe(tmp_path, student_dir, build={"step_separator": " ;; "}))
    # without a build section the dataset's record is the truth
    assert training_step_format(folder, rows, prm_recipe(tmp_path, student_dir)) == (FORMAT, "dataset")


def test_a_dataset_without_a_record_takes_the_recipe_prompt_only_when_its_rows_are_that_prompt(
        tmp_path, student_dir) -> None:
    folder = formatted_dataset(tmp_path / "process")
    (folder / "stats.json").unlink()  # a user's file, or a build from before the record
    rows = load_rows(folder, "process")
    fmt, source = training_step_format(folder, rows, prm_recipe(tmp_path, student_dir, build={
        "prompt_template": TEMPLATE, "step_separator": " ;; "}))
    assert (fmt, source) == (FORMAT, "recipe")
    fmt, source = training_step_format(folder, rows, prm_recipe(tmp_path, student_dir))  # default prompt: no match
    assert (fmt.prompt_template, fmt.step_separator, source) == ("{question}", "\n", "rows")


def test_score_cli_asks_the_prm_what_it_learned(tmp_path, student_dir, caplog) -> None:
    from typer.testing import CliRunner

    from pluribus.cli import app

    # issue 26 item 6: the CLI passed the raw question and joined steps by newlines; now it builds training's input
    folder = formatted_dataset(tmp_path / "process")
    out = train_prm(prm_recipe(tmp_path, student_dir), dataset=folder)
    record = read_record(out)
    assert record["step_format"] == FORMAT.to_dict() and record["data"]["step_format_from"] == "dataset"
    row = load_rows(folder, "process")[1]
    prm = load_prm(out)
    assert prm.step_format == FORMAT
    # training's input of this row, exactly as prepare_examples built it, through the loaded PRM
    ex = prepare_examples([row], prm.tokenizer, prm_recipe(tmp_path, student_dir).train, " ;; ")[0][0]
    ends = [i for i, y in enumerate(ex["labels"]) if y != -100]
    with torch.no_grad():
        logits = prm.model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :, 0].float()
    trained = torch.sigmoid(logits[ends]).tolist()
    result = CliRunner().invoke(app, ["score", str(out), "--question", row["question"],
                                      "--solution", "\n".join(row["completions"]), "--json"])
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout.strip().splitlines()[-1])
    assert [c["step"] for c in cli] == row["completions"]
    assert [c["score"] for c in cli] == pytest.approx(trained, abs=1e-5)
    # the one scoring function gives the same from the question, and from the rendered prompt
    assert score_solutions(prm, [row["question"]], ["\n".join(row["completions"])])[0] == pytest.approx(trained, abs=1e-5)
    assert score_solutions(prm, [row["prompt"]], ["\n".join(row["completions"])], rendered=True)[0] == \
        pytest.approx(trained, abs=1e-5)
    # the raw question as the prompt (what the CLI did) is another input, with other scores
    ids, pos = encode_steps(prm.tokenizer, row["question"], row["completions"], "\n")
    assert ids != ex["input_ids"]

    # a PRM trained before the record held its format: its recipe's prompt and the newline it always used, said
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    old = read_record(legacy)
    del old["step_format"]
    old["recipe"]["build"] = {"prompt_template": TEMPLATE}
    (legacy / "training_record.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="pluribus.distill"):
        assert load_prm(legacy).step_format == StepFormat(TEMPLATE, "lines", None, "\n")
    assert "before its record held its step format" in caplog.text


def test_score_cli_splits_by_the_prms_step_rule(tmp_path, student_dir) -> None:
    from typer.testing import CliRunner

    from pluribus.cli import app

    fmt = StepFormat("{question}", "regex", r"(?m)^Step \d+:.*$", "\n")
    folder = formatted_dataset(tmp_path / "process", fmt)
    out = train_prm(prm_recipe(tmp_path, student_dir, max_steps=1), dataset=folder)
    result = CliRunner().invoke(app, ["score", str(out), "--question", "2+2?", "--json",
                                      "--solution", "Step 1: 2 + 2 = 4\nso\nStep 2: the answer is 4"])
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.stdout.strip().splitlines()[-1])] == [
        "Step 1: 2 + 2 = 4", "Step 2: the answer is 4"]
    result = CliRunner().invoke(app, ["score", str(out), "--question", "2+2?", "--solution", "4"])
    assert isinstance(result.exception, PluribusError) and "no step under the PRM's step rule 'regex'" in str(
        result.exception)  # main() prints it as one line, exit 2


def test_a_step_without_a_token_is_refused(student_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    with pytest.raises(PluribusError, match=r"step 1 \(' '\) with the separator '' is empty"):
        encode_steps(tok, "q", ["a", " "], "")
