"""The threads setting: resolved once (recipe, CLI, environment, default) and applied before a stage's work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pluribus.config import load_recipe
from pluribus.errors import RecipeError
from pluribus.threads import DEFAULT_CPU_THREADS, apply_threads, resolve_threads


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_resolve_threads_prefers_the_setting_then_the_environment_then_one_on_cpu(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(2) == 2 and resolve_threads(None) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_threads(None) == DEFAULT_CPU_THREADS == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_threads(None) is None  # a GPU machine keeps torch's default


def test_apply_threads_sets_torch(monkeypatch) -> None:
    assert apply_threads(2) == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert apply_threads(None) == 1 and torch.get_num_threads() == 1


def test_the_recipe_field_is_validated() -> None:
    assert load_recipe(None, ["threads=4"]).threads == 4
    assert load_recipe(None, []).threads is None
    with pytest.raises(RecipeError, match="'threads' = 0"):
        load_recipe(None, ["threads=0"])


@pytest.mark.parametrize("command", ["debate", "build", "train", "score", "merge", "eval", "run"])
def test_every_computing_command_takes_threads(command: str) -> None:
    from typer.testing import CliRunner

    from pluribus.cli import app

    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--threads" in out.output


def test_cli_threads_reach_torch_before_the_stage(tmp_path: Path, monkeypatch) -> None:
    import pluribus.stages.train
    from pluribus import cli

    seen = {}

    def stage(recipe, **kwargs):
        seen["threads"], seen["torch"] = recipe.threads, torch.get_num_threads()
        raise SystemExit(0)

    monkeypatch.setattr(pluribus.stages.train, "train_stage", stage)
    (tmp_path / "r.yaml").write_text("train:\n  max_steps: 1\n")
    monkeypatch.setattr(sys, "argv", ["pluribus", "train", str(tmp_path / "r.yaml"), "--threads", "3"])
    torch.set_num_threads(1)
    with pytest.raises(SystemExit):
        cli.main()
    assert seen == {"threads": 3, "torch": 3}


def test_run_debate_applies_the_recipe_threads(tmp_path: Path) -> None:
    from pluribus.config import AgentConfig, Recipe, TaskConfig, TeamConfig
    from pluribus.data.backends import backend_key
    from pluribus.stages.debate import run_debate
    from tests.data.test_debate import ScriptedBackend, problems

    seen = []

    def reply(conv, k):
        seen.append(torch.get_num_threads())
        return "\\boxed{1}"

    be = ScriptedBackend(reply)
    recipe = Recipe(name="r", root=str(tmp_path), threads=2, task=TaskConfig(n=1),
                    team=TeamConfig(agents=[AgentConfig(name="a")], rounds=1))
    torch.set_num_threads(1)
    run_debate(recipe, problems=problems(1), backends={backend_key(recipe.team.agents[0]): be}, progress=False)
    assert seen == [2]
