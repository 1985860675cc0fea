"""The distilled system's answers belong to its adapter's contents: retrained, other or moved adapters and run folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pluribus.adapter import adapter_fingerprint
from pluribus.config import load_recipe
from pluribus.stages.eval import run_eval
from tests.broken import lora_adapter


def _recipe(model: Path, root: Path, *extra: str):
    agent = f"{{model: '{model}', dtype: float32, sampling: {{max_new_tokens: 4}}}}"
    return load_recipe(None, [f"root={root}", "name=ev", "task.source=synthetic", "task.n=2",
                              "task.heldout_fraction=0.5", f"team.agents=[{agent}]", "team.rounds=1",
                              "eval.systems=[single, distilled]", "eval.robustness=[typos]", *extra])


def _stored(store: Path) -> dict[str, bytes]:
    """Every shard's bytes: equal before and after a call means the call generated nothing there."""
    return {f.name: f.read_bytes() for f in sorted((store / "trajectories").glob("shard-*.jsonl"))}


@pytest.mark.slow
def test_distilled_answers_follow_the_adapter_contents(tiny_llama_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = lora_adapter(tiny_llama_dir, tmp_path / "first")
    second = lora_adapter(tiny_llama_dir, tmp_path / "second")
    fp1, fp2 = adapter_fingerprint(first), adapter_fingerprint(second)
    assert fp1 != fp2
    trained = root / "ev" / "adapters" / "rsft"  # where the distilled system finds its adapter by default
    shutil.copytree(first, trained)
    recipe = _recipe(tiny_llama_dir, root)
    out = root / "ev" / "eval"

    payload = run_eval(recipe, progress=False)
    assert payload["adapter"] == {"path": str(trained), "fingerprint": fp1}
    assert len(_stored(out / "distilled-greedy" / fp1)["shard-00000.jsonl"].splitlines()) == payload["problems"]
    # the store is keyed by the contents; its recipe names the adapter that answered, where it lay
    kept = yaml.safe_load((out / "distilled-greedy" / fp1 / "recipe.yaml").read_text())
    assert kept["team"]["agents"][0]["adapter"] == str(trained)
    single = _stored(out / "single-greedy")

    # retrained in place: same path, new contents -> fresh answers in the new adapter's store
    for f in second.iterdir():
        shutil.copy(f, trained / f.name)
    payload = run_eval(recipe, progress=False)
    assert payload["adapter"]["fingerprint"] == fp2
    assert json.loads((out / "results.json").read_text()) == payload
    assert fp2 in (out / "report.md").read_text()
    for label in ("distilled-greedy", "distilled-greedy-typos"):
        assert len(_stored(out / label / fp2)["shard-00000.jsonl"].splitlines()) == payload["problems"]
    assert _stored(out / "single-greedy") == single  # the other systems resumed
    answers = _stored(out / "distilled-greedy" / fp2)

    # the same contents at another path, then the first adapter again: both resume their own answers
    again = run_eval(_recipe(tiny_llama_dir, root, f"eval.adapter={second}"), progress=False)
    assert again["systems"] == payload["systems"] and _stored(out / "distilled-greedy" / fp2) == answers
    before = _stored(out / "distilled-greedy" / fp1)
    back = run_eval(_recipe(tiny_llama_dir, root, f"eval.adapter={first}"), progress=False)
    assert back["adapter"]["fingerprint"] == fp1 and _stored(out / "distilled-greedy" / fp1) == before

    # a run folder moved elsewhere resumes every system, the distilled one included
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    out = moved / "ev" / "eval"
    resumed = run_eval(_recipe(tiny_llama_dir, moved), progress=False)
    assert resumed["systems"] == payload["systems"]
    assert _stored(out / "distilled-greedy" / fp2) == answers and _stored(out / "single-greedy") == single
