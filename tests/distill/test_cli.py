"""`pluribus train` end to end on a tiny model, and the shipped accelerate configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.distill.conftest import read_record

ROOT = Path(__file__).resolve().parents[2]


def test_train_cli_runs_a_stage_into_the_run_folder(tmp_path, student_dir, rsft_dir):
    from typer.testing import CliRunner

    from pluribus.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "cli", "root": str(tmp_path / "runs"), "train": {
        "model": str(student_dir), "kernels": "off", "max_steps": 1, "eval_fraction": 0, "report_to": ["none"],
        "lora": {"r": 2}}}))
    result = CliRunner().invoke(app, ["train", str(recipe), "train.batch_size=2", "--objective", "rsft",
                                      "--dataset", str(rsft_dir)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "cli" / "adapters" / "rsft"
    assert read_record(out)["recipe"]["train"]["batch_size"] == 2
    assert "train_loss" in result.output


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith("FSDP" if name == "fsdp" else "DEEPSPEED")
    assert config.mixed_precision == "bf16"
