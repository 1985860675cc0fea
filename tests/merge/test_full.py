"""Streaming full-model merges: parity with `mergekit-yaml`, sharding, companions, atomicity and bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pluribus.errors import PluribusError
from pluribus.merge import MergeInput, MergeSpec, load_merge_config, run_merge
from pluribus.merge.checkpoint import Checkpoint
from tests.tiny import default_sigint

MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    return {n: ck.get(n).clone() for n in ck.tensors}


@pytest.fixture(scope="module")
def experts(make_expert):
    return [make_expert(11), make_expert(12), make_expert(13, scale=0.05)]


def mergekit_config(method: str, base: Path, experts: list[Path], dtype: str = "float32") -> dict:
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.3}, {"weight": 1.3, "density": 0.8}]
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, params, strict=True)],
        "parameters": {"lambda": 0.9},
        "dtype": dtype,
    }


@pytest.mark.slow
@pytest.mark.parametrize(("method", "dtype"), [("task_arithmetic", "float32"), ("ties", "float32"), ("ties", "bfloat16"),
                                              ("dare_ties", "float32"), ("dare_linear", "bfloat16")])
def test_parity_with_mergekit_yaml(method, dtype, tiny_base, experts, tmp_path):
    cfg = mergekit_config(method, tiny_base, experts, dtype)
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(cfg))
    # DARE: mergekit seeds torch's global generator; pluribus draws the same masks from its own (seed 0)
    res = subprocess.run([str(MERGEKIT), str(tmp_path / "mk.yaml"), str(tmp_path / "mergekit"), "--random-seed", "0"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    spec = load_merge_config(tmp_path / "mk.yaml")
    assert spec.method == method and spec.mergekit
    run_merge(spec, tmp_path / "ours")
    theirs, ours = tensors(tmp_path / "mergekit"), tensors(tmp_path / "ours")
    assert set(theirs) == set(ours)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == getattr(torch, dtype)
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)


def test_task_arithmetic_closed_form_sharded_with_index_and_companions(tiny_base, experts, tmp_path):
    spec = MergeSpec(method="task_arithmetic", base=str(tiny_base), shard_size="20KB", lam=0.5,
                     inputs=[MergeInput(path=str(e), weight=w) for e, w in zip(experts, [1.0, 2.0, -1.0], strict=True)])
    summary = run_merge(spec, tmp_path / "out")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert summary.details["shards"] == len(shards) > 1
    assert all((out / s).stat().st_size <= 20_000 + 4096 or len(load_file(out / s)) == 1 for s in shards)
    base = load_file(tiny_base / "model.safetensors")
    ins = [load_file(e / "model.safetensors") for e in experts]
    got = tensors(out)
    for name, b in base.items():
        expected = b + 0.5 * (1.0 * (ins[0][name] - b) + 2.0 * (ins[1][name] - b) - 1.0 * (ins[2][name] - b))
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for name in ("config.json", "README.md", "merge.yaml", "merge_report.json"):
        assert (out / name).is_file()
    assert "task_arithmetic" in (out / "README.md").read_text() and "lambda: 0.5" in (out / "merge.yaml").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # transformers reads the sharded output as is
    torch.testing.assert_close(model.model.norm.weight.detach(), got["model.norm.weight"])


def test_out_dtype_and_linear(tiny_base, experts, tmp_path):
    spec = MergeSpec(method="linear", base=str(tiny_base), out_dtype="bfloat16",
                     inputs=[MergeInput(path=str(e), weight=w) for e, w in zip(experts[:2], [1.0, 3.0], strict=True)])
    run_merge(spec, tmp_path / "out")
    got = tensors(tmp_path / "out")
    a, b = (load_file(e / "model.safetensors") for e in experts[:2])
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name].dtype == torch.bfloat16
    torch.testing.assert_close(got[name], ((a[name] + 3 * b[name]) / 4).bfloat16())
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_base_plus_adapter_input_is_merged_without_a_materialized_copy(tiny_base, experts, make_adapter, tmp_path):
    from peft import PeftModel

    from tests.merge.conftest import tiny_model

    adapter = make_adapter(4, 8, ["q_proj", "up_proj"], seed=21)
    spec = MergeSpec(method="task_arithmetic", base=str(tiny_base), inputs=[
        MergeInput(path=str(experts[0]), weight=0.5),
        MergeInput(path=str(tiny_base), adapter=str(adapter), weight=2.0),
    ])
    run_merge(spec, tmp_path / "ours")
    # reference: materialize base + adapter with PEFT, then plain task arithmetic
    merged = PeftModel.from_pretrained(tiny_model(), str(adapter)).merge_and_unload().state_dict()
    base, e0 = load_file(tiny_base / "model.safetensors"), load_file(experts[0] / "model.safetensors")
    got = tensors(tmp_path / "ours")
    for name, b in base.items():
        expected = b + 0.5 * (e0[name] - b) + 2.0 * (merged[name] - b)
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_pcb_full_merge_is_the_base_plus_the_papers_merge_per_tensor(tiny_base, experts, tmp_path):
    from tests.merge.test_methods import pcb_paper

    weights = [1.0, 0.6, 1.3]
    spec = MergeSpec(method="pcb", base=str(tiny_base), density=0.3, **{"lambda": 0.8},
                     inputs=[MergeInput(path=str(e), weight=w) for e, w in zip(experts, weights, strict=True)])
    run_merge(spec, tmp_path / "out")
    got = tensors(tmp_path / "out")
    base = load_file(tiny_base / "model.safetensors")
    ex = [load_file(e / "model.safetensors") for e in experts]
    for name, b in base.items():
        deltas = [e[name].double() - b.double() for e in ex]
        expected = b.double() + pcb_paper(deltas, 0.3, lam=0.8, weights=weights)
        torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_global_trimming_keeps_the_density_over_the_whole_model(tiny_base, experts, tmp_path):
    spec = MergeSpec(method="magnitude", base=str(tiny_base), trim="global", density=0.2,
                     inputs=[MergeInput(path=str(experts[2]))])
    run_merge(spec, tmp_path / "out")
    base, e = load_file(tiny_base / "model.safetensors"), load_file(experts[2] / "model.safetensors")
    got = tensors(tmp_path / "out")
    kept = sum(int((got[n] != base[n]).sum()) for n in base)
    total = sum(b.numel() for b in base.values())
    assert kept == round(0.2 * total)
    changed = torch.cat([(e[n] - base[n]).abs()[got[n] != base[n]] for n in base])
    dropped = torch.cat([(e[n] - base[n]).abs()[got[n] == base[n]] for n in base])
    assert float(changed.min()) >= float(dropped.max())


@pytest.mark.slow
def test_unimplemented_mergekit_methods_run_in_mergekit(tiny_base, experts, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": str(tiny_base), "dtype": "float32",
           "models": [{"model": str(tiny_base)}, {"model": str(experts[0])}], "parameters": {"t": 0.3}}
    (tmp_path / "slerp.yaml").write_text(yaml.safe_dump(cfg))
    spec = load_merge_config(tmp_path / "slerp.yaml")
    assert spec.method == "mergekit"
    summary = run_merge(spec, tmp_path / "out")
    assert summary.kind == "mergekit" and (tmp_path / "out" / "merge.yaml").is_file()
    assert "model.norm.weight" in tensors(tmp_path / "out")


# ------------------------------------------------------------------------------------------ bad input


def test_mismatched_shapes_and_tensors_are_named(tiny_base, experts, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    sd = load_file(experts[0] / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 40)
    save_file(sd, odd / "model.safetensors")
    spec = MergeSpec(method="ties", base=str(tiny_base), density=0.5,
                     inputs=[MergeInput(path=str(experts[1])), MergeInput(path=str(odd))])
    with pytest.raises(PluribusError, match=r"model\.layers\.1\.mlp\.down_proj\.weight is \(32, 48\) in base '.*' but \(32, 40\) in '.*odd'"):
        run_merge(spec, tmp_path / "out")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, odd / "model.safetensors")
    with pytest.raises(PluribusError, match=r"model '.*odd' lacks model\.layers\.1\.mlp\.down_proj\.weight"):
        run_merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_in_a_model_is_named_and_leaves_no_output(tiny_base, experts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(experts[0] / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"][3, 3] = float("inf")
    save_file(sd, bad / "model.safetensors")
    spec = MergeSpec(method="task_arithmetic", base=str(tiny_base), inputs=[MergeInput(path=str(bad))])
    with pytest.raises(PluribusError, match=r"bad:model\.layers\.0\.self_attn\.k_proj\.weight' holds 1 NaN/Inf"):
        run_merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the temp folder is gone too


def test_missing_corrupt_and_pickle_only_folders(tiny_base, experts, tmp_path):
    def spec_for(path: Path) -> MergeSpec:
        return MergeSpec(method="task_arithmetic", base=str(tiny_base), inputs=[MergeInput(path=str(path))])

    with pytest.raises(PluribusError, match="does not exist"):
        run_merge(spec_for(tmp_path / "nowhere"), tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(PluribusError, match="no .safetensors weights .*never reads pickle"):
        run_merge(spec_for(pickled), tmp_path / "out")
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (experts[0] / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PluribusError, match="truncated"):
        run_merge(spec_for(cut), tmp_path / "out")
    (cut / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(PluribusError, match="not a readable safetensors file"):
        run_merge(spec_for(cut), tmp_path / "out")
    with pytest.raises(PluribusError, match="needs `base`"):
        run_merge(MergeSpec(method="ties", inputs=[MergeInput(path=str(experts[0]))]), tmp_path / "out")
    with pytest.raises(PluribusError, match="merges adapters"):
        run_merge(MergeSpec(method="cat", base=str(tiny_base), inputs=[MergeInput(path=str(experts[0]))]),
                  tmp_path / "out")


def test_existing_output_refused_unless_overwrite(tiny_base, experts, tmp_path):
    (tmp_path / "out").mkdir()
    spec = MergeSpec(method="task_arithmetic", base=str(tiny_base), inputs=[MergeInput(path=str(experts[0]))])
    with pytest.raises(PluribusError, match="already exists; pass --overwrite"):
        run_merge(spec, tmp_path / "out")
    run_merge(spec, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_merge_terminated_midway_leaves_nothing(tiny_base, experts, tmp_path):
    out = tmp_path / "out"
    script = f"""
