"""Process reward model: step-end targets, training, reload, scoring API/CLI, metrics in closed form."""

from __future__ import annotations

import json

import pytest
import torch

from pluribus.config import Recipe
from pluribus.distill.prm import (
    IGNORE,
    auroc,
    encode_steps,
    load_prm,
    prepare_examples,
    prm_metrics,
    score_steps,
    step_metrics,
    train_prm,
)
from pluribus.errors import PluribusError
from tests.distill.conftest import read_record


def recipe(tmp_path, student_dir, **train) -> Recipe:
    base = {"objective": "prm", "model": str(student_dir), "kernels": "off", "max_steps": 3, "batch_size": 4,
            "logging_steps": 1, "save_steps": 10, "eval_steps": 2, "eval_fraction": 0.25, "report_to": ["none"],
            "lora": {"r": 4}, "lr": 1e-2, "warmup_ratio": 0.0}
    return Recipe(name="t", root=str(tmp_path / "runs"), train={**base, **train})


def test_labels_sit_on_each_steps_last_token_only(student_dir, process_dir):
    from transformers import AutoTokenizer

    from pluribus.distill.data import load_rows

    tok = AutoTokenizer.from_pretrained(student_dir)
    rows = load_rows(process_dir, "process")
    ids, positions = encode_steps(tok, rows[1]["prompt"], rows[1]["completions"])
    assert len(positions) == 3 and positions[-1] == len(ids) - 1
    assert all(tok.decode([ids[p]]).endswith("\n") for p in positions)
    for kind, expected in (("hard", [1.0, 0.0, 0.0]), ("soft", [1.0, 0.2, 0.1])):
        examples, counts = prepare_examples(rows.select([1]), tok, Recipe(train={"prm": {"labels": kind}}).train)
        labels = examples[0]["labels"]
        assert [labels[p] for p in positions] == pytest.approx(expected)
        assert sum(x != IGNORE for x in labels) == 3 and counts["steps"] == 3


def test_train_prm_records_heldout_step_metrics_and_reloads(tmp_path, student_dir, process_dir):
    out = train_prm(recipe(tmp_path, student_dir), dataset=process_dir)
    record = read_record(out)
    for key in ("eval_loss", "eval_step_accuracy", "eval_step_f1", "eval_step_auroc"):
        assert key in record["metrics"], key
    assert 0.0 <= record["metrics"]["eval_step_auroc"] <= 1.0
    quality = record["prm_metrics"]  # the key eval's report reads
    assert {"auroc", "f1", "first_error_accuracy", "n_steps", "n_rows", "threshold"} <= set(quality)
    assert (quality["n_rows"], quality["n_steps"], quality["threshold"]) == (record["data"]["eval_rows"], 18, 0.5)
    assert quality["auroc"] == record["metrics"]["eval_step_auroc"]
    from pluribus.stages.train import prm_quality

    line = prm_quality(quality)
    assert f"PRM on 6 held-out rows (18 steps): step AUROC {quality['auroc']:.3f}" in line and "> 0.5" in line
    # the adapter's card and its export's say what it is (a token classifier), how to score with it, how good it is
    from huggingface_hub import metadata_load

    from pluribus.hub import export_folder

    for folder in (out, export_folder(out, tmp_path / "export")):
        text = (folder / "README.md").read_text()
        assert metadata_load(folder / "README.md")["pipeline_tag"] == "token-classification"
        assert "## Scoring steps" in text and "score_solutions(prm," in text
        assert f"| step AUROC | {quality['auroc']:.3f} |" in text
    prm = load_prm(out)
    items = [("What is (1 + 2) * 3?", ["1 + 2 = 3.", "3 * 3 = 9.", "The answer is 9."]), ("2+2?", ["4"])]
    scores = score_steps(prm, items, batch_size=1)
    assert [len(s) for s in scores] == [3, 1] and all(0.0 < x < 1.0 for s in scores for x in s)
    # batched (padded) scoring equals one-by-one scoring
    batched = score_steps(prm, items, batch_size=2)
    torch.testing.assert_close(torch.tensor(batched[0]), torch.tensor(scores[0]), rtol=1e-2, atol=1e-2)


def test_soft_labels_train(tmp_path, student_dir, process_dir):
    # with the fused kernels on (torch twins on the CPU): the patched blocks serve a token-classification model too
    out = train_prm(recipe(tmp_path, student_dir, prm={"labels": "soft"}, max_steps=1, kernels="torch"),
                    dataset=process_dir)
    assert read_record(out)["recipe"]["train"]["prm"]["labels"] == "soft"


