"""What a log shows: stage tables whole when written to a file or a pipe, and paths in one form."""

from __future__ import annotations

import io
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from rich.console import Console

from pluribus.config import load_recipe
from pluribus.data.builders.datasets import Built
from pluribus.eval.scoring import compare, outcomes, score
from pluribus.io import shown_path
from pluribus.stages import build, eval
from tests.view_run import trajectories


def _log(summary) -> str:
    """The summary as `pluribus run ... > log` writes it: rich on a file that is not a terminal, 80 columns."""
    out = Console(file=io.StringIO(), width=80)
    assert not out.is_terminal
    summary.print(out, out)
    return out.file.getvalue()


def test_eval_table_in_a_log_keeps_every_name_and_figure_whole(tmp_path: Path) -> None:
    labels = ["single-greedy", "self-rsft-greedy", "augmented-greedy", "merged-greedy", "team"]
    records = {label: [t.to_dict() for t in trajectories(40, ["a"], 1, seed=i)] for i, label in enumerate(labels)}
    systems = {label: asdict(score(recs, label.split("-")[0], "greedy")) for label, recs in records.items()}
    comparisons = compare({k: outcomes(v) for k, v in records.items()})
    task = {"name": "heldout", "task": "synthetic:word1", "split": "heldout", "problems": 40, "systems": systems,
            "comparisons": comparisons}
    recipe = load_recipe(None, ["name=q", f"root={tmp_path}"])
    summary = eval.summary_of(recipe, {**task, "tasks": [task]})
    text = _log(summary)
    assert "…" not in text, text
    for row in summary.rows:
        for cell in row:
            assert cell in text, (cell, text)
    assert any("(" in row[3] and len(row[3]) > 10 for row in summary.rows)  # "+w/-l (p)" cells were cut before


def test_build_table_prints_every_path_relative_to_the_working_directory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stats = {"counts": {"problems with rows": 3}}
    team = [Built("rsft", (tmp_path / "runs" / "q" / "datasets" / "rsft").resolve(), 5, stats)]  # as the build resolves it
    mine = [Built("rsft", Path("runs/q/self/datasets/rsft"), 5, stats)]  # as the layout spells it
    summary = build.summary_of(team, mine)
    assert [row[3] for row in summary.rows] == ["runs/q/datasets/rsft", "runs/q/self/datasets/rsft"]
    assert shown_path("/elsewhere/x") == "/elsewhere/x"  # outside the working directory: absolute
    assert shown_path(tmp_path.parent / "other") == os.path.abspath(tmp_path.parent / "other")
    text = _log(summary)
    assert "runs/q/datasets/rsft" in text and "runs/q/self/datasets/rsft" in text


def test_pip_install_sees_an_spdx_license() -> None:
    """`pip install -e .` warned that `project.license` as a TOML table is deprecated (builds fail from 2027-02-18);
    the SPDX string needs setuptools>=77, which the build system then asks for."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["build-system"]["requires"] == ["setuptools>=77"]
