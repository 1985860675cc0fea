"""`pluribus config --explain`: every field of every recipe section, with its type, default and description."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.config.explain import explain, sections
from pluribus.errors import RecipeError
from tests.test_cli_errors import _cli, _one_line


def test_every_field_of_every_section_has_a_description() -> None:
    docs = sections()
    assert {"recipe", "task", "team", "team.agents", "build", "train", "train.rl", "merge", "eval", "export",
            "generations"} <= {d.path for d in docs}
    missing = [f"{d.path}.{name}" for d in docs for name, info in d.model.model_fields.items()
               if not (info.description or "").strip()]
    assert missing == []


def test_the_reference_shows_each_field_once_per_section() -> None:
    text = explain()
    for doc in sections():
        assert f"\n{doc.path} ({doc.model.__name__})\n" in f"\n{text}"
    train = explain("train")
    assert train.startswith("train (TrainConfig)\n")
    assert "  lr: float = 0.0002\n      Peak learning rate" in train
    # team.agents.sampling is not shown here: train.rl.sampling lists its fields itself
    assert "\ntrain.rl.sampling (SamplingConfig)\n  the fields of" not in train
    assert "\ntrain.rl.sampling (SamplingConfig)\n  the fields of team.agents.sampling, above" in text
    assert "\ntrain.experts (TrainConfig)\n  each entry: a mapping of the fields of train" in train
    assert "\ntrain.lora (LoraSettings)\n" in train and "\nteam (" not in train
    assert "  agents: list[AgentConfig] = [{}]\n" in explain("team")  # one agent of defaults
    assert "  name: str = required\n" in explain("eval.tasks")
    with pytest.raises(RecipeError, match="unknown section 'trian'; the sections are: recipe, task, "):
        explain("trian")


def test_the_cli_explains_a_section_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    proc = _cli("config", "--explain", "team.agents", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("team.agents (AgentConfig)\n") and "  backend: transformers | openai | vllm" in proc.stdout
    line = _one_line(_cli("config", "--explain", "agents", cwd=tmp_path))
    assert "unknown section 'agents'" in line and "team.agents" in line
