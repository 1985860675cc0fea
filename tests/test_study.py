"""The main job's shape: several experts (one chained from another), their merge, and every eval system, from one
recipe on the embedded model; a rerun after changing one expert retrains that expert and what depends on it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pluribus.config import load_recipe
from pluribus.data.prompts import fill
from pluribus.run import run_recipe

PROMPT = "{question} Answer with \\boxed{N}."


def _recipe(tmp_path: Path, *overrides: str):
    agent = "{model: smollm2-135m, sampling: {temperature: 0.7, max_new_tokens: 24}}"
    return load_recipe(None, [
        "name=study", f"root={tmp_path}", "seed=0",
        "task.source=synthetic", "task.synthetic.level=quickstart", "task.n=6", "task.heldout_fraction=0.3",
        f"team.agents=[{agent}, {agent}]", "team.rounds=2", f"team.prompts.question='{PROMPT}'",
        "build.kinds=[rsft, process]", "build.target=consensus", "build.rollouts_per_step=2",
        "build.traces_per_problem=1", "build.self_samples=2",
        "train.max_steps=1", "train.batch_size=2", "train.eval_fraction=0.0", "train.report_to=[none]",
        "train.kernels=off", "train.lora.r=2", "train.save_steps=1000",
        "train.experts=[{objective: rsft}, {name: self-rsft, objective: rsft, data: self}, {objective: prm}, "
        "{objective: rl, init_adapter: rsft, rl: {group_size: 2, prompts_per_step: 1, max_new_tokens: 8}}]",
        "merge.experts=[rsft, rl]", "merge.name=ta",
        "eval.n=3", "eval.team_n=2", "eval.max_new_tokens=16", "eval.sc_max_samples=4",
        *overrides,
    ])


@pytest.mark.integration
@pytest.mark.slow
def test_study_recipe_end_to_end_and_a_rerun_retrains_only_what_changed(tmp_path: Path, smollm2_dir: Path) -> None:
    recipe = _recipe(tmp_path)
    results = run_recipe(recipe, progress=False)
    assert [r.stage for r in results] == ["debate", "self", "build", "train:rsft", "train:self-rsft", "train:prm",
                                          "train:rl", "merge:ta", "eval"]
    run = tmp_path / "study"
    # the user turn of a built row is exactly what the agents were asked
    questions = {json.loads(line)["problem_id"]: json.loads(line)["question"]
                 for f in (run / "trajectories").glob("shard-*.jsonl") for line in f.read_text().splitlines()}
    rows = pq.read_table(next((run / "datasets" / "rsft" / "data").glob("*.parquet"))).to_pylist()
    assert rows and all(r["messages"][0] == {"role": "user", "content": fill(PROMPT, question=questions[r["problem_id"]])}
                        for r in rows)
    # the single-agent baseline trained on the model's own samples, no more rows than the team's data
    team_rows = json.loads((run / "datasets" / "rsft" / "stats.json").read_text())["counts"]["rows"]
    self_stats = json.loads((run / "self" / "datasets" / "rsft" / "stats.json").read_text())["counts"]
    assert self_stats["rows to match"] == team_rows and self_stats["rows"] <= team_rows
    record = json.loads((run / "adapters" / "rl" / "training_record.json").read_text())
    assert record["recipe"]["train"]["init_adapter"] == str(run / "adapters" / "rsft")
    assert record["data"]["prm"] == str(run / "adapters" / "prm")
    assert (run / "merged" / "ta" / "adapter_model.safetensors").is_file()

    payload = json.loads((run / "eval" / "results.json").read_text())
    main = payload["tasks"][0]
    # the run's PRM also chooses among sc's samples (prm-bon) and the team's answers (team-prm)
    assert list(main["systems"]) == ["single-greedy", "sc", "team", "prm-bon", "team-prm", "rsft-greedy",
                                     "self-rsft-greedy", "rl-greedy", "ta-greedy"]
    assert main["problems"] == 3 and main["team_problems"] == 2
    assert main["systems"]["team"]["problems"] == 2 and main["systems"]["sc"]["problems"] == 2
    assert main["systems"]["rsft-greedy"]["problems"] == 3
    # sc spends the team's tokens: on each problem at least the team's, or every sample it drew
    sc = main["systems"]["sc"]
    assert 1 <= sc["mean_samples_used"] <= sc["samples_drawn"] <= 4
    assert set(main["team_gain"]["systems"]) == {"sc", "prm-bon", "team-prm", "rsft-greedy", "self-rsft-greedy",
                                                 "rl-greedy", "ta-greedy"}
    assert {c["system"] for c in main["comparisons"]} == set(main["systems"]) - {"single-greedy"}
    assert main["debate_rounds"]["team"]["early_stop"] and (run / "eval" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    report = (run / "eval" / "report.md").read_text()
    assert "share of the team's gain" in report
    assert payload["next_generation"] and "This run is one generation" in report  # how to go on: generations

    # one expert's settings change: it retrains, and so does what depends on it (the merge), nothing else
    changed = _recipe(tmp_path, "train.experts.3.lr=1e-4")
    again = {r.stage: r.status for r in run_recipe(changed, progress=False)}
    assert again == {"debate": "ran", "self": "ran", "build": "skipped", "train:rsft": "skipped",
                     "train:self-rsft": "skipped", "train:prm": "skipped", "train:rl": "ran", "merge:ta": "ran",
                     "eval": "ran"}
