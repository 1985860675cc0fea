"""Merge configs: mergekit YAML translation and fallback, recipe sections, the short form, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pluribus.config import validate_recipe
from pluribus.errors import PluribusError, RecipeError
from pluribus.merge.config import load_merge_config, parse_merge_config
from pluribus.merge.mergekit import from_mergekit
from pluribus.merge.resolve import resolve_cli, spec_from_flags

PLURIBUS = Path(sys.executable).with_name("pluribus")
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    """``pluribus ARGS`` importing this checkout's package (an editable install may point at another one)."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(PLURIBUS), *args], capture_output=True, text=True, env=env)


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
    with pytest.raises(PluribusError, match=r"method: Unknown merge method 'tie'\. Available: cat, svd, linear, "
                                            r"task_arithmetic, .*, pcb, mergekit$"):
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
    from pluribus.merge.resolve import resolve_cli

    spec, _ = resolve_cli(None, tmp_path / "o", method="dare_linear", adapters=["a,b"], drop=0.3, seed=7)
    assert spec.seed == 7
    cfg = {"merge_method": "dare_ties", "base_model": "base", "dtype": "float32",
           "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5}}]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(cfg))
    assert resolve_cli(tmp_path / "mk.yaml", tmp_path / "o")[0].seed == 0
    assert resolve_cli(tmp_path / "mk.yaml", tmp_path / "o", seed=5)[0].seed == 5


@pytest.mark.parametrize("flag", [{"normalize": False}, {"normalize": True}, {"lambda": 0.0}, {"drop": 0.0}])
def test_flags_beside_a_config_file_are_refused_even_false_or_zero(tmp_path, flag):
    # --no-normalize, --lambda 0, --drop 0 beside a config file changed nothing, with exit 0
    cfg = {"method": "dare_linear", "inputs": [{"path": "a"}, {"path": "b"}], "drop": 0.3}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    name = next(iter(flag))
    with pytest.raises(PluribusError, match=f"--{name} has no effect with a merge config file"):
        resolve_cli(tmp_path / "m.yaml", tmp_path / "o", **flag)


def test_unreadable_merge_configs_and_recipes_without_merge_are_one_line(tmp_path):
    (tmp_path / "bad1.yaml").write_text("name: x\nteam:\n  rounds: [1\n")
    for load in (load_merge_config, lambda p: resolve_cli(p, tmp_path / "o")):
        with pytest.raises(PluribusError, match=r"'.*bad1\.yaml' is not valid YAML at line 4, column 1"):
            load(tmp_path / "bad1.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00method: ties\x81")
    with pytest.raises(PluribusError, match=r"merge config '.*bin\.yaml' is not UTF-8"):
        resolve_cli(tmp_path / "bin.yaml", tmp_path / "o")
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({"name": "q", "train": {"lr": 1e-4}}))
    with pytest.raises(PluribusError, match=r"^recipe '.*q\.yaml' has no merge: section; add one or pass a merge config$"):
        resolve_cli(tmp_path / "q.yaml", tmp_path / "o")


def test_unknown_mergekit_parameters_are_refused_naming_the_accepted_ones():
    ties = {"merge_method": "ties", "base_model": "b", "dtype": "float32",
            "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": "y", "parameters": {"weight": 1.0, "densty": 0.5}}]}
    with pytest.raises(PluribusError, match=r"models\.1 \(y\) parameters: unknown parameter 'densty' for merge_method "
                                            r"'ties'; accepted: density, weight$"):
        parse_merge_config(ties)
    # a gradient (handed to mergekit) is checked all the same
    ties["models"][1]["parameters"] = {"weight": [0.0, 1.0], "densty": 0.5}
    with pytest.raises(PluribusError, match="unknown parameter 'densty'"):
        parse_merge_config(ties)
    with pytest.raises(PluribusError, match=r"^mergekit config: parameters: unknown parameter 'lamda'.*accepted: .*lambda"):
        parse_merge_config({**ties, "models": [{"model": "x"}], "parameters": {"lamda": 0.5}})
    with pytest.raises(PluribusError, match=r"unknown parameter 'density' for merge_method 'linear'; accepted: weight$"):
        parse_merge_config({"merge_method": "linear", "models": [{"model": "x", "parameters": {"density": 0.5}}]})
    pytest.importorskip("mergekit")  # methods pluribus does not run: mergekit's own names
    with pytest.raises(PluribusError, match=r"unknown parameter 'tt' for merge_method 'slerp'; accepted: .*\bt\b"):
        parse_merge_config({"merge_method": "slerp", "base_model": "x", "models": [{"model": "y"}],
                            "parameters": {"tt": 0.5}})