import sys, time
import pluribus.merge.full as F
from pluribus.cli import main
write = F.ShardedWriter.write
def slow(self, name, tensor):
    write(self, name, tensor)
    print("wrote", name, flush=True)
    time.sleep(0.3)
F.ShardedWriter.write = slow
sys.argv = ["pluribus", "merge", "--method", "ties", "--base", {str(tiny_base)!r}, "--density", "0.5",
            "--models", {str(experts[0]) + "," + str(experts[1])!r}, "-o", {str(out)!r}]
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(2):
        line = proc.stdout.readline()
        assert line.startswith("wrote"), (line, proc.stderr.read() if proc.poll() is not None else "")
    proc.terminate()  # SIGTERM
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_a_merge_killed_midway_leaves_no_output_folder(tiny_base, experts, tmp_path):
    out = tmp_path / "out"
    script = f"""
import time
import pluribus.merge.full as F
from pluribus.merge import MergeInput, MergeSpec, run_merge
write = F.ShardedWriter.write
def slow(self, name, tensor):  # slow the writes down so the kill lands mid-merge
    write(self, name, tensor)
    print("wrote", name, flush=True)
    time.sleep(0.3)
F.ShardedWriter.write = slow
run_merge(MergeSpec(method="ties", base={str(tiny_base)!r}, density=0.5,
          inputs=[MergeInput(path={str(experts[0])!r}), MergeInput(path={str(experts[1])!r})]), {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for _ in range(3):
        assert proc.stdout.readline().startswith("wrote")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(left) == 1 and left[0].is_dir()  # only the killed writer's hidden temp folder remains
    # a live writer's temp folder (here: our parent process) must survive the next run's clean-up
    live = tmp_path / f".out.{socket.gethostname()}-{os.getppid()}.x.tmp"
    live.mkdir()
    run_merge(MergeSpec(method="ties", base=str(tiny_base), density=0.5,
                        inputs=[MergeInput(path=str(experts[0])), MergeInput(path=str(experts[1]))]), out)
    assert (out / "model.safetensors").is_file() and live.is_dir()
    assert not left[0].exists()  # the next merge to the same output removed the dead writer's leftovers


@pytest.mark.slow
def test_mergekit_fallback_reads_relative_local_paths_from_the_cwd(tiny_base, experts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, src in (("base", tiny_base), ("e0", experts[0]), ("e1", experts[1])):
        (tmp_path / name).symlink_to(src)
    cfg = {"merge_method": "ties", "base_model": "base", "dtype": "float32",  # a gradient: mergekit runs it
           "models": [{"model": "e0", "parameters": {"weight": [1.0, 0.5], "density": 0.5}},
                      {"model": "e1", "parameters": {"weight": 1.0, "density": 0.5}}]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(cfg))
    summary = run_merge(load_merge_config("mk.yaml"), "out")
    assert summary.kind == "mergekit" and "model.norm.weight" in tensors(tmp_path / "out")
    cfg["models"][1]["model"] = "e2"
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PluribusError, match=r"models\.1\.model 'e2' does not exist"):
        run_merge(load_merge_config("mk.yaml"), "out2")
    assert not (tmp_path / "out2").exists()


def test_adapters_of_another_same_shaped_base_and_broken_base_configs_are_refused(tiny_base, experts, make_adapter,
                                                                                    tmp_path):
    import shutil

    adapter = make_adapter(2, 4, ["q_proj"], seed=41)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    # as after training on tiny_base (PEFT records the model's name_or_path, None for a model built in memory)
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(tiny_base)}))
    copy, other, listed = tmp_path / "copy", tmp_path / "other", tmp_path / "listed"
    for folder in (copy, other, listed):
        shutil.copytree(tiny_base, folder)
    config = json.loads((tiny_base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))  # same shapes, another model
    (listed / "config.json").write_text("[1]")

    def fold(base: Path) -> MergeSpec:
        return MergeSpec(method="linear", base=str(base), output="model", inputs=[MergeInput(path=str(adapter))])

    run_merge(fold(copy), tmp_path / "ok")  # a copy of the recorded base is that base
    with pytest.raises(PluribusError, match=r"adapter '.*' was trained on base '.*', but the model is '.*other'"):
        run_merge(fold(other), tmp_path / "out")
    plus = MergeSpec(method="task_arithmetic", base=str(tiny_base),
                     inputs=[MergeInput(path=str(experts[0])), MergeInput(path=str(other), adapter=str(adapter))])
    with pytest.raises(PluribusError, match=r"was trained on base .*other"):
        run_merge(plus, tmp_path / "out")
    run_merge(fold(other).model_copy(update={"check_base": False}), tmp_path / "unchecked")  # the way out
    # a fine-tune of the recorded base has its config.json: its weights tell them apart
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(experts[0])}))
    with pytest.raises(PluribusError, match=r"was trained on base .*, whose weights differ from the model .* --no-check"):
        run_merge(fold(tiny_base), tmp_path / "out")
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(tiny_base)}))
    for spec in (fold(listed), MergeSpec(method="task_arithmetic", base=str(listed),
                                         inputs=[MergeInput(path=str(experts[0]))])):
        with pytest.raises(PluribusError, match=r"^model config '.*listed/config\.json' is not a JSON object"):
            run_merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_non_finite_lambda_is_refused_before_anything_is_written(tiny_base, experts, tmp_path):
    res = subprocess.run([str(MERGEKIT.with_name("pluribus")), "merge", "--method", "task_arithmetic", "--models",
                          f"{experts[0]},{experts[1]}", "--base", str(tiny_base), "--lambda", "nan",
                          "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 2 and "lambda must be a finite number (got nan)" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def _della(tiny_base: Path, experts: list[Path]) -> MergeSpec:
    return MergeSpec(method="mergekit", seed=7, mergekit_yaml={
        "merge_method": "della", "base_model": str(tiny_base), "dtype": "float32",
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}} for e in experts[:2]],
    })


def test_the_seed_is_passed_to_mergekit(tiny_base, experts, tmp_path, monkeypatch):
    import pluribus.merge as PM

    seen = []

    def fake_run(argv, **kw):
        seen.append(argv)
        Path(argv[2], "model.safetensors").write_bytes(b"")
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(PM.subprocess, "run", fake_run)
    run_merge(_della(tiny_base, experts), tmp_path / "out")
    assert seen[0][-2:] == ["--random-seed", "7"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waits to be reaped but runs nothing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_merge_kills_its_mergekit_child_and_the_next_run_removes_its_folders(tiny_base, experts, tmp_path):
    # a stand-in mergekit-yaml that records its pid and runs until killed (exec: the pid stays the sleeper's)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mergekit-yaml").write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'child.pid'}\nexec sleep 120\n")
    (fake / "mergekit-yaml").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    script = f"""
