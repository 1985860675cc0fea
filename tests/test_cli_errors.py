"""The CLI's last line of defence: unusable paths and unreadable files give one line and exit code 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import default_sigint

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: from another folder, `-m pluribus.cli` would import whichever pluribus is installed
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


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


def test_ctrl_c_exits_130_with_the_interrupted_line(tmp_path: Path) -> None:
    """A debate against a server that accepts but never answers is still running when SIGINT arrives."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(120)  # the CLI's imports come first
    port = server.getsockname()[1]
    (tmp_path / "d.yaml").write_text(
        "name: ctrlc\ntask: {source: synthetic, n: 2}\n"
        f"team: {{rounds: 1, agents: [{{model: m, backend: openai, base_url: 'http://127.0.0.1:{port}/v1', "
        "timeout_s: 600, max_retries: 0}]}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pluribus.cli", "debate", "d.yaml", "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENAI_API_KEY": "x"}, preexec_fn=default_sigint)
    try:
        conn, _ = server.accept()  # the debate is now waiting on its first request
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        conn.close()
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 130, err
    assert "interrupted; what was finished is stored" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="procfs, where mkdir says 'no such file', is Linux-only")
def test_a_root_that_cannot_be_made_says_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("name: x\n")
    line = _one_line(_cli("run", "q.yaml", "root=/proc/runs", "build.k=2", cwd=tmp_path))
    assert line == "error: cannot create '/proc/runs': No such file or directory"


def test_an_install_hint_in_an_error_is_printed_as_written(monkeypatch, capsys) -> None:
    # rich reads "[vllm]" as a markup tag: unescaped, the hint would print as pip install 'pluribus'
    import pluribus.config
    from pluribus import cli
    from pluribus.errors import PluribusError

    def refuse(*args, **kwargs):
        raise PluribusError("the vllm backend needs vLLM on a GPU machine: pip install 'pluribus[vllm]'")

    monkeypatch.setattr(pluribus.config, "load_recipe", refuse)
    monkeypatch.setattr(sys, "argv", ["pluribus", "config", "name=x"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: the vllm backend needs vLLM on a GPU machine: pip install 'pluribus[vllm]'")


def test_a_run_summary_with_brackets_is_printed_as_written(tmp_path: Path, monkeypatch) -> None:
    import io

    from rich.console import Console

    from pluribus import run
    from pluribus.config import Recipe
    from pluribus.stages import Stage, StageSummary

    step = Stage("merge:[soup]", lambda p, n: StageSummary("merge:[soup]", tmp_path, "merged [bold] x[/] into 'out[merged]'"))
    monkeypatch.setattr(run, "plan", lambda recipe: [step])
    buf = io.StringIO()
    run.run_recipe(Recipe(root=str(tmp_path)), console=Console(file=buf, width=200))
    assert "merge:[soup]: merged [bold] x[/] into 'out[merged]'" in buf.getvalue()


def test_a_task_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_bytes(b'{"question": "Caf\xe9 has 2 cups", "answer": "2"}\n')
    (tmp_path / "r.yaml").write_text("task:\n  source: jsonl\n  path: t.jsonl\n  heldout_fraction: 0.0\nteam: {}\n")
    line = _one_line(_cli("debate", "r.yaml", cwd=tmp_path))
    assert line == "error: t.jsonl is not UTF-8 text: line 1, byte offset 17 (b'\\xe9'); save it as UTF-8"


def test_a_full_disk_inside_a_library_is_one_line(monkeypatch, capsys) -> None:
    import errno

    import pluribus.config
    from pluribus import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pluribus.config, "load_recipe", full)
    monkeypatch.setattr(sys, "argv", ["pluribus", "config", "name=x"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No space left on device") and "free space" in err and "\n" not in err