def test_mergekit_fallback_gets_absolute_local_paths_from_the_cwd(tmp_path, monkeypatch):
    from pluribus.merge.mergekit import mergekit_local_paths

    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    for name in ("base", "m1", "lora"):
        (tmp_path / name).mkdir()
    data = {"merge_method": "slerp", "base_model": "base", "tokenizer_source": "m1",
            "models": [{"model": "m1"}, {"model": "./base+lora"}, {"model": "org/hub-model"}]}
    out = mergekit_local_paths(data)
    assert out["base_model"] == str(root / "base") and out["tokenizer_source"] == str(root / "m1")
    assert mergekit_local_paths({**data, "tokenizer_source": "base"})["tokenizer_source"] == "base"  # mergekit's word
    assert [m["model"] for m in out["models"]] == [str(root / "m1"), f"{root / 'base'}+{root / 'lora'}",
                                                  "org/hub-model"]
    assert data["base_model"] == "base"  # the recipe as written is kept
    for missing in ("mA2", "./mA2", "base+nolora"):
        with pytest.raises(PluribusError, match=r"models\.0\.model '.*' does not exist"):
            mergekit_local_paths({**data, "models": [{"model": missing}]})


@pytest.mark.parametrize(("data", "message"), [
    ({"method": "task_arithmetic", "lambda": float("nan")}, "lambda must be a finite number"),
    ({"method": "svd", "energy": float("nan")}, "energy must be a finite number"),
    ({"method": "ties", "density": float("inf")}, "density must be a finite number"),
    ({"method": "dare_ties", "drop": float("-inf")}, "drop must be a finite number"),
    ({"method": "ties", "inputs": [{"path": "a", "weight": float("nan")}]}, r"inputs\.0: weight of 'a' must be a finite"),
    ({"method": "ties", "inputs": [{"path": "a", "density": float("nan")}]}, r"density of 'a' must be a finite"),
    ({"method": "ties", "inputs": [{"path": "a", "drop": float("inf")}]}, r"drop of 'a' must be a finite"),
    ({"method": "mergekit", "mergekit_yaml": {"merge_method": "slerp"}, "lambda": float("inf")}, "lambda must be"),
])
def test_nan_and_inf_parameters_are_refused_by_name(data, message):
    data = {"inputs": [{"path": "a"}], **data}
    with pytest.raises(PluribusError, match=message):
        parse_merge_config(data)
    with pytest.raises(PluribusError, match="energy = 1.5 is out of range"):
        parse_merge_config({"method": "svd", "energy": 1.5, "inputs": [{"path": "a"}]})


def test_nan_and_inf_in_mergekit_configs_are_one_line(tmp_path):
    models = [{"model": "a", "parameters": {"weight": float("nan")}}, {"model": "b", "parameters": {"weight": 1.0}}]
    (tmp_path / "nan.yaml").write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .nan}\n")
    with pytest.raises(PluribusError, match=r"^mergekit config: models\.0 \(a\) parameters: weight must be a finite "
                                            r"number \(got nan\)$"):
        resolve_cli(tmp_path / "nan.yaml", tmp_path / "o")
    with pytest.raises(PluribusError, match=r"^mergekit config: parameters: lambda must be a finite number \(got inf\)"):
        parse_merge_config({"merge_method": "task_arithmetic", "base_model": "x", "models": models[1:],
                            "parameters": {"lambda": float("inf")}})
    # also what mergekit itself would run: a gradient, or a method pluribus does not implement
    with pytest.raises(PluribusError, match=r"models\.0 \(a\) parameters: weight must be a finite number"):
        parse_merge_config({"merge_method": "ties", "base_model": "x",
                            "models": [{"model": "a", "parameters": {"weight": [0.5, float("nan")]}}]})
    with pytest.raises(PluribusError, match=r"parameters: t must be a finite number"):
        parse_merge_config({"merge_method": "slerp", "base_model": "x", "models": models[1:],
                            "parameters": {"t": float("nan")}})
    # a translated value that the spec refuses is one line too, not a pydantic traceback
    with pytest.raises(PluribusError, match=r"^mergekit config: inputs\.0\.density = 1.5 is out of range"):
        parse_merge_config({"merge_method": "ties", "base_model": "x", "models": models[1:],
                            "parameters": {"density": 1.5}})


