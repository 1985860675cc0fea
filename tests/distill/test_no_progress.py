"""`--no-progress` reaches the trainers: `pluribus run` and `pluribus train` draw the training bar only without it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

# the training bar's final line, as rich leaves it in a log: "train ━━━━━ 1/1 0:00:00 loss=..."
TRAIN_BAR = re.compile(r"\btrain +━+ +\d+/\d+")


def _recipe(tmp_path: Path, student_dir: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "np", "root": str(tmp_path / "runs"), "train": {
        "model": str(student_dir), "kernels": "off", "max_steps": 1, "logging_steps": 1, "eval_fraction": 0,
        "report_to": ["none"], "batch_size": 2, "lora": {"r": 2}}}))
    return recipe


@pytest.mark.parametrize("command", ["run", "train"])
def test_no_progress_leaves_out_the_training_bar_and_its_absence_draws_it(tmp_path, student_dir, rsft_dir, command):
    from typer.testing import CliRunner

    from pluribus.cli import app

    recipe = _recipe(tmp_path, student_dir)
    if command == "run":  # the train step reads the run's own datasets
        shutil.copytree(rsft_dir, tmp_path / "runs" / "np" / "datasets" / "rsft")
    args = [command, str(recipe)] + (["--dataset", str(rsft_dir)] if command == "train" else [])
    quiet = CliRunner().invoke(app, [*args, "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    assert "train_loss" in quiet.output or "train:rsft" in quiet.output, quiet.output  # it trained
    assert not TRAIN_BAR.search(quiet.output), quiet.output
    shown = CliRunner().invoke(app, [*args, "--overwrite"] if command == "train" else [*args, "--force"])
    assert shown.exit_code == 0, shown.output
    assert TRAIN_BAR.search(shown.output), shown.output
