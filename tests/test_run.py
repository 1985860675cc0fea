"""`pluribus run`: the whole pipeline from one recipe on the embedded model, and a rerun that skips what is done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pluribus.config import load_recipe
from pluribus.errors import PluribusError
from pluribus.run import run_recipe


@pytest.mark.integration
@pytest.mark.slow
def test_run_recipe_end_to_end_then_resume(tmp_path: Path, smollm2_dir: Path) -> None:
    agent = {"model": "smollm2-135m", "sampling": {"max_new_tokens": 48}}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "pipe", "root": str(tmp_path / "runs"),
        "task": {"source": "synthetic", "n": 4, "heldout_fraction": 0.5, "synthetic": {"level": "quickstart"}},
        "team": {"agents": [agent, {**agent, "name": "second"}], "rounds": 1},
        "build": {"kinds": ["rsft"], "target": "consensus"},
        "train": {"model": "smollm2-135m", "max_steps": 2, "logging_steps": 1, "batch_size": 2, "eval_fraction": 0.0,
                  "report_to": ["none"], "kernels": "off", "lora": {"r": 2}},
        "eval": {"n": 2, "systems": ["single", "distilled"], "max_new_tokens": 32},
        "export": {},
    }))
    recipe = load_recipe(recipe_path)
    results = run_recipe(recipe, progress=False)
    assert [(r.stage, r.status) for r in results] == [
        ("debate", "ran"), ("build", "ran"), ("train:rsft", "ran"), ("eval", "ran"), ("export", "ran")]
    run = tmp_path / "runs" / "pipe"
    assert (run / "recipe.yaml").is_file()
    assert (run / "adapters" / "rsft" / "adapter_model.safetensors").is_file()
    payload = json.loads((run / "eval" / "results.json").read_text())
    assert set(payload["systems"]) == {"single-greedy", "distilled-greedy"}
    card = (run / "export" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "| single-greedy |" in card
    assert "accuracy (greedy decoding)" in card  # the distilled adapter's own result, in model-index
    # `pluribus view` reads what the stages wrote: the debate and each eval system's store, the expert's curve
    from pluribus.view import collect

    page = collect(run)
    assert [s["name"] for s in page["stores"]][0] == "debate" and len(page["stores"][0]["problems"]) == 4
    assert {s["name"].split("/")[1] for s in page["stores"][1:]} == {"single-greedy", "distilled-greedy"}
    assert [e["name"] for e in page["experts"]] == ["rsft"] and len(page["experts"][0]["curves"]["loss"]) == 2
    assert "single-greedy" in page["eval"]["html"] and "data:image/png;base64," in page["eval"]["html"]

    again = run_recipe(recipe, progress=False)
    assert {r.stage: r.status for r in again} == {
        "debate": "ran", "build": "skipped", "train:rsft": "skipped", "eval": "ran", "export": "skipped"}
    # a changed train section reruns training (and what depends on it), not the debate's generation
    changed = load_recipe(recipe_path, ["train.lr=1e-4"])
    third = {r.stage: r.status for r in run_recipe(changed, progress=False)}
    assert third["train:rsft"] == "ran" and third["build"] == "skipped" and third["export"] == "ran"
    # a changed team is refused by the debate's store (the run's recipe.yaml stays), unless --new-run
    saved = (run / "recipe.yaml").read_text()
    other_team = load_recipe(recipe_path, ["train.lr=1e-4", "team.agents.1.sampling.max_new_tokens=16"])
    with pytest.raises(PluribusError, match="--new-run"):
        run_recipe(other_team, progress=False)
    assert (run / "recipe.yaml").read_text() == saved
    fourth = {r.stage: r.status for r in run_recipe(other_team, progress=False, new_run=True)}
    assert fourth["debate"] == "ran" and fourth["eval"] == "ran" and "max_new_tokens: 16" in (run / "recipe.yaml").read_text()


def test_a_recipe_without_stage_sections_has_nothing_to_run(tmp_path: Path) -> None:
    from pluribus.errors import PluribusError

    recipe = load_recipe(None, ["name=only", f"root={tmp_path}"])
    with pytest.raises(PluribusError, match=r"nothing to run: the recipe has no stage sections \(team/build/"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "only").exists()


def test_a_push_without_token_or_with_a_bad_repo_id_fails_before_any_stage(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pluribus.errors import PluribusError

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    recipe = load_recipe(None, ["name=p", f"root={tmp_path}", "export.repo_id=me/model", "export.token_env=MY_TOKEN"])
    with pytest.raises(PluribusError, match="no Hub token: set MY_TOKEN"):
        run_recipe(recipe, progress=False)
    monkeypatch.setenv("MY_TOKEN", "hf_" + "T" * 30)
    with pytest.raises(PluribusError, match="'bad repo!!' is not a valid Hub repo id"):
        run_recipe(recipe.model_copy(update={"export": recipe.export.model_copy(update={"repo_id": "bad repo!!"})}),
                   progress=False)
    assert not (tmp_path / "p").exists()


def test_a_step_is_current_only_while_its_settings_and_the_contents_it_read_are(tmp_path: Path, monkeypatch) -> None:
    """Freshness from fingerprints: an input rewritten outside the recipe (same path, other bytes) or a changed
    setting reruns the step, and run says why; an identical rewrite does not."""
    import io

    from rich.console import Console

    import pluribus
    from pluribus import run
    from pluribus.config import Recipe
    from pluribus.stages import Stage, StageSummary

    data = tmp_path / "data.txt"
    data.write_text("rows v1")
    ran: list[str] = []
    settings = {"lr": 1}

    def train(progress: bool, new_run: bool) -> StageSummary:
        ran.append(data.read_text())
        out = tmp_path / "adapter"
        out.write_text(f"trained on {data.read_text()}")
        return StageSummary("train:x", out, "trained")

    step = Stage("train:x", train, settings=lambda: dict(settings), inputs=lambda: {"dataset": data})
    monkeypatch.setattr(run, "plan", lambda recipe: [step])
    recipe = Recipe(root=str(tmp_path), name="r")

    def go() -> tuple[str, str]:
        buf = io.StringIO()
        status = run.run_recipe(recipe, console=Console(file=buf, width=200))[0].status
        return status, buf.getvalue()

    assert go()[0] == "ran" and ran == ["rows v1"]
    assert go()[0] == "skipped"
    data.write_text("rows v1")  # rewritten with the same contents: still current
    assert go()[0] == "skipped"
    data.write_text("rows v2")  # rebuilt outside the recipe
    status, shown = go()
    assert status == "ran" and ran[-1] == "rows v2" and "runs: dataset changed" in shown
    settings["lr"] = 2
    status, shown = go()
    assert status == "ran" and "runs: its settings changed" in shown
    (tmp_path / "adapter").unlink()
    status, shown = go()
    assert status == "ran" and "runs: its output is missing" in shown
    assert go()[0] == "skipped"
    recipe = Recipe(root=str(tmp_path), name="r", seed=7)  # the seed changes every step's output
    status, shown = go()
    assert status == "ran" and "its settings changed" in shown
    # another version of pluribus may compute the same settings otherwise: what it made is not reused
    monkeypatch.setattr(run, "__version__", "9.9.9")
    status, shown = go()
    assert status == "ran" and f"it ran with pluribus {pluribus.__version__}, this is 9.9.9" in shown
    assert go()[0] == "skipped"