@pytest.mark.parametrize(("data", "message"), [
    ({"method": "dare_ties", "density": 0.5},
     r"density has no effect in method 'dare_ties': DARE drops each entry with probability drop .* \(drop: 0.5\)"),
    ({"method": "dare_linear", "inputs": [{"path": "a", "density": 0.7}]}, r"density has no effect in method 'dare_linear'"),
    ({"method": "cat", "rank": 2}, r"rank has no effect in method 'cat' \(cat writes the exact sum .* use method svd"),
    ({"method": "cat", "density": 0.5}, r"density has no effect in method 'cat' \(it applies to magnitude, ties, pcb\)"),
    ({"method": "ties", "drop": 0.2}, r"drop has no effect in method 'ties' \(it applies to dare_linear, dare_ties\)"),
    ({"method": "svd", "normalize": False}, r"normalize has no effect in method 'svd'"),
    ({"method": "pcb", "drop": 0.1}, r"drop has no effect in method 'pcb'"),
    ({"method": "pcb", "trim": "global"}, r"trim has no effect in method 'pcb'"),
    ({"method": "pcb", "normalize": True}, r"normalize has no effect in method 'pcb'"),
    ({"method": "pcb", "mergekit": True}, r"method 'pcb' has no mergekit counterpart"),
    ({"method": "pcb", "density": 0.0}, r"density = 0.0 is out of range"),
])
def test_an_option_the_method_does_not_read_is_refused_by_name(data, message):
    with pytest.raises(PluribusError, match=message):
        parse_merge_config({"inputs": [{"path": "a"}], **data})


def test_pcb_spec_and_flags():
    spec = parse_merge_config({"method": "pcb", "density": 0.2, "lambda": 0.9, "inputs": [{"path": "a", "density": 0.5},
                                                                                        {"path": "b"}]})
    assert spec.method == "pcb" and spec.density == 0.2 and spec.lam == 0.9 and spec.inputs[0].density == 0.5
    flags = spec_from_flags("pcb", adapters=["a,b"], weights=["1,0.5"], density=0.1, rank=8)
    assert flags.method == "pcb" and flags.density == 0.1 and flags.rank == 8


def test_mergekit_linear_with_a_base_outside_models_is_refused():
    with pytest.raises(PluribusError, match=r"base_model 'b' is not among models: add it to models"):
        parse_merge_config({"merge_method": "linear", "base_model": "b", "models": [{"model": "x"}, {"model": "y"}]})
    spec = parse_merge_config({"merge_method": "linear", "base_model": "x", "models": [{"model": "x"}, {"model": "y"}]})
    assert [i.path for i in spec.inputs] == ["x", "y"]


@pytest.mark.slow
def test_cli_pcb_merges_models_and_refuses_options_it_does_not_read(tiny_base, make_expert, tmp_path):
    a, b = make_expert(41), make_expert(42)
    res = cli("merge", "--method", "pcb", "--base", str(tiny_base), "--models", str(a), str(b),
              "--weights", "1", "0.5", "--density", "0.2", "--lambda", "0.9", "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "method pcb (models -> model), 2 inputs" in res.stdout
    assert yaml.safe_load((tmp_path / "out" / "merge.yaml").read_text())["method"] == "pcb"
    for extra, message in ((["--drop", "0.1"], "drop has no effect in method 'pcb'"),
                           (["--rank", "4"], "rank and energy shape an adapter output")):
        res = cli("merge", "--method", "pcb", "--base", str(tiny_base), "--models", str(a), str(b), *extra,
                  "-o", str(tmp_path / "o2"))
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert not (tmp_path / "o2").exists()


def test_flags_beside_a_config_file_are_refused_not_ignored(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "ties", "density": 0.5, "inputs": [{"path": "a"}]}))
    with pytest.raises(PluribusError, match=r"--density has no effect with a merge config file .*set it in the config"):
        resolve_cli(tmp_path / "m.yaml", tmp_path / "o", density=0.3)
    with pytest.raises(PluribusError, match=r"--lambda has no effect"):
        resolve_cli(tmp_path / "m.yaml", tmp_path / "o", **{"lambda": 0.5})
    assert resolve_cli(tmp_path / "m.yaml", tmp_path / "o", seed=3, mergekit=None)[0].seed == 3


def test_no_check_base_flag_reaches_the_spec_from_flags_and_config_files(tmp_path):
    assert resolve_cli(None, tmp_path / "o", method="cat", adapters=["a,b"], check_base=False)[0].check_base is False
    assert resolve_cli(None, tmp_path / "o", method="cat", adapters=["a,b"], check_base=None)[0].check_base is True
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "cat", "inputs": [{"path": "a"}]}))
    assert resolve_cli(tmp_path / "m.yaml", tmp_path / "o", check_base=False)[0].check_base is False


def test_pluribus_options_beside_a_raw_mergekit_config_are_refused():
    with pytest.raises(PluribusError, match=r"density has no effect in method 'mergekit'.*put it in mergekit_yaml"):
        parse_merge_config({"method": "mergekit", "density": 0.5, "mergekit_yaml": {"merge_method": "della"}})


