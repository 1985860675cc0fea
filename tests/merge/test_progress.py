"""A merge's bar: drawn on a terminal, and not with `--no-progress` (``progress=False``: `pluribus run`'s merge
steps and `pluribus merge` pass it)."""

from __future__ import annotations

import pytest

from pluribus.config import load_recipe
from pluribus.stages import merge


@pytest.mark.parametrize("progress", [True, False])
def test_the_merge_steps_bar_follows_progress(make_adapter, tmp_path, terminal_stderr, progress):
    inputs = ", ".join(f"{{path: '{make_adapter(2, 4, ['q_proj'], seed=s)}'}}" for s in (1, 2))
    recipe = load_recipe(None, [f"root={tmp_path}", "name=m", f"merge.spec={{method: linear, inputs: [{inputs}]}}"])
    (step,) = merge.plan(recipe)  # the merge step of `pluribus run` (--no-progress: progress False)
    screen = terminal_stderr()
    step.run(progress, False)
    assert (recipe.layout.merged("merged") / "adapter_model.safetensors").is_file()
    assert ("merging modules" in screen.getvalue()) is progress, screen.getvalue()


def test_merge_cli_takes_no_progress(make_adapter, tmp_path):
    from typer.testing import CliRunner

    from pluribus.cli import app

    paths = [str(make_adapter(2, 4, ["q_proj"], seed=s)) for s in (3, 4)]
    result = CliRunner().invoke(app, ["merge", "--method", "linear", "--adapters", ",".join(paths), "-o",
                                      str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
