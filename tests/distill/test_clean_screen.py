"""What a user sees: `pluribus train` and `pluribus build` on tiny inputs print pluribus's lines only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NOISE = re.compile(r"Warning|warn\(|site-packages|Loading weights|Creating parquet|Generating train split|publisher trust|"
                   r"it/s\]|examples/s\]|\d+%\|")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # as a user's shell has it
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_train_prints_no_library_warnings_or_bars_and_no_cut_line(tmp_path: Path, student_dir: Path,
                                                                  rsft_dir: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "cli", "root": str(tmp_path / "runs"), "train": {
        "model": str(student_dir), "kernels": "off", "max_steps": 2, "logging_steps": 1, "eval_fraction": 0,
        "report_to": ["none"], "batch_size": 2, "lora": {"r": 2}}}))
    proc = _cli("train", str(recipe), "--dataset", str(rsft_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    screen = proc.stdout + proc.stderr
    assert not NOISE.search(screen), screen
    assert "train_loss=" in proc.stdout
    assert f"adapter: {tmp_path / 'runs' / 'cli' / 'adapters' / 'rsft'}\n" in proc.stdout  # not cut over lines
    # the bar's last line is whole: its label is not squeezed to "t…" by the end-of-training summary
    assert not re.search(r"^t… ", screen, re.M) and "train_runtime" not in proc.stderr, screen


def test_build_prints_no_dataset_bars(tmp_path: Path) -> None:
    from tests.data.test_builders import make_run, sample_trajs

    run = make_run(tmp_path / "run", sample_trajs())
    proc = _cli("build", "build.prompt_template=Solve {question}", "--store", str(run), "--kind", "rsft", "--no-progress",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not NOISE.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr


def test_flags_are_shown_as_flags_in_help() -> None:
    proc = _cli("build", "--help", cwd=REPO)
    assert proc.returncode == 0 and "<bool>" not in proc.stdout
    assert re.search(r"^  --overwrite +Replace existing datasets\.$", proc.stdout, re.M), proc.stdout


def test_importing_bitsandbytes_offline_prints_no_kernel_hub_notes(tmp_path: Path) -> None:
    """bitsandbytes asks the `kernels` package for a CPU kernel from the Hub at import; offline, `kernels` logs that
    it skips the publisher trust check, before every training and eval. quiet_libraries keeps it off the screen."""
    code = "import bitsandbytes"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300)
    if "publisher trust" not in plain.stderr:
        pytest.skip("this bitsandbytes / kernels pair prints no publisher-trust note offline")
    quiet = subprocess.run([sys.executable, "-c", f"from pluribus.cli import quiet_libraries; quiet_libraries(); {code}"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "publisher trust" not in quiet.stderr and "kernels-community" not in quiet.stderr, quiet.stderr