def test_one_default_weighting_whatever_the_entry_point(make_adapter, tmp_path):
    """Issue 26: a recipe's merge.experts weighed each expert 1/n while --adapters and spec: weighed each 1."""
    import shutil

    import torch

    from pluribus.config import load_recipe
    from pluribus.merge import run_merge
    from pluribus.merge.adapters import load_adapter

    names = ["a", "b", "c"]
    r = load_recipe(None, [f"root={tmp_path}", "name=x", "train.experts=[{objective: rsft, name: a}, "
                           "{objective: rsft, name: b}, {objective: rsft, name: c}]", "merge.experts=[a, b, c]"])
    for i, n in enumerate(names):
        shutil.copytree(make_adapter(4, 8, ["q_proj"], seed=70 + i), r.layout.adapter(n))
    paths = [str(r.layout.adapter(n)) for n in names]
    entries = {
        "recipe experts": r.merge.load(r.layout),
        "CLI --adapters": spec_from_flags("task_arithmetic", adapters=[",".join(paths)]),
        "recipe spec": validate_recipe({"merge": {"spec": {"method": "task_arithmetic",
                                                           "inputs": [{"path": p} for p in paths]}}}).merge.load(),
    }
    deltas = {}
    for label, spec in entries.items():
        assert [i.weight for i in spec.inputs] == [1.0] * 3, label
        run_merge(spec, tmp_path / label)
        deltas[label] = {k: m.delta(torch.float64) for k, m in load_adapter(tmp_path / label).modules.items()}
    def close(got: torch.Tensor, want: torch.Tensor) -> bool:  # Frobenius, relative: float32 storage is ~1e-7
        return float((got - want).norm() / want.norm()) < 1e-6

    for label in entries:
        assert all(close(deltas[label][k], d) for k, d in deltas["CLI --adapters"].items()), label
    # a mean is spelled: weights 1/3, or normalize
    mean = load_recipe(None, [f"root={tmp_path}", "name=x", "train.experts=[{objective: rsft, name: a}, "
                              "{objective: rsft, name: b}, {objective: rsft, name: c}]", "merge.experts=[a, b, c]",
                              "merge.params={normalize: true}"]).merge.load(r.layout)
    run_merge(mean, tmp_path / "mean")
    got = {k: m.delta(torch.float64) for k, m in load_adapter(tmp_path / "mean").modules.items()}
    assert all(close(got[k], d / 3) for k, d in deltas["CLI --adapters"].items())


def _two_merges_recipe(make_adapter, tmp_path) -> Path:
    import shutil

    recipe = {"name": "x", "root": str(tmp_path / "runs"),
              "train": {"experts": [{"objective": "rsft", "name": "a"}, {"objective": "rsft", "name": "b"}]},
              "merge": {"experts": ["a", "b"], "merges": [{"name": "ta"}, {"name": "ties", "method": "ties",
                                                                              "params": {"density": 0.5}}]}}
    for i, n in enumerate("ab"):
        shutil.copytree(make_adapter(2, 4, ["q_proj"], seed=80 + i), tmp_path / "runs" / "x" / "adapters" / n)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_of_a_recipe_runs_every_merge_or_the_one_named(make_adapter, tmp_path):
    """Issue 26: `pluribus merge RECIPE` ran the first of several merges and said nothing of the others."""
    from typer.testing import CliRunner

    from pluribus.cli import app

    path = _two_merges_recipe(make_adapter, tmp_path)
    merged = tmp_path / "runs" / "x" / "merged"
    res = CliRunner().invoke(app, ["merge", str(path)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in merged.iterdir()} == {"ta", "ties"}
    for name, method in (("ta", "task_arithmetic"), ("ties", "ties")):
        assert yaml.safe_load((merged / name / "merge.yaml").read_text())["method"] == method
        assert f"method {method} (adapters -> adapter)" in res.output
    # one by name, to its default folder or to -o; -o for several, an unknown name: refused naming the merges
    from pluribus.merge.resolve import resolve_merges

    assert [(n, s.method) for n, s, _ in resolve_merges(path, None, "ties")] == [("ties", "ties")]
    assert resolve_merges(path, tmp_path / "o", "ta")[0][2] == tmp_path / "o"
    with pytest.raises(PluribusError, match=r"-o names one folder, but recipe .* has 2 merges \(ta, ties\); pick one"):
        resolve_merges(path, tmp_path / "o")
    with pytest.raises(PluribusError, match=r"has no merge named 'tie'; its merges: ta, ties"):
        resolve_merges(path, None, "tie")
    with pytest.raises(PluribusError, match=r"has 2 merges \(ta, ties\)"):
        resolve_cli(path, None)
    # every output is checked before the first merge writes: an existing second one refuses the whole command
    import shutil

    shutil.rmtree(merged / "ta")
    res = CliRunner().invoke(app, ["merge", str(path)])
    assert isinstance(res.exception, PluribusError) and "ties' already exists" in str(res.exception)
    assert not (merged / "ta").exists()
