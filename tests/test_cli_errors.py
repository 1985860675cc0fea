"""The CLI's last line of defence: unusable paths and unreadable files give one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, cwd=cwd)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_an_output_folder_under_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("name: x\n")
    line = _one_line(_cli("run", "q.yaml", f"root={tmp_path / 'q.yaml'}", "build.k=2", cwd=tmp_path))
    assert line.startswith("error: cannot create '") and "q.yaml/x" in line and "Not a directory" in line


def test_score_with_a_missing_or_binary_solution_file(tmp_path: Path) -> None:
    line = _one_line(_cli("score", "prm", "--question", "q", "--solution", "@nonexist.txt", cwd=tmp_path))
    assert "solution file 'nonexist.txt' does not exist" in line
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    line = _one_line(_cli("score", "prm", "--question", "q", "--solution", "@bin.txt", cwd=tmp_path))
    assert "solution file 'bin.txt' is not UTF-8 text" in line


def test_export_of_a_file_and_config_of_a_folder_say_what_they_expected(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("name: x\n")
    assert "is a file, expected a model or adapter folder" in _one_line(
        _cli("export", "q.yaml", "-o", "out", cwd=tmp_path))
    assert "is a folder, expected a recipe file" in _one_line(_cli("config", str(tmp_path), cwd=tmp_path))
