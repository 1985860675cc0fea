"""Training on broken input: one clear PluribusError before any output, never a NaN adapter or a silent overwrite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pluribus.config import Recipe
from pluribus.distill.output import checkpoints_dir
from pluribus.distill.prm import load_prm
from pluribus.errors import PluribusError
from pluribus.stages.train import train_stage
from tests.broken import lora_adapter, nan_copy, truncated_copy


def recipe(tmp_path: Path, model: Path, **train) -> Recipe:
    base = {"model": str(model), "kernels": "off", "max_steps": 2, "batch_size": 4, "logging_steps": 1,
            "save_steps": 2, "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4}}
    return Recipe(name="t", root=str(tmp_path / "runs"), train={**base, **train})


def _bare(student_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(student_dir / name, dst / name)
    return dst


@pytest.mark.parametrize(("kind", "message"), [
    ("nan", r"NaN/Inf value\(s\) in tensor '.+' \(.*model\.safetensors\)"),
    ("truncated", "model weights .* are corrupt or truncated"),
    ("no-tokenizer", "has no tokenizer files"),
])
def test_broken_student_is_refused_before_training(tmp_path, student_dir, rsft_dir, kind, message):
    if kind == "nan":
        model = nan_copy(student_dir, tmp_path / kind)
    elif kind == "truncated":
        model = truncated_copy(student_dir, tmp_path / kind, keep=2000)
    else:
        model = _bare(student_dir, tmp_path / kind)
    out = tmp_path / "adapter"
    with pytest.raises(PluribusError, match=message):
        train_stage(recipe(tmp_path, model), dataset=rsft_dir, out=out)
    assert not out.exists() and not checkpoints_dir(out).exists()


def test_corrupt_dataset_files_are_named(tmp_path, student_dir, rsft_dir):
    parquet = next(rsft_dir.glob("*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:500])
    with pytest.raises(PluribusError, match=f"dataset file '{parquet}' is corrupt or truncated"):
        train_stage(recipe(tmp_path, student_dir), dataset=rsft_dir, out=tmp_path / "a")
    jsonl = tmp_path / "jsonl" / "train.jsonl"
    jsonl.parent.mkdir()
    row = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "problem_id": "p"}
    jsonl.write_text(json.dumps(row) + "\n{garbage\n")
    with pytest.raises(PluribusError, match=f"dataset file '{jsonl}' is corrupt .*line 2 is not valid JSON"):
        train_stage(recipe(tmp_path, student_dir), dataset=jsonl.parent, out=tmp_path / "b")


def test_diverging_training_saves_nothing_and_names_the_step(tmp_path, student_dir, rsft_dir):
    out = tmp_path / "adapter"
    r = recipe(tmp_path, student_dir, lr=1e38, max_steps=4, warmup_ratio=0.0, scheduler="constant", bf16=False)
    with pytest.raises(PluribusError, match=r"training diverged: .* at step \d+; no adapter was saved\. Lower train\.lr"):
        train_stage(r, dataset=rsft_dir, out=out)
    assert not out.exists()
    for ckpt in checkpoints_dir(out).glob("checkpoint-*"):  # a checkpoint kept to resume from is finite
        assert all(t.isfinite().all() for t in load_file(ckpt / "adapter_model.safetensors").values())


def test_an_existing_adapter_is_replaced_only_with_overwrite(tmp_path, student_dir, rsft_dir):
    out = tmp_path / "adapter"
    train_stage(recipe(tmp_path, student_dir, max_steps=1), dataset=rsft_dir, out=out)
    first = (out / "training_record.json").read_text()
    with pytest.raises(PluribusError, match="already exists; pass --overwrite"):
        train_stage(recipe(tmp_path, student_dir, max_steps=1), dataset=rsft_dir, out=out)
    assert (out / "training_record.json").read_text() == first
    train_stage(recipe(tmp_path, student_dir, max_steps=1), dataset=rsft_dir, out=out, overwrite=True)
    assert (out / "training_record.json").read_text() != first


def test_score_names_what_a_non_prm_adapter_is(tmp_path, student_dir):
    with pytest.raises(PluribusError, match="is a LORA adapter of task type none, not a PRM .* not made by `pluribus train"):
        load_prm(lora_adapter(student_dir, tmp_path / "adapter"))


def test_resume_without_a_checkpoint_is_refused_before_the_model_and_creates_nothing(tmp_path, rsft_dir):
    out = tmp_path / "adapter"
    # the student does not exist: the resume error comes first, so no model was loaded
    with pytest.raises(PluribusError, match="--resume: no checkpoint under '.*adapter.checkpoints'"):
        train_stage(recipe(tmp_path, tmp_path / "no-model"), dataset=rsft_dir, out=out, resume=True)
    assert not out.exists() and not checkpoints_dir(out).exists()


def test_resume_from_a_checkpoint_with_a_misshapen_config_is_named(tmp_path, student_dir, rsft_dir):
    ckpt = lora_adapter(student_dir, tmp_path / "adapter.checkpoints" / "checkpoint-2")
    (ckpt / "adapter_config.json").write_text(json.dumps([1, 2]))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 4}))
    with pytest.raises(PluribusError, match="adapter config '.*checkpoint-2/adapter_config.json' is not a JSON object"):
        train_stage(recipe(tmp_path, tmp_path / "no-model"), dataset=rsft_dir, out=tmp_path / "adapter", resume=True)


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path, student_dir, rsft_dir, caplog):
    out = tmp_path / "adapter"
    r = recipe(tmp_path, student_dir, max_steps=2, save_steps=1)
    train_stage(r, dataset=rsft_dir, out=out)
    # killed while checkpoint-2 was written, before the adapter: checkpoint-2 has no trainer_state.json yet
    ckpts = checkpoints_dir(out)
    (ckpts / "checkpoint-2" / "trainer_state.json").unlink()
    shutil.rmtree(out)
    partial = ckpts / "checkpoint-3"
    partial.mkdir()  # and a later one that got no further than its folder
    with pytest.raises(PluribusError, match="'.*checkpoint-3' is not an adapter checkpoint"):
        train_stage(r, dataset=rsft_dir, out=out, resume=str(partial))
    with pytest.raises(PluribusError, match="checkpoint '.*checkpoint-2' is incomplete \\(no trainer_state.json"):
        train_stage(r, dataset=rsft_dir, out=out, resume=str(ckpts / "checkpoint-2"))
    with caplog.at_level("WARNING", logger="pluribus.distill"):
        train_stage(r, dataset=rsft_dir, out=out, resume=True)
    assert "skipping '" in caplog.text and "checkpoint-3" in caplog.text and "checkpoint-2" in caplog.text
    state = json.loads((ckpts / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and len(state["log_history"]) > 1  # step 2 trained again, after step 1
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_of_a_finished_training_is_refused_and_keeps_the_adapter(tmp_path, student_dir, rsft_dir):
    out = tmp_path / "adapter"
    train_stage(recipe(tmp_path, student_dir, max_steps=2), dataset=rsft_dir, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PluribusError, match="training already finished at step 2 .*nothing to resume"):
        train_stage(recipe(tmp_path, student_dir, max_steps=2), dataset=rsft_dir, out=out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
