"""Shared fixtures: tiny random Llama / Qwen2 models built from a config in seconds, and the embedded SmolLM2."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never reach a hub: everything they load is built here or embedded in an installed package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a local bf16 safetensors folder (dequantized once, then cached)."""
    from pluribus.models import EMBEDDED, resolve_model

    return resolve_model(EMBEDDED)


def _tiny(model_type: str, out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from tests.tiny import save_tiny, tiny_causal_lm

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_causal_lm(model_type, tokenizer=tok, hidden_size=64, intermediate_size=128,
                           max_position_embeddings=1024, tie_word_embeddings=True)
    return save_tiny(out, model, tok)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template, saved as safetensors."""
    return _tiny("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Qwen2 (hidden 64) with SmolLM2's tokenizer and chat template, saved as safetensors."""
    return _tiny("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), smollm2_dir)


class _Terminal(io.StringIO):
    """A stream that says it is a terminal: where pluribus's transient bars (merge, GGUF) are drawn."""

    def isatty(self) -> bool:
        return True


@pytest.fixture()
def terminal_stderr(monkeypatch: pytest.MonkeyPatch) -> Callable[[], _Terminal]:
    """Call it in the test's body (pytest's capture resets sys.stderr after a fixture's setup): sys.stderr is a
    terminal for the rest of the test, where a live rich bar draws; read what it shows with getvalue()."""
    import sys

    def install() -> _Terminal:
        monkeypatch.setenv("TERM", "xterm")  # rich draws no live bar on a dumb terminal
        for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR", "NO_COLOR"):
            monkeypatch.delenv(name, raising=False)
        screen = _Terminal()
        monkeypatch.setattr(sys, "stderr", screen)
        return screen

    return install
