"""`--no-progress` on every command that can draw a bar, and the GGUF dequantization's bar (pluribus.gguf): drawn
on a terminal, none with `--no-progress`. (The training bar: tests/distill/test_no_progress.py; the merge's:
tests/merge/test_progress.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

# every command whose stage draws a bar: the debate's, eval's, rollouts', training's, merging's, a GGUF's
BAR_COMMANDS = [["run"], ["debate"], ["selfsamples"], ["build"], ["train"], ["merge"], ["eval"], ["models", "resolve"]]


@pytest.mark.parametrize("command", BAR_COMMANDS, ids=" ".join)
def test_every_command_that_draws_a_bar_offers_no_progress(command: list[str]) -> None:
    import re

    from typer.testing import CliRunner

    from pluribus.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"--no-progress +No progress bars\.", result.output), result.output


def test_models_resolve_takes_no_progress(tiny_llama_dir: Path) -> None:
    from typer.testing import CliRunner

    from pluribus.cli import app

    result = CliRunner().invoke(app, ["models", "resolve", str(tiny_llama_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tiny_llama_dir)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_gguf_readers_bar_follows_enabled(terminal_stderr, enabled: bool) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from pluribus.gguf import _rich_gguf_bar

    screen = terminal_stderr()
    with _rich_gguf_bar(enabled):
        assert list(gguf_utils.tqdm(range(3), desc="Converting")) == [0, 1, 2]  # the reader's own call
    assert ("dequantizing the GGUF model" in screen.getvalue()) is enabled, screen.getvalue()


@pytest.mark.slow
@pytest.mark.integration
def test_resolving_the_embedded_model_without_progress_draws_no_bar(terminal_stderr, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pluribus.models import EMBEDDED, resolve_model

    monkeypatch.setenv("PLURIBUS_CACHE", str(tmp_path))  # a first dequantization, not the cached folder
    screen = terminal_stderr()
    folder = resolve_model(EMBEDDED, progress=False)
    assert folder.is_relative_to(tmp_path) and (folder / "config.json").is_file()
    assert "dequantizing" not in screen.getvalue(), screen.getvalue()
