"""The GGUF dequantization's bar (pluribus.gguf): drawn on a terminal, none with `--no-progress`."""

from __future__ import annotations

from pathlib import Path

import pytest


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
