"""A debate on a broken model or adapter fails with one clear error before its run folder exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pluribus.config import AgentConfig, Recipe, SamplingConfig, TaskConfig, TeamConfig
from pluribus.errors import PluribusError
from pluribus.stages.debate import run_debate
from tests.broken import lora_adapter, nan_copy, other_base, truncated_copy


def _recipe(root: Path, model: Path, adapter: Path | None = None) -> Recipe:
    agent = AgentConfig(model=str(model), adapter=str(adapter) if adapter else None, dtype="float32",
                        sampling=SamplingConfig(max_new_tokens=4))
    return Recipe(name="broken", root=str(root), task=TaskConfig(n=2), team=TeamConfig(agents=[agent], rounds=1))


@pytest.mark.parametrize(("kind", "message"), [
    ("nan", r"NaN/Inf value\(s\) in tensor"),
    ("truncated", "are corrupt or truncated"),
])
def test_broken_model_writes_no_run_folder(tiny_llama_dir: Path, tmp_path: Path, kind: str, message: str) -> None:
    bad = (nan_copy if kind == "nan" else truncated_copy)(tiny_llama_dir, tmp_path / kind)
    with pytest.raises(PluribusError, match=message):
        run_debate(_recipe(tmp_path / "runs", bad), progress=False)
    assert not (tmp_path / "runs").exists()


def test_adapter_of_another_base_writes_no_run_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_llama_dir, tmp_path / "adapter", base=str(other_base(tiny_llama_dir, tmp_path / "o")))
    with pytest.raises(PluribusError, match="was trained on base"):
        run_debate(_recipe(tmp_path / "runs", tiny_llama_dir, adapter), progress=False)
    assert not (tmp_path / "runs").exists()


def test_model_config_that_is_not_an_object_writes_no_run_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bad = shutil.copytree(tiny_llama_dir, tmp_path / "listcfg")
    (bad / "config.json").write_text("[1]")
    with pytest.raises(PluribusError, match=f"model config '{bad / 'config.json'}' is not a JSON object"):
        run_debate(_recipe(tmp_path / "runs", bad), progress=False)
    assert not (tmp_path / "runs").exists()


def test_adapter_config_of_the_wrong_shape_writes_no_run_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_llama_dir, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(PluribusError, match="adapter config .* is not a JSON object"):
        run_debate(_recipe(tmp_path / "runs", tiny_llama_dir, adapter), progress=False)
    assert not (tmp_path / "runs").exists()
