"""Adapter merges in low-rank space: exactness, PEFT round trips and parity, rank selection, and every bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pluribus.errors import PluribusError
from pluribus.merge import MergeInput, MergeSpec, run_merge
from pluribus.merge.adapters import load_adapter, merge_adapters
from tests.merge.conftest import tiny_model

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 2], [3, 4, 8, 16, 32, 64, 95]])


@pytest.fixture(scope="module")
def hetero(make_adapter):
    """Three adapters with different ranks, alphas, rsLoRA and target modules."""
    return [
        make_adapter(4, 8, ["q_proj", "v_proj"], seed=1),
        make_adapter(8, 4, ["q_proj", "down_proj"], seed=2, rslora=True),
        make_adapter(2, 16, ["o_proj", "gate_proj", "v_proj"], seed=3),
    ]


def exact_sum(paths: list[Path], weights: list[float], lam: float = 1.0) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p, w in zip(paths, weights, strict=True):
        for name, m in load_adapter(p).modules.items():
            d = lam * w * m.delta(torch.float64)
            out[name] = out[name] + d if name in out else d
    return out


def merged_deltas(folder: Path) -> dict[str, torch.Tensor]:
    return {k: m.delta(torch.float64) for k, m in load_adapter(folder).modules.items()}


def peft_logits(adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_model(), str(adapter)).eval()(TOKENS).logits


def reference_logits(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    model = tiny_model()
    sd = model.state_dict()
    for name, d in deltas.items():
        sd[f"{name}.weight"] = sd[f"{name}.weight"] + d.float()
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(TOKENS).logits


def spec(method: str, paths: list[Path], weights: list[float] | None = None, **kw) -> MergeSpec:
    weights = weights or [1.0] * len(paths)
    return MergeSpec(method=method, inputs=[MergeInput(path=str(p), weight=w) for p, w in zip(paths, weights, strict=True)], **kw)


def test_cat_is_exact_and_loads_in_peft(hetero, tmp_path):
    weights = [1.0, -0.5, 0.7]
    summary = run_merge(spec("cat", hetero, weights, lam=0.9), tmp_path / "cat")
    exact = exact_sum(hetero, weights, 0.9)
    got = merged_deltas(tmp_path / "cat")
    assert set(got) == set(exact)  # union of target modules; a missing module counts as zero
    num = sum(float((exact[k] - got[k]).pow(2).sum()) for k in exact)
    den = sum(float(v.pow(2).sum()) for v in exact.values())
    assert math.sqrt(num / den) < 1e-6
    # exact up to float32 storage of the factors, which the reported error is (not a flat 0)
    assert summary.error == pytest.approx(math.sqrt(num / den), rel=0.2, abs=1e-9)
    assert summary.ranks_out == [2, 6, 8, 12]  # o, gate: 2; v: 4+2; down: 8; q: 4+8
    torch.testing.assert_close(peft_logits(tmp_path / "cat"), reference_logits(exact), rtol=1e-4, atol=1e-5)
    for name in ("merge.yaml", "merge_report.json", "README.md", "adapter_config.json"):
        assert (tmp_path / "cat" / name).is_file()


def test_cat_matches_peft_add_weighted_adapter(make_adapter, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    # PEFT's cat needs every adapter on the same modules; ranks and alphas may differ
    paths = [make_adapter(4, 8, ["q_proj", "v_proj"], seed=7), make_adapter(6, 3, ["q_proj", "v_proj"], seed=8)]
    model = PeftModel.from_pretrained(tiny_model(), str(paths[0]), adapter_name="a")
    model.load_adapter(str(paths[1]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.8, 0.4], "cat", combination_type="cat")
    peft_deltas = {n: m.get_delta_weight("cat").double() for n, m in model.base_model.model.named_modules()
                   if isinstance(m, LoraLayer) and "cat" in m.lora_A}
    run_merge(spec("cat", paths, [0.8, 0.4]), tmp_path / "ours")
    ours = merged_deltas(tmp_path / "ours")
    assert set(ours) == set(peft_deltas)
    for k in ours:
        torch.testing.assert_close(ours[k], peft_deltas[k], rtol=1e-5, atol=1e-7)


def test_one_adapter_weight_one_gives_it_back(hetero, tmp_path):
    for method, kw in (("cat", {}), ("svd", {"rank": 8})):
        run_merge(spec(method, hetero[:1], **kw), tmp_path / method)
        got, exact = merged_deltas(tmp_path / method), exact_sum(hetero[:1], [1.0])
        for k in exact:
            torch.testing.assert_close(got[k], exact[k], rtol=1e-5, atol=1e-7)


def test_svd_rank_k_is_the_best_truncation_of_the_exact_sum(hetero, tmp_path):
    summary = run_merge(spec("svd", hetero, [1.0, 0.5, 2.0], rank=3), tmp_path / "svd")
    exact = exact_sum(hetero, [1.0, 0.5, 2.0])
    got = merged_deltas(tmp_path / "svd")
    num = den = 0.0
    for k, e in exact.items():
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(got[k], best, rtol=1e-5, atol=1e-7)
        num += float((e - got[k]).pow(2).sum())
        den += float(e.pow(2).sum())
    assert summary.error == pytest.approx(math.sqrt(num / den), rel=1e-5)
    torch.testing.assert_close(peft_logits(tmp_path / "svd"), reference_logits(got), rtol=1e-4, atol=1e-5)


def test_energy_gives_per_module_ranks_via_rank_pattern(hetero, tmp_path):
    summary = run_merge(spec("svd", hetero, energy=0.8), tmp_path / "energy")
    cfg = json.loads((tmp_path / "energy" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and len(summary.ranks_out) > 1
    exact = exact_sum(hetero, [1.0] * 3)
    got = merged_deltas(tmp_path / "energy")
    for k, e in exact.items():
        s = torch.linalg.svdvals(e)
        r = load_adapter(tmp_path / "energy").modules[k].rank
        assert (s[:r] ** 2).sum() / (s**2).sum() >= 0.8 - 1e-9
        assert r == 1 or (s[: r - 1] ** 2).sum() / (s**2).sum() < 0.8
    torch.testing.assert_close(peft_logits(tmp_path / "energy"), reference_logits(got), rtol=1e-4, atol=1e-5)


def options(method: str) -> dict:
    """The trimming option each method reads (any other one is refused)."""
    return {"svd": {}, "dare_ties": {"drop": 0.3}, "dare_linear": {"drop": 0.3}}.get(method, {"density": 0.5})


@pytest.mark.parametrize("method", ["svd", "ties", "dare_ties", "pcb"])
def test_threaded_merge_equals_the_serial_one_bit_for_bit(hetero, method):
    adapters = [load_adapter(p) for p in hetero]
    s = spec(method, hetero, [1.0, 0.5, 2.0], rank=3, seed=1, **options(method))
    serial, threaded = merge_adapters(s, adapters, workers=1), merge_adapters(s, adapters, workers=3)
    assert list(threaded.modules) == list(serial.modules)
    for k, (a, b) in serial.modules.items():
        assert torch.equal(threaded.modules[k][0], a) and torch.equal(threaded.modules[k][1], b)
    assert threaded.errors == serial.errors


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude", "pcb"])
def test_dense_methods_compress_to_the_requested_rank(hetero, tmp_path, method):
    summary = run_merge(spec(method, hetero, rank=4, seed=1, **options(method)), tmp_path / method)
    assert summary.ranks_out == [4] and 0 < summary.error < 1
    peft_logits(tmp_path / method)  # loads


def test_ties_global_trim_and_fold_into_a_model(hetero, tiny_base, tmp_path):
    from pluribus.merge import methods as M
    from pluribus.merge.adapters import AdapterPlan

    s = spec("ties", hetero, density=0.3, trim="global", base=str(tiny_base), output="model")
    run_merge(s, tmp_path / "folded")
    plan = AdapterPlan(s, [load_adapter(p) for p in hetero])
    # the global threshold of an expert keeps 30% of its entries over all modules together
    for t, thr in enumerate(plan.params.thresholds):
        deltas = torch.cat([m.delta().reshape(-1) for m in plan.adapters[t].modules.values()])
        assert int((deltas.abs() >= thr).sum()) == M.keep_count(deltas.numel(), 0.3)
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    for name in plan.shapes:
        torch.testing.assert_close(folded[f"{name}.weight"], base[f"{name}.weight"] + plan.dense(name))
    assert torch.equal(folded["model.norm.weight"], base["model.norm.weight"])


@pytest.mark.parametrize(("method", "normalize", "divisor"), [("task_arithmetic", True, 3.5), ("linear", None, 3.5),
                                                              ("task_arithmetic", None, 1.0)])
def test_normalize_has_its_effect_on_low_rank_methods(hetero, tmp_path, method, normalize, divisor):
    weights = [1.0, 0.5, 2.0]
    s = spec(method, hetero, weights, rank=14, **({} if normalize is None else {"normalize": normalize}))
    run_merge(s, tmp_path / "out")  # rank 14 = 4 + 8 + 2: exact
    got, exact = merged_deltas(tmp_path / "out"), exact_sum(hetero, weights)
    for name, d in exact.items():
        torch.testing.assert_close(got[name], d / divisor, rtol=1e-5, atol=1e-6)


def test_linear_without_normalize_on_adapters_is_the_models_weighted_sum_or_refused(hetero, tmp_path):
    # linear is sum_t w_t theta_t (a soup of the weights, base included, as over models): on adapters that is
    # base + sum_t w_t delta_t only when the weights sum to 1; otherwise it was task_arithmetic under linear's name
    weights = [0.25, 0.25, 0.5]
    run_merge(spec("linear", hetero, weights, normalize=False), tmp_path / "one")
    for name, d in exact_sum(hetero, weights).items():
        torch.testing.assert_close(merged_deltas(tmp_path / "one")[name], d, rtol=1e-5, atol=1e-6)
    with pytest.raises(PluribusError, match=r"linear with normalize: false .* weights sum to 3\.5.*task_arithmetic"):
        run_merge(spec("linear", hetero, [1.0, 0.5, 2.0], normalize=False), tmp_path / "sum")
    assert not (tmp_path / "sum").exists()


@pytest.mark.parametrize("method", ["svd", "cat"])
def test_nearly_cancelling_adapters_are_merged_and_reported_in_float64(hetero, tmp_path, method):
    # weights 1 and -0.99999: the sum is 1e-5 of each term, below float32's rounding of the scaled factors
    weights = [1.0, -0.99999]
    pair = [hetero[0], copy_adapter(hetero[0], tmp_path / "copy")]
    summary = run_merge(spec(method, pair, weights, **({"rank": 4} if method == "svd" else {})), tmp_path / "out")
    got, exact = merged_deltas(tmp_path / "out"), exact_sum(pair, weights)
    num = sum(float(torch.linalg.matrix_norm(got[k] - d)) ** 2 for k, d in exact.items())
    true = math.sqrt(num / sum(float(torch.linalg.matrix_norm(d)) ** 2 for d in exact.values()))
    if method == "svd":  # the rank-4 result of the float64 sum, stored in float32
        assert true < 1e-5 and summary.error < 1e-5
    else:  # cat stores the stacked float32 factors themselves: its error is float32's, and reported as such
        assert summary.error == pytest.approx(true, rel=0.05) and summary.error > 1e-4


@pytest.mark.parametrize(("method", "options"), [("svd", {"rank": 6}), ("cat", {}), ("ties", {"density": 0.5, "rank": 6})])
def test_out_dtype_of_an_adapter_output_is_applied_printed_and_in_the_error(hetero, tmp_path, method, options):
    weights = [1.0, 0.5, 2.0]
    s = spec(method, hetero, weights, out_dtype="bfloat16", **options)
    summary = run_merge(s, tmp_path / "bf16")
    stored = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert "stored as bfloat16" in summary.lines()
    # the error is that of the stored factors: above the float32 merge's, by bf16's rounding
    f32 = run_merge(spec(method, hetero, weights, **options), tmp_path / "f32")
    assert "stored as float32" in f32.lines()
    got, ref = merged_deltas(tmp_path / "bf16"), merged_deltas(tmp_path / "f32")
    exact = exact_sum(hetero, weights) if method != "ties" else None
    if exact is not None:
        num = sum(float(torch.linalg.matrix_norm(got[k] - d)) ** 2 for k, d in exact.items())
        true = math.sqrt(num / sum(float(torch.linalg.matrix_norm(d)) ** 2 for d in exact.values()))
        assert summary.error == pytest.approx(true, rel=0.02)
    # bf16 rounding (~2e-3 relative) adds in quadrature to the truncation error
    assert 1e-6 < summary.error**2 - f32.error**2 < 1e-4
    assert set(got) == set(ref)


def test_pcb_merges_each_module_densely_then_compresses_or_folds(hetero, tiny_base, tmp_path):
    from tests.merge.test_methods import pcb_paper

    adapters = [load_adapter(p) for p in hetero]
    names = sorted({m for a in adapters for m in a.modules})
    weights = [1.0, 0.5, 2.0]

    def expected(name: str) -> torch.Tensor:
        shape = next(a.modules[name].delta().shape for a in adapters if name in a.modules)
        # a module an adapter lacks is its zero task vector
        deltas = [a.modules[name].delta(torch.float64) if name in a.modules else torch.zeros(shape, dtype=torch.float64)
                  for a in adapters]
        return pcb_paper(deltas, 0.3, weights=weights)

    # rank 32 = the modules' full rank: the compression is exact, so the adapter is PCB's dense delta
    summary = run_merge(spec("pcb", hetero, weights, density=0.3, rank=32, **{"lambda": 0.8}), tmp_path / "a")
    assert summary.error < 1e-6
    got = merged_deltas(tmp_path / "a")
    assert sorted(got) == names
    for name in names:
        torch.testing.assert_close(got[name], 0.8 * expected(name), rtol=1e-4, atol=1e-6)
    run_merge(spec("pcb", hetero, weights, density=0.3, base=str(tiny_base), output="model"), tmp_path / "m")
    folded, base = load_file(tmp_path / "m" / "model.safetensors"), load_file(tiny_base / "model.safetensors")
    for name in names:
        torch.testing.assert_close(folded[f"{name}.weight"].double(), base[f"{name}.weight"].double() + expected(name),
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(("key", "config", "message"), [
    ("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", {"trainable_token_indices": [3, 5]},
     r"trains trainable tokens \(trainable_token_indices\)"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", {}, r"trains an embedding LoRA"),
    ("base_model.model.lm_head.modules_to_save.default.weight", {}, r"full copies of modules \(modules_to_save\)"),
    ("base_model.model.model.norm.weight", {}, r"tensors other than LoRA factors, biases and modules_to_save"),
])
def test_tensors_pluribus_does_not_merge_are_refused_not_dropped(hetero, tmp_path, key, config, message):
    # they change the model: merging the rest alone would drop them and still print a relative error of 0
    bad = copy_adapter(hetero[0], tmp_path / "extra")
    sd = load_file(bad / "adapter_model.safetensors")
    sd[key] = torch.randn(3, 32) if "tokens" in key or "lora_embedding" in key else torch.randn(32)
    save_file(sd, bad / "adapter_model.safetensors")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    with pytest.raises(PluribusError, match=message + r".*will not drop; retrain with .* or fold each adapter"):
        run_merge(spec("cat", [bad, hetero[1]]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_different_bases_are_refused_naming_both(hetero, tmp_path):
    other = copy_adapter(hetero[1], tmp_path / "other")
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other-model"}))
    first = copy_adapter(hetero[0], tmp_path / "first")
    cfg = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/base"}))
    with pytest.raises(PluribusError, match=r"different base models: .*first.* org/base.*other.* org/other-model"):
        run_merge(spec("cat", [first, other]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_base_under_several_names_is_one_base_and_bases_are_compared_by_contents(hetero, tiny_base, make_expert,
                                                                                     tmp_path, monkeypatch):
    import shutil

    def recording(src: Path, name: str, base: str) -> Path:
        a = copy_adapter(src, tmp_path / name)
        cfg = json.loads((a / "adapter_config.json").read_text())
        (a / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        return a

    shutil.copytree(tiny_base, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    relative = recording(hetero[0], "rel", "copy")  # as typed, e.g. by an extraction run from this folder
    absolute = recording(hetero[1], "abs", str(tiny_base))
    run_merge(spec("cat", [relative, absolute]), tmp_path / "out")  # a copy of the same weights: one base
    # same config.json, other weights (a fine-tune of the base): another base
    other = recording(hetero[2], "other", str(make_expert(61)))
    with pytest.raises(PluribusError, match=r"different base models: .*abs.*other.* \(their config.json or weights "
                                            r"differ\); .*--no-check-base"):
        run_merge(spec("cat", [absolute, other]), tmp_path / "out2")
    run_merge(spec("cat", [absolute, other], check_base=False), tmp_path / "out3")


def test_different_shapes_are_refused_naming_both(hetero, tmp_path):
    odd = copy_adapter(hetero[0], tmp_path / "odd")
    sd = load_file(odd / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = torch.randn(4, 40)
    save_file(sd, odd / "adapter_model.safetensors")
    with pytest.raises(PluribusError, match=r"model\.layers\.0\.self_attn\.q_proj is \(32, 40\) in '.*odd' but \(32, 32\)"):
        run_merge(spec("cat", [odd, hetero[1]]), tmp_path / "out")


def test_nan_is_named(hetero, tmp_path):
    bad = copy_adapter(hetero[0], tmp_path / "bad")
    sd = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, bad / "adapter_model.safetensors")
    with pytest.raises(PluribusError, match=r"bad:base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight' holds 1 NaN"):
        run_merge(spec("svd", [bad, hetero[1]], rank=2), tmp_path / "out")


def test_dora_and_other_peft_types_are_refused(make_adapter, hetero, tmp_path):
    dora = make_adapter(4, 8, ["q_proj"], seed=5, use_dora=True)
    with pytest.raises(PluribusError, match="uses DoRA"):
        run_merge(spec("cat", [dora, hetero[0]]), tmp_path / "out")
    ia3 = copy_adapter(hetero[0], tmp_path / "ia3")
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(PluribusError, match="PEFT type IA3; only LORA"):
        run_merge(spec("cat", [ia3]), tmp_path / "out")


def test_missing_and_corrupt_files(hetero, tmp_path):
    with pytest.raises(PluribusError, match="nowhere' does not exist"):
        run_merge(spec("cat", [tmp_path / "nowhere"]), tmp_path / "out")
    broken = copy_adapter(hetero[0], tmp_path / "broken")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PluribusError, match="corrupt or truncated"):
        run_merge(spec("cat", [broken]), tmp_path / "out")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(PluribusError, match="is not valid JSON"):
        run_merge(spec("cat", [broken]), tmp_path / "out")
    gone = copy_adapter(hetero[0], tmp_path / "gone")
    (gone / "adapter_model.safetensors").unlink()
    with pytest.raises(PluribusError, match="no adapter_model.safetensors"):
        run_merge(spec("cat", [gone]), tmp_path / "out")


@pytest.mark.parametrize(("edit", "message"), [
    ([1, 2], "is not a JSON object"),
    ({"r": "four"}, 'has r = "four", expected a positive integer'),
    ({"lora_alpha": None}, "has lora_alpha = null, expected a number"),
    ({"target_modules": 5}, "has target_modules = 5, expected a list of module names"),
    ({"rank_pattern": {"q_proj": 2.5}}, "has rank_pattern = .*, expected an object mapping module names to positive"),
])
def test_adapter_config_of_the_wrong_shape_is_named(hetero, tmp_path, edit, message):
    bad = copy_adapter(hetero[0], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **edit} if isinstance(edit, dict) else edit))
    with pytest.raises(PluribusError, match=f"adapter config '.*bad/adapter_config.json' {message}"):
        run_merge(spec("cat", [bad, hetero[1]]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_and_density_out_of_range(hetero):
    with pytest.raises(Exception, match=r"density = 1.5 is out of range"):
        spec("ties", hetero, density=1.5)
    with pytest.raises(Exception, match=r"drop = 1.0 is out of range"):
        spec("dare_ties", hetero, drop=1.0)
    with pytest.raises(Exception, match=r"inputs.0.density = 0.0 is out of range"):
        MergeSpec(method="ties", inputs=[MergeInput(path="a", density=0.0)])
    with pytest.raises(Exception, match="weight"):
        MergeSpec(method="ties", inputs=[MergeInput(path="a", weight=float("nan"))])
    with pytest.raises(PluribusError, match="weights sum to 0"):
        from pluribus.merge.adapters import AdapterPlan

        AdapterPlan(spec("linear", hetero[:2], [1.0, -1.0]), [load_adapter(p) for p in hetero[:2]])


def test_existing_output_is_refused_unless_overwrite(hetero, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(PluribusError, match="already exists; pass --overwrite"):
        run_merge(spec("cat", hetero), out)
    assert (out / "keep.txt").exists()
    run_merge(spec("cat", hetero), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("option", [{"tokenizer_source": "x"}, {"dtype": "bfloat16"}, {"shard_size": "2GB"}])
def test_model_output_options_are_refused_for_an_adapter_output(hetero, tmp_path, option):
    name = next(iter(option))
    with pytest.raises(PluribusError, match=rf"^{name} has no effect on an adapter output"):
        run_merge(spec("cat", hetero[:2], **option), tmp_path / "out")


def test_overwrite_never_replaces_an_input(hetero, tiny_base, tmp_path):
    a = copy_adapter(hetero[0], tmp_path / "a")
    before = (a / "adapter_model.safetensors").read_bytes()
    for out in (a, tmp_path):  # the input itself, or a folder holding it
        with pytest.raises(PluribusError, match=r"is the input .* or holds it, and --overwrite would delete it"):
            run_merge(spec("cat", [a, hetero[1]]), out, overwrite=True)
    with pytest.raises(PluribusError, match=rf"is the input '{tiny_base}'"):
        run_merge(spec("ties", [a], density=0.5, base=str(tiny_base), output="model"), tiny_base, overwrite=True)
    assert (a / "adapter_model.safetensors").read_bytes() == before and (tiny_base / "model.safetensors").is_file()


def test_folding_into_a_base_of_other_shapes_names_module_shapes_and_bases(hetero, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.merge.conftest import TINY

    wide = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 48})).save_pretrained(wide)
    ad = copy_adapter(hetero[0], tmp_path / "ad")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/narrow"}))
    s = spec("linear", [ad], base=str(wide), output="model")
    with pytest.raises(PluribusError, match=r"module model\.layers\.0\.self_attn\.q_proj is \(32, 32\) but base "
                                            r"'.*wide' has \(48, 48\); .*another base.*records base 'org/narrow'"):
        run_merge(s, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "wide"]  # no output, no temporary folder


def test_missing_input_and_folder_without_adapter_config_are_named(hetero, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PluribusError, match="input 'nonexist' does not exist"):
        run_merge(spec("linear", [hetero[0], Path("nonexist")]), tmp_path / "out")
    no_cfg = copy_adapter(hetero[1], tmp_path / "noCfg")
    (no_cfg / "adapter_config.json").unlink()
    for order in ([hetero[0], Path("noCfg")], [Path("noCfg"), hetero[0]], [Path("noCfg")]):
        with pytest.raises(PluribusError, match=r"input 'noCfg' has no adapter_config\.json \(not a PEFT adapter folder\)"):
            run_merge(spec("linear", order), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- tensors besides the factors: biases, modules_to_save


#: PEFT options that make an adapter change tensors besides its LoRA factors (Qwen2's q/k/v have biases)
EXTRAS = {
    "bias_lora_only": {"bias": "lora_only"},
    "bias_all": {"bias": "all"},
    "lora_bias": {"lora_bias": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "all_of_them": {"bias": "all", "lora_bias": True, "modules_to_save": ["lm_head"]},
}


def qwen2_logits(adapter: Path | None = None, model: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.merge.conftest import tiny_qwen2

    with torch.no_grad():
        if model is not None:
            return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(TOKENS).logits
        return PeftModel.from_pretrained(tiny_qwen2(), str(adapter)).eval()(TOKENS).logits


def by_hand(adapter: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every base tensor an adapter changes and its task vector, read from its raw files (float64): ``s B A`` per
    module, ``s b_B`` per LoRA bias, ``value - base`` per stored full value."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    sd = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.double()
          for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    out: dict[str, torch.Tensor] = {}

    def add(name: str, d: torch.Tensor) -> None:
        out[name] = out[name] + d if name in out else d

    for key, v in sd.items():
        if key.endswith(".lora_A.weight"):
            add(key.replace(".lora_A.weight", ".weight"), s * sd[key.replace("lora_A", "lora_B")] @ v)
        elif key.endswith(".lora_B.bias"):
            add(key.replace(".lora_B.bias", ".bias"), s * v)
        elif "lora_" not in key:
            add(key, v - base[key].double())
    return out


def strip_to_factors(adapter: Path, out: Path) -> Path:
    """The adapter without what it changes besides its LoRA factors: what a merge that drops them would write."""
    out.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "none", "lora_bias": False,
                                                         "modules_to_save": None}))
    sd = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in sd.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))},
              out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_an_adapter_with_biases_or_saved_modules_merged_alone_is_itself(make_qwen2_adapter, tiny_qwen2_base, tmp_path,
                                                                        kind):
    targets = ["q_proj", "v_proj"] if "lora_bias" in EXTRAS[kind] or kind == "all_of_them" else ["q_proj", "o_proj"]
    adapter = make_qwen2_adapter(targets, seed=40, **EXTRAS[kind])
    own = qwen2_logits(adapter)
    # the defect: the factors alone are another model (0.59 in logits there; this tiny one's are small),
    # hundreds of times the tolerance below
    assert float((qwen2_logits(strip_to_factors(adapter, tmp_path / "factors")) - own).abs().max()) > 1e-3
    summary = run_merge(spec("cat", [adapter]), tmp_path / "a")
    changed = set(by_hand(adapter, load_file(tiny_qwen2_base / "model.safetensors")))
    others = {n for n in changed if not (n.endswith(".weight") and n.removesuffix(".weight") in load_adapter(adapter).modules)}
    assert summary.others == len(others) > 0
    assert f"besides the LoRA factors: {len(others)} tensor(s) (biases, modules_to_save), merged at full rank" in summary.lines()
    assert others <= set(summary.details["module_errors"])  # the reported error covers them
    torch.testing.assert_close(qwen2_logits(tmp_path / "a"), own, atol=2e-6, rtol=0)
    # folded into the base: the model PEFT's merge_and_unload gives
    run_merge(spec("task_arithmetic", [adapter], base=str(tiny_qwen2_base), output="model"), tmp_path / "m")
    torch.testing.assert_close(qwen2_logits(model=tmp_path / "m"), own, atol=2e-6, rtol=0)


def test_two_adapters_with_biases_merge_by_task_arithmetic_as_computed_by_hand(make_qwen2_adapter, tiny_qwen2_base,
                                                                                tmp_path):
    a = make_qwen2_adapter(["q_proj", "v_proj"], seed=41, bias="all", lora_bias=True)
    b = make_qwen2_adapter(["q_proj", "o_proj"], seed=42, bias="lora_only", modules_to_save=["lm_head"])
    base = load_file(tiny_qwen2_base / "model.safetensors")
    weights, lam = [1.0, -0.5], 0.8
    expected = {k: v.double() for k, v in base.items()}
    for w, adapter in zip(weights, [a, b], strict=True):
        for name, d in by_hand(adapter, base).items():
            expected[name] = expected[name] + lam * w * d
    # rank 8 = 4 + 4 on q_proj: exact everywhere
    summary = run_merge(spec("task_arithmetic", [a, b], weights, lam=lam, rank=8), tmp_path / "ta")
    assert summary.error < 1e-6
    model = tiny_model_from(expected, tmp_path / "expected")
    torch.testing.assert_close(qwen2_logits(tmp_path / "ta"), qwen2_logits(model=model), atol=2e-6, rtol=0)
    stored = load_file(tmp_path / "ta" / "adapter_model.safetensors")
    # lm_head (b's modules_to_save) as a full value; k_proj (a's bias: all) as the module's bias
    torch.testing.assert_close(stored["base_model.model.lm_head.weight"].double(), expected["lm_head.weight"])
    torch.testing.assert_close(stored["base_model.model.model.layers.1.self_attn.k_proj.bias"].double(),
                               expected["model.layers.1.self_attn.k_proj.bias"])
    # folded into the base: the same model
    run_merge(spec("task_arithmetic", [a, b], weights, lam=lam, base=str(tiny_qwen2_base), output="model"),
              tmp_path / "m")
    folded = load_file(tmp_path / "m" / "model.safetensors")
    for name, t in expected.items():
        torch.testing.assert_close(folded[name].double(), t, atol=1e-6, rtol=1e-6)


def tiny_model_from(state: dict[str, torch.Tensor], out: Path) -> Path:
    from tests.merge.conftest import tiny_qwen2

    model = tiny_qwen2()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["ties", "dare_ties", "pcb"])
def test_dense_methods_merge_bias_and_module_task_vectors_like_the_factors(make_qwen2_adapter, tiny_qwen2_base, tmp_path,
                                                                           method):
    from pluribus.merge.adapters import method_params
    from pluribus.merge.registry import merge_deltas

    a = make_qwen2_adapter(["q_proj", "v_proj"], seed=43, bias="all")
    b = make_qwen2_adapter(["q_proj", "o_proj"], seed=44, bias="lora_only", modules_to_save=["lm_head"])
    base = load_file(tiny_qwen2_base / "model.safetensors")
    opts = {"drop": 0.3} if method.startswith("dare") else {"density": 0.5}
    s = spec(method, [a, b], [1.0, 0.7], base=str(tiny_qwen2_base), output="model", seed=3, **opts)
    run_merge(s, tmp_path / "m")
    folded = load_file(tmp_path / "m" / "model.safetensors")
    hand = [by_hand(p, base) for p in (a, b)]
    gen = torch.Generator().manual_seed(3)
    for name in base:  # the base's order: the order DARE draws in
        if not any(name in h for h in hand):
            assert torch.equal(folded[name], base[name])
            continue
        deltas = [h.get(name, torch.zeros_like(base[name], dtype=torch.float64)).float() for h in hand]
        want = base[name] + merge_deltas(method, deltas, method_params(s), gen)
        torch.testing.assert_close(folded[name], want, atol=1e-6, rtol=1e-5)


def test_a_base_plus_adapter_input_of_a_full_merge_carries_its_biases_and_saved_modules(make_qwen2_adapter,
                                                                                         tiny_qwen2_base, tmp_path):
    from peft import PeftModel

    from tests.merge.conftest import tiny_qwen2

    adapter = make_qwen2_adapter(["q_proj", "v_proj"], seed=45, bias="all", lora_bias=True, modules_to_save=["lm_head"])
    inputs = [MergeInput(path=str(tiny_qwen2_base), adapter=str(adapter))]
    run_merge(MergeSpec(method="task_arithmetic", base=str(tiny_qwen2_base), inputs=inputs), tmp_path / "m")
    want = PeftModel.from_pretrained(tiny_qwen2(), str(adapter)).merge_and_unload().state_dict()
    got = load_file(tmp_path / "m" / "model.safetensors")
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], atol=1e-6, rtol=1e-6)


def test_what_cannot_be_merged_besides_the_factors_is_refused_in_one_line(make_qwen2_adapter, tiny_qwen2_base,
                                                                          tmp_path):
    import subprocess

    from tests.merge.test_config import PLURIBUS

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(PLURIBUS), "merge", *args], capture_output=True, text=True)

    def one_line(res: subprocess.CompletedProcess) -> str:
        lines = [line for line in res.stderr.splitlines() if line.strip() and "gemm_4bit" not in line
                 and "warnings.warn" not in line]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        return lines[0]

    plain = make_qwen2_adapter(["q_proj"], seed=46)
    # trainable tokens: refused on purpose (each adapter stores the rows of its own token ids), by every method
    tokens = make_qwen2_adapter(["q_proj"], seed=47, trainable_token_indices=[3, 5])
    for method in ("ties", "task_arithmetic"):
        line = one_line(cli("--method", method, "--adapters", f"{tokens},{plain}", "-o", str(tmp_path / "t")))
        assert "trains trainable tokens (trainable_token_indices)" in line and "will not drop" in line
    # a lora_B bias on a layer without a bias (o_proj) has no place in a model of that architecture
    lora_bias = make_qwen2_adapter(["o_proj"], seed=48, lora_bias=True)
    line = one_line(cli("--method", "task_arithmetic", "--adapters", str(lora_bias), "--base", str(tiny_qwen2_base),
                        "--output", "model", "-o", str(tmp_path / "f")))
    assert "trains a lora_B bias on model.layers.0.self_attn.o_proj, whose layer has no bias" in line
    # full values without a base on this machine: no task vector can be formed
    biased = copy_adapter(make_qwen2_adapter(["q_proj"], seed=49, bias="lora_only"), tmp_path / "biased")
    cfg = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/not-here"}))
    line = one_line(cli("--method", "cat", "--adapters", str(biased), "-o", str(tmp_path / "b")))
    assert "its base 'org/not-here' is not on this machine; give the base model folder with base: (--base)" in line
    # one module whole in one adapter and LoRA-adapted in another
    saved = make_qwen2_adapter(["q_proj"], seed=50, modules_to_save=["o_proj"])
    line = one_line(cli("--method", "ties", "--adapters", f"{saved},{make_qwen2_adapter(['o_proj'], seed=51)}",
                        "-o", str(tmp_path / "s")))
    assert "saves module model.layers.0.self_attn.o_proj whole (modules_to_save) while another adapter trains" in line
    assert not any((tmp_path / n).exists() for n in "tfbs")


def test_folding_reports_what_the_stored_dtype_rounds_away_from_the_change(hetero, tiny_base, tmp_path):
    # the figure is measured, not assumed: exact in float32, and in bfloat16 the share of the change it loses
    exact = exact_sum(hetero[:1], [1.0])
    base = load_file(tiny_base / "model.safetensors")
    for out_dtype in ("float32", "bfloat16"):
        summary = run_merge(spec("task_arithmetic", hetero[:1], base=str(tiny_base), output="model",
                                 out_dtype=out_dtype), tmp_path / out_dtype)
        folded = load_file(tmp_path / out_dtype / "model.safetensors")
        num = den = 0.0
        for module, d in exact.items():
            want = base[f"{module}.weight"].double() + d
            num += float((folded[f"{module}.weight"].double() - want).pow(2).sum())
            den += float(d.pow(2).sum())
        assert summary.error == pytest.approx(math.sqrt(num / den), rel=1e-3, abs=1e-7)
        line = next(x for x in summary.lines() if x.startswith("relative error"))
        if out_dtype == "float32":
            assert summary.error < 1e-5 and "loses" not in line
        else:
            assert summary.error > 1e-4
    # a change bfloat16 rounds visibly away is said, with the way to keep it
    summary.error = 0.3
    assert "(rounding to the stored dtype loses 30% of the change; out_dtype: float32 keeps it)" in "".join(summary.lines())


@pytest.fixture(scope="module")
def three_rank16(make_adapter):
    """Three random rank-16 adapters on the same modules (issue 26: truncated to rank 16, 0.46 of the sum was lost)."""
    return [make_adapter(16, 32, ["q_proj", "v_proj"], seed=s) for s in (61, 62, 63)]


def _relative(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    num = sum(float((exact[k] - got[k]).pow(2).sum()) for k in exact)
    return math.sqrt(num / sum(float(v.pow(2).sum()) for v in exact.values()))


@pytest.mark.parametrize(("method", "weights", "scale"), [("task_arithmetic", [1.0, 1.0, 1.0], 1.0),
                                                          ("task_arithmetic", [1.0, -0.5, 2.0], 1.0),
                                                          ("linear", [1.0, 1.0, 1.0], 1 / 3)])
def test_a_method_named_for_a_sum_gives_the_sum_on_adapters(three_rank16, tmp_path, method, weights, scale):
    summary = run_merge(spec(method, three_rank16, weights), tmp_path / "m")
    exact = {k: v * scale for k, v in exact_sum(three_rank16, weights).items()}
    assert _relative(merged_deltas(tmp_path / "m"), exact) < 1e-5
    assert summary.ranks_out == [48] and summary.error < 1e-5  # the inputs' ranks summed: nothing truncated
    assert summary.note.startswith("exact: the inputs' ranks summed")
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"relative error vs the exact merge: {summary.error:.3e} (exact" in card


def test_a_truncated_sum_is_only_what_was_asked_and_says_its_error(three_rank16, tmp_path):
    summary = run_merge(spec("task_arithmetic", three_rank16, rank=16), tmp_path / "m")
    exact = exact_sum(three_rank16, [1.0] * 3)
    assert summary.ranks_out == [16] and summary.error > 0.1
    assert _relative(merged_deltas(tmp_path / "m"), exact) == pytest.approx(summary.error, rel=1e-3)
    assert summary.note == "the exact merge's best approximation at rank 16, as asked"
    line = f"relative error vs the exact merge: {summary.error:.3e} (the exact merge's best approximation at rank 16, as asked)"
    assert line in summary.lines() and line in (tmp_path / "m" / "README.md").read_text()
    record = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert record["error"] == summary.error and record["note"] == summary.note


@pytest.mark.parametrize("method", ["ties", "dare_ties", "pcb"])
def test_dense_methods_say_they_are_truncated_by_default(three_rank16, tmp_path, method):
    summary = run_merge(spec(method, three_rank16, seed=1, **options(method)), tmp_path / "m")
    assert summary.ranks_out == [16] and summary.error > 0.01  # the largest input rank, as PEFT's *_svd methods
    assert summary.note.startswith(f"{method} merges each module's dense delta; truncated to the largest input rank, "
                                   "16, by default")
