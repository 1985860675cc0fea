"""Recipes: YAML loading, dotted overrides, one-line errors with exit code 2, round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pluribus.config import Recipe, load_recipe, validate_recipe
from pluribus.errors import PluribusError, RecipeError
from pluribus.overrides import apply_overrides

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    recipe = load_recipe(path)
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again) == recipe


def test_overrides_apply_by_dotted_path() -> None:
    r = load_recipe(None, ["train.lr=1e-4", "team.rounds=3", "team.agents=[{model: a}, {model: b}]",
                           "team.agents.1.sampling.temperature=0.7"])
    assert r.train.lr == 1e-4 and r.team.rounds == 3
    assert [a.model for a in r.team.agents] == ["a", "b"]
    assert r.team.agents[1].sampling.temperature == 0.7


def test_round_trip_of_a_full_recipe() -> None:
    r = load_recipe(None, ["task.source=gsm8k", "team.topology=ring", "train.objective=prm", "eval.n=5"])
    assert validate_recipe(r.to_dict()) == r


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=1e-4"], "unknown key 'train.lrr'"),
        (["team.rounds=two"], "'team.rounds' = \"two\""),
        (["team.topology=mesh"], "'team.topology' = \"mesh\" is not allowed; expected one of 'all', 'ring' or 'star'"),
        (["team.rounds=0"], "greater than or equal to 1"),
        (["nme=x"], "unknown key 'nme'"),
    ],
)
def test_errors_name_the_field_the_value_and_what_is_allowed(overrides: list[str], needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_bad_override_syntax_and_missing_file() -> None:
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("team:\n  rounds: [1,\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)


def test_missing_section_is_named() -> None:
    with pytest.raises(RecipeError, match="no 'merge' section"):
        Recipe().require("merge")


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("team:\n  roundz: 2\n")
    proc = subprocess.run([sys.executable, "-m", "pluribus.cli", "config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown key 'team.roundz'" in lines[0]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("team.agents.5.sampling.temperature=0.7", "index 5 is out of range (team.agents has 2 entries)"),
        ("team.agents.x.sampling.temperature=0.7", "'x' is not a list index (team.agents is a list; use 0..1)"),
        ("team.agents.-1.model=m", "index -1 is out of range"),
        ("team.agents.2=m", "index 2 is out of range (team.agents has 2 entries)"),
        ("team.agents.y=m", "'y' is not a list index"),
    ],
)
def test_list_index_overrides_name_the_index_and_the_length(override: str, needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, ["team.agents=[{model: a}, {model: b}]", override])
    assert needle in str(info.value)
    assert load_recipe(None, ["team.agents=[{model: a}, {model: b}]", "team.agents.1.sampling.temperature=0.7"]
                       ).team.agents[1].sampling.temperature == 0.7


def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81team")
    with pytest.raises(RecipeError, match=r"recipe file '.*bin.yaml' is not UTF-8 text \(is it a YAML/JSON file\?\)"):
        load_recipe(binary)
    with pytest.raises(RecipeError, match="is a folder, expected a recipe file"):
        load_recipe(tmp_path)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_config_refuses_a_model_that_does_not_resolve(tmp_path: Path, tiny_llama_dir: Path) -> None:
    proc = _cli("config", str(REPO / "configs" / "quickstart.yaml"), "team.agents.0.model=nosuchmodel-xyz")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "'team.agents.0.model': model 'nosuchmodel-xyz' is not a local folder" in lines[0]
    proc = _cli("config", "train.model=" + str(tmp_path / "gone"))
    assert proc.returncode == 2 and "'train.model'" in proc.stderr
    # a real folder, an alias and a hub id (not downloaded) pass
    proc = _cli("config", str(REPO / "configs" / "quickstart.yaml"), f"team.agents.0.model={tiny_llama_dir}",
                "team.agents.1.model=some-org/some-model")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["name=.."], "'name' = \"..\": must be one folder name"),
        (["name=."], "'name' = \".\": must be one folder name"),
        (["name=a/b"], "'name' = \"a/b\": must be one folder name"),
        (["name=Ärger"], "'name' = \"Ärger\""),  # as typed, not \u00c4
        (["merge.name=.."], "'merge.name' = \"..\": must be one folder name"),
        (["train.max_steps=0"], "'train.max_steps' = 0: must be a positive number of optimizer steps, or -1"),
        (["train.max_steps=-5"], "'train.max_steps' = -5"),
        (["build.kinds=[]"], "'build.kinds' = []: List should have at least 1 item"),
        (["team.agents=[{base_url: notaurl}]"], "'team.agents.0.base_url' = \"notaurl\": not a server URL"),
        (["team.agents=[{base_url: 'http://h:80a/v1'}]"], "not a server URL; expected http(s)://host[:port]/"),
    ],
)
def test_names_that_leave_the_run_root_and_meaningless_values_are_refused(overrides: list[str], needle: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, overrides)
    assert needle in str(info.value)


def test_the_documented_values_next_to_the_refused_ones_still_load() -> None:
    r = load_recipe(None, ["name=run.v2", "train.max_steps=-1", "build.kinds=[rsft, process]",
                           "team.agents=[{base_url: 'http://[::1]:8000/v1'}, {base_url: 'https://api.example.com'}]"])
    assert r.name == "run.v2" and r.train.max_steps == -1 and r.build.kinds == ["rsft", "process"]
    assert load_recipe(None, ["train.max_steps=3"]).train.max_steps == 3


def test_name_dot_dot_leaves_the_users_recipe_alone(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text("name: x\nbuild: {k: 2}\n")
    proc = _cli("run", "recipe.yaml", "name=..", f"root={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2 and "'name' = \"..\"" in proc.stderr, proc.stderr
    assert (tmp_path / "recipe.yaml").read_text() == "name: x\nbuild: {k: 2}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_kernels_off_is_accepted_as_yaml_writes_it(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `off` as false: the documented `train.kernels: off` must still mean off
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  kernels: off\n")
    assert load_recipe(recipe).train.kernels == "off"
    assert load_recipe(None, ["train.kernels=off"]).train.kernels == "off"
    assert load_recipe(None, ["train.kernels=on"]).train.kernels == "auto"
    assert load_recipe(None, ["train.kernels='off'"]).train.kernels == "off"
    with pytest.raises(RecipeError, match="train.kernels"):
        load_recipe(None, ["train.kernels=fast"])
    out = subprocess.run([sys.executable, "-m", "pluribus.cli", "config", "train.kernels=off"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "kernels: 'off'" in out.stdout or 'kernels: "off"' in out.stdout


def test_experts_take_the_shared_settings_and_override_them_key_by_key() -> None:
    r = load_recipe(None, ["train.lr=1e-4", "train.lora.r=8", "train.experts=[{objective: rsft}, "
                           "{objective: augmented, lr: 3e-4}, {objective: prm, lora: {alpha: 4}}, "
                           "{name: rl-from-rsft, objective: rl, init_adapter: rsft, rl: {group_size: 3}}, "
                           "{name: self-rsft, objective: rsft, data: self}]"])
    ts = r.train.trainings()
    assert [t.expert_name for t in ts] == ["rsft", "augmented", "prm", "rl-from-rsft", "self-rsft"]
    assert [t.lr for t in ts] == [1e-4, 3e-4, 1e-4, 1e-4, 1e-4]
    assert ts[2].lora.r == 8 and ts[2].lora.alpha == 4  # nested sections merge, not replace
    assert ts[3].rl.group_size == 3 and ts[3].rl.prompts_per_step == r.train.rl.prompts_per_step
    assert ts[4].data == "self" and r.train.expert("prm").objective == "prm"
    with pytest.raises(RecipeError, match="no expert named 'rl' in the train section. Available: rsft, augmented"):
        r.train.expert("rl")
    # without experts the section is the one training, named after its objective
    assert [t.expert_name for t in load_recipe(None, ["train.objective=prm"]).train.trainings()] == ["prm"]


def test_expert_references_resolve_to_earlier_experts_folders(tmp_path: Path) -> None:
    from pluribus.stages.train import resolve_expert

    r = load_recipe(None, [f"root={tmp_path}", "name=x", "train.experts=[{objective: rsft}, {objective: prm}, "
                           "{objective: rl, init_adapter: rsft}, {name: rl2, objective: rl, init_adapter: /a/b, "
                           "rl: {prm: /p}}]"])
    rl = resolve_expert(r, r.train.expert("rl"))
    assert rl.init_adapter == str(tmp_path / "x" / "adapters" / "rsft")
    assert rl.rl.prm == str(tmp_path / "x" / "adapters" / "prm")  # the prm expert before it
    rl2 = resolve_expert(r, r.train.expert("rl2"))
    assert (rl2.init_adapter, rl2.rl.prm) == ("/a/b", "/p")  # not expert names: folders as given
    late = load_recipe(None, ["train.experts=[{objective: rl, init_adapter: rsft}, {objective: rsft}]"])
    with pytest.raises(PluribusError, match="names an expert trained after it"):
        resolve_expert(late, late.train.expert("rl"))
    prm_later = load_recipe(None, ["train.experts=[{objective: rsft}, {objective: rl}, {objective: prm}]"])
    with pytest.raises(PluribusError, match="the prm expert prm is trained after it"):
        resolve_expert(prm_later, prm_later.train.expert("rl"))  # not the previous run's adapters/prm


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.experts=[{objective: rsft}, {objective: rsft}]"], "name 'rsft' is used twice"),
    (["train.experts=[{objective: rsft, lr: -1}]"], "experts.0: 'lr' = -1"),
    (["train.experts=[{objective: rsft, experts: []}]"], "cannot have experts of its own"),
    (["train.stage=rsft"], "now called objective"),
    (["merge.experts=[nope]"], "names experts \\['nope'\\] that the train section does not have"),
    (["train.objective=rsft", "merge.experts=[rsft]", "merge.method=tie"], "tie"),
    (["train.objective=rsft", "merge.experts=[rsft]", "merge.weights=[1, 2]"], "2 weights for 1 experts"),
    (["eval.systems=[single, nope]"], "eval.systems \\['nope'\\] are not systems"),
    (["merge.experts=[]", "train.objective=rsft"], "experts is empty"),
    (["train.experts=[{objective: prm, data: self}]"], "data: self .* trains rsft or augmented"),
    (["train.experts=[{objective: rsft}, {objective: prm}]", "merge.experts=[rsft, prm]"], "process reward model"),
    (["train.experts=[{objective: rsft, name: merged}]", "merge.experts=[merged]"], "used twice"),
    (["train.experts=[{objective: rsft, name: single-x}]"], "used twice"),
])
def test_expert_and_system_names_are_checked_up_front(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_merges_of_the_run_experts_by_name(tmp_path: Path) -> None:
    r = load_recipe(None, [f"root={tmp_path}", "name=x", "train.experts=[{objective: rsft}, {objective: augmented}]",
                           "merge.experts=[rsft, augmented]", "merge.merges=[{name: ta}, {name: ties, method: ties, "
                           "params: {density: 0.5}}]", "eval.systems=[single, experts, ta, ties]"])
    ta, ties = r.merge.all()
    spec = ta.load(r.layout)
    assert spec.method == "task_arithmetic" and [i.weight for i in spec.inputs] == [1.0, 1.0]  # as from the CLI
    assert [i.path for i in spec.inputs] == [str(tmp_path / "x" / "adapters" / n) for n in ("rsft", "augmented")]
    assert ties.load(r.layout).method == "ties" and ties.load(r.layout).density == 0.5


def test_merges_override_the_shared_settings_key_by_key() -> None:
    r = load_recipe(None, ["train.experts=[{objective: rsft}, {objective: augmented}]", "merge.experts=[rsft, augmented]",
                           "merge.method=ties", "merge.params={density: 0.3}",
                           "merge.merges=[{name: a}, {name: b, params: {lambda: 0.5}}]"])
    a, b = r.merge.all()
    assert a.params == {"density": 0.3} and b.params == {"density": 0.3, "lambda": 0.5}