import sys
sys.executable = {str(fake / "python")!r}  # where pluribus looks for mergekit-yaml
from pluribus.merge import run_merge
from tests.merge.test_full import _della
from pathlib import Path
run_merge(_della(Path({str(tiny_base)!r}), [Path({str(experts[0])!r}), Path({str(experts[1])!r})]), {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "mergekit-yaml outlived the killed merge"
    left = sorted(p.name for p in work.iterdir())
    assert len(left) == 2 and all(n.startswith(".out.") for n in left)  # the output's and the config's temp folders
    run_merge(MergeSpec(method="task_arithmetic", base=str(tiny_base), inputs=[MergeInput(path=str(experts[0]))]), out)
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_ctrl_c_of_a_merge_says_a_rerun_starts_over(tiny_base, experts, tmp_path):
    out = tmp_path / "out"
    script = f"""
import sys, time
import pluribus.merge.full as F
from pluribus.cli import main
write = F.ShardedWriter.write
def slow(self, name, tensor):
    write(self, name, tensor)
    print("wrote", name, flush=True)
    time.sleep(0.3)
F.ShardedWriter.write = slow
sys.argv = ["pluribus", "merge", "--method", "task_arithmetic", "--base", {str(tiny_base)!r},
            "--models", {str(experts[0])!r}, "-o", {str(out)!r}]
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2], preexec_fn=default_sigint)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("wrote")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "a rerun starts it over" in err and "resumes" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_integer_tensor_an_expert_changed_is_refused_not_dropped(tiny_base, experts, tmp_path):
    from pluribus.merge.extract import extract_lora

    def with_step(src: Path, dst: Path, step: int) -> Path:
        dst.mkdir()
        sd = load_file(src / "model.safetensors")
        save_file({**sd, "model.step": torch.tensor([step])}, dst / "model.safetensors")
        (dst / "config.json").write_text((src / "config.json").read_text())
        return dst

    base, same, changed = (with_step(tiny_base, tmp_path / "b", 0), with_step(experts[0], tmp_path / "e0", 0),
                           with_step(experts[1], tmp_path / "e1", 7))
    run_merge(MergeSpec(method="ties", base=str(base), density=0.5, inputs=[MergeInput(path=str(same))]),
              tmp_path / "ok")
    with pytest.raises(PluribusError, match=r"tensor model.step \(torch.int64\) of '.*e1' differs from the base's"):
        run_merge(MergeSpec(method="ties", base=str(base), density=0.5,
                            inputs=[MergeInput(path=str(same)), MergeInput(path=str(changed))]), tmp_path / "out")
    with pytest.raises(PluribusError, match=r"tensor model.step \(torch.int64\) differs between .* will not drop it"):
        extract_lora(base, changed, tmp_path / "lora", rank=2)
    assert not (tmp_path / "out").exists() and not (tmp_path / "lora").exists()
