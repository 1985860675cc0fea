"""Merge configs: mergekit YAML translation and fallback, recipe sections, the short form, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pluribus.config import RecipeError, validate_recipe
from pluribus.errors import PluribusError
from pluribus.merge.config import (
    from_mergekit,
    load_merge_config,
    parse_merge_config,
    resolve_cli,
    spec_from_flags,
)

PLURIBUS = Path(sys.executable).with_name("pluribus")


def test_mergekit_yaml_translates_with_its_semantics():
    spec = from_mergekit({
        "merge_method": "dare_ties", "base_model": "base", "dtype": "bfloat16",
        "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 0.3, "density": 0.6}},
                   {"model": "base+lora", "parameters": {"weight": 0.7}}],
        "parameters": {"lambda": 1.2, "density": 0.4, "int8_mask": True},
    })
    assert spec.method == "dare_ties" and spec.mergekit and spec.base == "base" and spec.lam == 1.2
    assert [i.label for i in spec.inputs] == ["a", "base+lora"]  # the base listed among models is skipped
    assert [i.drop for i in spec.inputs] == pytest.approx([0.4, 0.6])  # mergekit's density is the keep rate
    assert spec.out_dtype == "bfloat16"


@pytest.mark.parametrize("data", [
    {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.5}},
    {"merge_method": "ties", "base_model": "a", "models": [{"model": "b", "parameters": {"weight": [0, 0.5, 1]}}]},
    {"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
    {"merge_method": "dare_ties", "base_model": "a", "models": [{"model": "b"}], "parameters": {"rescale": False}},
])
def test_what_pluribus_does_not_implement_goes_to_mergekit(data):
    spec = parse_merge_config(data)
    assert spec.method == "mergekit" and spec.mergekit_yaml == data


def test_pluribus_yaml_and_errors(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "ties", "lambda": 0.5, "inputs": [{"path": "a"}]}))
    assert load_merge_config(tmp_path / "m.yaml").lam == 0.5
    with pytest.raises(PluribusError, match=r"method: 'tie' is not allowed; expected one of 'cat'"):
        parse_merge_config({"method": "tie", "inputs": [{"path": "a"}]})
    with pytest.raises(PluribusError, match="inputs is empty"):
        parse_merge_config({"method": "ties"})
    with pytest.raises(PluribusError, match="either rank or energy"):
        parse_merge_config({"method": "svd", "rank": 4, "energy": 0.9, "inputs": [{"path": "a"}]})
    with pytest.raises(PluribusError, match="does not exist"):
        load_merge_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("method: [")
    with pytest.raises(PluribusError, match="not valid YAML"):
        load_merge_config(tmp_path / "bad.yaml")


def test_short_form_flags():
    spec = spec_from_flags("ties", adapters=["a,b", "c"], weights=["1,0.5,2"], density=0.4)
    assert [(i.path, i.weight) for i in spec.inputs] == [("a", 1.0), ("b", 0.5), ("c", 2.0)] and spec.density == 0.4
    with pytest.raises(PluribusError, match="2 weights for 3 inputs"):
        spec_from_flags("ties", adapters=["a,b,c"], weights=["1,2"])
    with pytest.raises(PluribusError, match="-o OUT"):
        resolve_cli(None, None, method="cat", adapters=["a"])


def test_recipe_merge_section_inline_or_by_path(tmp_path):
    recipe = validate_recipe({"name": "r", "root": str(tmp_path), "merge": {"spec": {"method": "cat", "inputs": [{"path": "a"}]}}})
    assert recipe.merge.load().method == "cat"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "svd", "rank": 8, "inputs": [{"path": "a"}]}))
    recipe = validate_recipe({"merge": {"config": str(tmp_path / "m.yaml"), "name": "soup"}})
    assert recipe.merge.load().rank == 8
    with pytest.raises(RecipeError, match="merge.spec"):
        validate_recipe({"merge": {"spec": {"method": "tie", "inputs": [{"path": "a"}]}}})
    with pytest.raises(RecipeError, match="exactly one of 'config'"):
        validate_recipe({"merge": {}}).merge.load()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "root": str(tmp_path),
                                                          "merge": {"config": str(tmp_path / "m.yaml")}}))
    spec, out = resolve_cli(tmp_path / "recipe.yaml", None)
    assert spec.rank == 8 and out == tmp_path / "r" / "merged" / "merged"


@pytest.mark.slow
def test_cli_short_form_and_one_line_errors(make_adapter, tmp_path):
    a, b = make_adapter(2, 4, ["q_proj"], seed=31), make_adapter(3, 3, ["q_proj", "v_proj"], seed=32)
    # the short form: space-separated lists
    res = subprocess.run([str(PLURIBUS), "merge", "--method", "svd", "--adapters", str(a), str(b), "--weights", "1", "0.5",
                          "--rank", "2", "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "method svd (adapters -> adapter)" in res.stdout and "ranks out: 2" in res.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    res = subprocess.run([str(PLURIBUS), "merge", "--method", "cat", "--adapters", str(a), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "already exists; pass --overwrite" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip() and "gemm_4bit" not in line]) == 1


def test_space_separated_lists_become_one_value():
    from pluribus.cli import gather_lists

    argv = ["merge", "--method", "ties", "--adapters", "a", "b", "c", "--weights", "1", "-0.5", "2", "-o", "out"]
    assert gather_lists(argv) == ["merge", "--method", "ties", "--adapters", "a,b,c", "--weights", "1,-0.5,2", "-o", "out"]
    assert gather_lists(["merge", "--adapters", "a,b", "--adapters", "c"]) == ["merge", "--adapters", "a,b", "--adapters", "c"]
    assert gather_lists(["merge", "--models", "--rank", "4"]) == ["merge", "--models", "--rank", "4"]  # click reports it


def test_example_configs_parse():
    folder = Path(__file__).resolve().parents[2] / "configs" / "merge"
    specs = {p.name: load_merge_config(p) for p in sorted(folder.glob("*.yaml"))}
    assert len(specs) >= 3 and all(s.method != "mergekit" for s in specs.values())
    assert specs["mergekit-ties.yaml"].inputs[2].adapter == "runs/quickstart/adapters/rsft"


def test_seed_flag_sets_the_dare_seed_of_flags_and_config_files(tmp_path):
    from pluribus.merge.config import resolve_cli

    spec, _ = resolve_cli(None, tmp_path / "o", method="dare_linear", adapters=["a,b"], drop=0.3, seed=7)
    assert spec.seed == 7
    cfg = {"merge_method": "dare_ties", "base_model": "base", "dtype": "float32",
           "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5}}]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(cfg))
    assert resolve_cli(tmp_path / "mk.yaml", tmp_path / "o")[0].seed == 0
    assert resolve_cli(tmp_path / "mk.yaml", tmp_path / "o", seed=5)[0].seed == 5
