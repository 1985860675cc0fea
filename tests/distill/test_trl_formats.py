"""Users' own data trains as it is: TRL's conversational, prompt-completion and stepwise-supervision datasets,
without the columns pluribus's builders add (problem_id, agent, round, kind, scores)."""

from __future__ import annotations

import pytest

from pluribus.config import Recipe
from pluribus.distill.data import load_rows, split_eval
from pluribus.distill.sft import train_sft
from tests.distill.conftest import read_record, synthetic_problems, write_parquet


def _chat(p: dict) -> list[dict[str, str]]:
    return [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": "\n".join(p["steps"])}]


def test_a_trl_conversational_dataset_trains_as_it_is(tmp_path, student_dir) -> None:
    problems = synthetic_problems(12)
    data = write_parquet([{"messages": _chat(p)} for p in problems] + [{"messages": _chat(problems[0])}],
                         tmp_path / "trl")
    rows = load_rows(data, "rsft")
    assert len(set(rows["problem_id"])) == 12  # one id per question: the repeated question shares its id
    train, held = split_eval(rows, 0.25, seed=0)
    assert held is not None and not set(train["problem_id"]) & set(held["problem_id"])
    recipe = Recipe(name="t", root=str(tmp_path / "runs"), train={
        "model": str(student_dir), "kernels": "off", "max_steps": 1, "batch_size": 4, "eval_fraction": 0.25,
        "eval_steps": 1, "report_to": ["none"], "lora": {"r": 2}})
    out = train_sft(recipe, dataset=data)
    assert read_record(out)["data"]["eval_rows"] > 0 and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("conversational", [False, True])
def test_a_trl_prompt_completion_dataset_reads_as_chats(tmp_path, conversational: bool) -> None:
    problems = synthetic_problems(3)
    rows = [{"prompt": [m] if conversational else m["content"], "completion": [a] if conversational else a["content"]}
            for m, a in (_chat(p) for p in problems)]
    ds = load_rows(write_parquet(rows, tmp_path / "pc"), "augmented")  # kind is optional too
    assert ds["messages"] == [_chat(p) for p in problems] and "problem_id" in ds.column_names


def test_a_stepwise_dataset_without_scores_or_ids_trains_on_its_labels(tmp_path, student_dir) -> None:
    from transformers import AutoTokenizer

    from pluribus.distill.prm import prepare_examples

    rows = [{"prompt": p["question"], "completions": p["steps"], "labels": [True, i % 2 == 0, i % 2 == 0]}
            for i, p in enumerate(synthetic_problems(4))]
    ds = load_rows(write_parquet(rows, tmp_path / "stepwise"), "process")
    assert ds["scores"] == [[float(x) for x in r["labels"]] for r in rows]
    cfg = Recipe(train={"objective": "prm", "model": str(student_dir)}).train
    examples, counts = prepare_examples(ds, AutoTokenizer.from_pretrained(student_dir), cfg)
    assert counts["steps"] == 12 and len(examples) == 4


def test_trl_prm_trainer_tokenizes_our_process_rows(process_dir, student_dir) -> None:
    """TRL's own stepwise tokenization (PRMTrainer.tokenize_row, in TRL <= 1.13) accepts our rows and labels
    each step where pluribus's builder check does. Skipped where the installed TRL no longer has it."""
    prm = pytest.importorskip("trl.experimental.prm", reason="TRL >= 1.14 removed the PRM trainer")
    from transformers import AutoTokenizer

    from pluribus.data.builders.process import tokenize_stepwise

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    for row in load_rows(process_dir, "process"):
        theirs = prm.PRMTrainer.tokenize_row(row, tokenizer, "\n", max_length=None, max_completion_length=None,
                                             train_on_last_step_only=False, is_eval=False)
        ours = tokenize_stepwise(row["prompt"], row["completions"], row["labels"], tokenizer, separator="\n")
        assert theirs["input_ids"] == ours["input_ids"] and theirs["labels"] == ours["labels"]
