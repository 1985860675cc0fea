"""train.report_to: every tracker transformers knows, as a list or one name; an unknown name lists the known ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluribus.config import REPORT_TO, load_recipe
from pluribus.errors import RecipeError


def test_the_tracker_list_is_the_installed_transformers_list() -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert sorted(REPORT_TO) == sorted(INTEGRATION_TO_CALLBACK)


@pytest.mark.parametrize(("override", "expected"), [
    ("train.report_to=[mlflow, trackio]", ["mlflow", "trackio"]),
    ("train.report_to=swanlab", ["swanlab"]),
    ("train.report_to=[none]", ["none"]),
    ("train.report_to=all", ["all"]),
])
def test_report_to_accepts_what_transformers_accepts(override: str, expected: list[str]) -> None:
    assert load_recipe(None, [override]).train.report_to == expected


def test_an_unknown_tracker_is_refused_with_the_list(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"train.report_to.*unknown tracker\(s\) \['tensorbord'\].*mlflow.*trackio"):
        load_recipe(None, ["train.report_to=[tensorbord]"])


def test_report_to_reaches_the_training_arguments(tmp_path: Path) -> None:
    from pluribus.distill.loop import training_arguments

    cfg = load_recipe(None, ["train.report_to=[mlflow, none]"]).train
    args = training_arguments(cfg, tmp_path / "ckpt", seed=0, has_eval=False)
    assert args.report_to == ["mlflow"]