def test_score_cli(tmp_path, student_dir, process_dir):
    from typer.testing import CliRunner

    from pluribus.cli import app

    out = train_prm(recipe(tmp_path, student_dir, max_steps=1, eval_fraction=0.0), dataset=process_dir)
    result = CliRunner().invoke(app, ["score", str(out), "--question", "What is 2 + 2?",
                                      "--solution", "2 + 2 = 4.\nThe answer is 4.", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in rows] == ["2 + 2 = 4.", "The answer is 4."]


def test_step_metrics_closed_form():
    scores, labels = [0.9, 0.8, 0.3, 0.6, 0.1], [True, True, False, False, True]
    m = step_metrics(scores, labels, threshold=0.5)
    # predictions T T F T F: tp=2 fp=1 fn=1 -> acc 3/5, F1 = 4/6
    assert m["step_accuracy"] == pytest.approx(0.6) and m["step_f1"] == pytest.approx(4 / 6)
    # positives {.9,.8,.1} vs negatives {.3,.6}: wins .9>both, .8>both, .1>none -> 4/6
    assert auroc(scores, labels) == pytest.approx(4 / 6)
    assert auroc([0.5, 0.5], [True, True]) is None


def test_prm_metrics_closed_form():
    scores = [[0.9, 0.4, 0.2], [0.8, 0.7], [0.9, 0.3], [0.6, 0.6, 0.1]]
    labels = [[True, False, False], [True, True], [True, True], [True, False, True]]
    m = prm_metrics(scores, labels, threshold=0.5)
    # first step <= 0.5 vs first wrong step: row 0 1 vs 1 (hit), row 1 none vs none (hit), row 2 1 vs none (miss),
    # row 3 2 vs 1 (miss)
    assert m["first_error_accuracy"] == pytest.approx(0.5)
    assert m["first_error_accuracy_erroneous"] == pytest.approx(0.5) and m["first_error_accuracy_correct"] == 0.5
    assert m["processbench_f1"] == pytest.approx(0.5)
    # steps: predicted right T F F T T T F T T F vs T F F T T T T T F T: tp 5, fp 1, fn 2
    assert m["f1"] == pytest.approx(10 / 13) and m["step_accuracy"] == pytest.approx(7 / 10)
    # 7 right steps vs 3 wrong (.4 .2 .6): wins 3+3+3+3 (.9 .8 .7 .9) + 1 (.3) + 2.5 (.6, one tie) + 0 (.1)
    assert m["auroc"] == pytest.approx(15.5 / 21)
    assert (m["n_steps"], m["n_rows"], m["n_erroneous_rows"], m["threshold"]) == (10, 4, 2, 0.5)
    only_right = prm_metrics([[0.9], [0.2]], [[True], [True]], 0.5)
    assert only_right["auroc"] is None and only_right["first_error_accuracy_erroneous"] is None
    assert only_right["first_error_accuracy"] == 0.5 and only_right["processbench_f1"] is None


def test_split_steps_and_mismatched_rows(student_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pluribus.data.builders.steps import StepFormat

    assert StepFormat().split("a = 1\n\n  b = 2 \n") == ["a = 1", "b = 2"]
    bad = Dataset.from_list([{"prompt": "q", "completions": ["a", "b"], "labels": [True], "scores": [1.0, 0.0],
                              "problem_id": "p"}])
    with pytest.raises(PluribusError, match="2 steps, 1 labels"):
        prepare_examples(bad, AutoTokenizer.from_pretrained(student_dir), Recipe(train={}).train)


def test_load_prm_refuses_a_causal_adapter(tmp_path, student_dir, rsft_dir):
    from pluribus.distill.sft import train_sft

    r = Recipe(name="t", root=str(tmp_path / "runs"), train={
        "model": str(student_dir), "kernels": "off", "max_steps": 1, "eval_fraction": 0, "report_to": ["none"],
        "lora": {"r": 2}})
    with pytest.raises(PluribusError, match="LORA adapter of task type CAUSAL_LM, not a PRM"):
        load_prm(train_sft(r, dataset=rsft_dir))


def test_the_new_score_head_loads_without_a_load_report(student_dir, capfd) -> None:
    from pluribus.distill.student import score_head_model

    model = score_head_model(student_dir)
    out, err = capfd.readouterr()
    assert model.config.num_labels == 1 and "MISSING" not in out + err and "LOAD REPORT" not in out + err
