"""All three datasets from a small real store: a debate of the embedded SmolLM2, then rollouts with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import load_dataset

from pluribus.config import validate_recipe
from pluribus.data.store import TrajectoryStore
from pluribus.stages.build import build_recipe
from tests.data.test_builders import check_stepwise


@pytest.mark.integration
@pytest.mark.slow
def test_debate_then_build_all_three(tmp_path: Path, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    from pluribus.stages.debate import run_debate

    agent = {"model": str(smollm2_dir), "sampling": {"temperature": 0.7, "max_new_tokens": 64, "seed": 1}}
    recipe = validate_recipe({
        "name": "tiny", "root": str(tmp_path), "seed": 3,
        "task": {"source": "synthetic", "n": 4, "synthetic": {"steps": 1, "digits": 1, "style": "expression"}},
        "team": {"agents": [{**agent, "name": "a"}, {**agent, "name": "b"}], "rounds": 2},
        # consensus: a 135M model is right too rarely for a test to count on gold-correct traces
        "build": {"kinds": ["rsft", "augmented", "process"], "target": "consensus", "rollouts_per_step": 2,
                  "traces_per_problem": 1, "max_steps": 6,
                  "completer": {"model": str(smollm2_dir),
                                "sampling": {"temperature": 0.8, "max_new_tokens": 16, "seed": 5}}},
    })
    run_debate(recipe, progress=False)
    stored = list(TrajectoryStore(recipe.run_dir / "trajectories").iter_records())
    assert len(stored) == 4

    built = {b.kind: b for b in build_recipe(recipe, progress=False)}
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for kind in ("rsft", "augmented", "process"):
        ds = load_dataset(str(recipe.run_dir / "datasets" / kind), split="train")
        assert len(ds) == built[kind].rows > 0
        assert (recipe.run_dir / "datasets" / kind / "README.md").read_text().count(f"`{kind}` dataset") == 1
    proc = load_dataset(str(recipe.run_dir / "datasets" / "process"), split="train")
    assert all(len(r["completions"]) == len(r["labels"]) == len(r["scores"]) == len(r["debate"]) for r in proc)
    assert all(s in (0.0, 0.5, 1.0) for r in proc for s in r["scores"])
    assert check_stepwise(proc, tok) == built["process"].stats["counts"]["steps"]
    rollouts = list(TrajectoryStore(recipe.run_dir / "rollouts").iter_records())
    assert len(rollouts) == len(proc) and all(len(x) == 2 for r in rollouts for x in r["rollouts"][:-1])
    assert all(r["rollouts"][-1] == [] for r in rollouts)  # the last step is graded by the trace's own answer
