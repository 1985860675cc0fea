"""`pluribus train` in two processes (`accelerate launch`, DDP on gloo, CPU): it finishes, equals one process with
the same global batch, rank 0 alone writes, `--resume` continues; a launch that quietly runs one process is refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pluribus.config import load_recipe
from pluribus.distill.distributed import check_launch
from pluribus.distill.output import save_output
from pluribus.errors import PluribusError
from pluribus.stages.train import train_stage
from tests.distill.conftest import read_record, synthetic_problems, write_parquet

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
EXPERTS = ("rsft", "prm", "rl")
# float32 training, two optimizer steps at lr 1e-3: one process and two differ only in the order of float sums
# (DDP's gradient all-reduce, two packed rows instead of one); measured here at most 1e-7 to 1e-6 per weight
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run(root: Path, student_dir: Path, **train) -> Path:
    """A recipe with three experts (rsft, prm, rl guided by that prm) and their datasets in its run folder."""
    problems = synthetic_problems(16)
    rsft = [{"messages": [{"role": "user", "content": p["question"]},
                          {"role": "assistant", "content": "\n".join(p["steps"])}],
             "problem_id": p["id"], "agent": "agent0", "round": 0} for p in problems]
    process = [{"prompt": p["question"], "completions": p["steps"], "labels": [True, i % 2 == 0, i % 2 == 0],
                "problem_id": p["id"], "answer": p["answer"]} for i, p in enumerate(problems)]
    write_parquet(rsft, root / "ddp" / "datasets" / "rsft")
    write_parquet(process, root / "ddp" / "datasets" / "process")
    settings = {"model": str(student_dir), "kernels": "torch", "bf16": False, "lr": 1e-3, "scheduler": "constant",
                "warmup_ratio": 0.0, "max_steps": 2, "batch_size": 2, "logging_steps": 1, "save_steps": 1,
                "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4},
                "rl": {"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 8, "kl": 0.05},
                "experts": [{"objective": "rsft"}, {"objective": "prm"}, {"name": "rl", "objective": "rl"}], **train}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "ddp", "root": str(root), "seed": 3, "train": settings}))
    return path


def launch(recipe: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N -m pluribus.cli train RECIPE ARGS` (torchrun; on a CPU
    machine the trainer joins a gloo group)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "pluribus.cli", "train", str(recipe), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def adapter_gap(a: Path, b: Path) -> float:
    """The largest absolute difference between the weights of two adapter folders (same tensors required)."""
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def update_size(folder: Path) -> float:
    """The largest |B| of an adapter: LoRA B starts at zero, so this is how far training moved it."""
    w = load_file(folder / "adapter_model.safetensors")
    return max(float(t.abs().max()) for k, t in w.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def student_without_dropout(tmp_path_factory, student_dir) -> Path:
    """The tiny student with the PRM head's dropout off (transformers' default is 0.1): dropout draws its masks
    per process, so with it one process and two train on different masks."""
    folder = tmp_path_factory.mktemp("student")
    shutil.copytree(student_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.0}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, student_without_dropout):
    """The three experts trained in two processes, then the same recipe in one process with grad_accum=2 (the
    same global batch), in-process; then the rsft expert resumed to step 3 in two processes and in one."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    launched = launch(write_run(two, student_without_dropout), "--all")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    adapters = two / "ddp" / "adapters"
    shutil.copytree(adapters / "rsft", two / "rsft-2")  # the resume below replaces the adapter in place
    recipe_one = load_recipe(write_run(one, student_without_dropout), ["train.grad_accum=2"])
    for name in EXPERTS:
        train_stage(recipe_one, expert=name)
    resumed = launch(two / "recipe.yaml", "--expert", "rsft", "--resume", "train.experts.0.max_steps=3")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    recipe_three = load_recipe(one / "recipe.yaml", ["train.grad_accum=2", "train.experts.0.max_steps=3"])
    train_stage(recipe_three, expert="rsft", out=one / "rsft-3")
    return {"two": adapters, "two2": two / "rsft-2", "one": one / "ddp" / "adapters", "one3": one / "rsft-3",
            "stdout": launched.stdout, "resumed": resumed.stdout}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("expert", EXPERTS)
def test_two_processes_equal_one_with_the_same_global_batch(runs, expert):
    two, one = runs["two2"] if expert == "rsft" else runs["two"] / expert, runs["one"] / expert
    gap, moved = adapter_gap(two, one), update_size(one)
    print(f"{expert}: max |two - one| = {gap:.3g}, max |B| = {moved:.3g}")
    assert moved > 100 * TOLERANCE  # the adapter did move: the comparison is not of two untrained adapters
    assert gap < TOLERANCE
    r2, r1 = read_record(two), read_record(one)
    assert (r2["processes"], r1["processes"]) == (2, 1)
    assert r2["metrics"]["train_loss"] == pytest.approx(r1["metrics"]["train_loss"], rel=1e-4)
    if expert == "rl":  # every logged figure is over both processes' prompts
        for key in ("final_reward", "final_accuracy", "final_kl", "final_prm_score"):
            assert r2["metrics"][key] == pytest.approx(r1["metrics"][key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.integration
def test_rank_zero_alone_writes_and_prints(runs):
    # one summary per expert (rank 1 prints none), one adapter folder each and no writer's leftovers
    assert [line.split()[1] for line in runs["stdout"].splitlines() if line.startswith("adapter:")] == [
        str(runs["two"] / e) for e in EXPERTS]
    names = sorted(p.name for p in runs["two"].iterdir())
    assert names == sorted([*EXPERTS, *(f"{e}.checkpoints" for e in EXPERTS)])
    assert sorted(p.name for p in (runs["two"] / "rsft.checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.slow
@pytest.mark.integration
def test_resume_in_two_processes_continues_the_run(runs):
    resumed = runs["two"] / "rsft"
    assert read_record(resumed)["metrics"]["train_loss_steps"] == 3  # the whole run's loss, steps 1-3
    gap = adapter_gap(resumed, runs["one3"])
    print(f"rsft resumed to step 3: max |two - one| = {gap:.3g}")
    assert gap < TOLERANCE
    assert adapter_gap(resumed, runs["two2"]) > 100 * TOLERANCE  # step 3 did train


def test_save_output_writes_on_rank_zero_only(tmp_path, student_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("RANK", "1")  # no process group: the barrier has nothing to wait for
    out = save_output(object(), AutoTokenizer.from_pretrained(student_dir), tmp_path / "adapter", {})
    assert out == tmp_path / "adapter" and not out.exists() and not any(tmp_path.iterdir())


def test_a_launch_that_quietly_runs_one_process_is_refused(monkeypatch):
    # what `accelerate launch --num_processes 2` leaves in its single process on a machine without a GPU
    for var in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(PluribusError, match=r"started only this one.*--multi_gpu --num_processes N.*torchrun"):
        check_launch()
    monkeypatch.delenv("MASTER_ADDR")  # a one-process `accelerate launch` is fine
    check_launch()


def test_other_commands_refuse_several_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["pluribus", "debate", str(tmp_path / "r.yaml")])
    from pluribus.cli import main

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2


@pytest.mark.slow
@pytest.mark.integration
def test_quiet_single_process_launch_end_to_end(tmp_path, student_dir):
    """The real `accelerate launch --num_processes 2` on a machine without a GPU: refused, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("with GPUs accelerate does start several processes")
    recipe = write_run(tmp_path, student_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([str(ACCELERATE), "launch", "--num_processes", "2", "--main_process_port",
                           str(free_port()), "-m", "pluribus.cli", "train", str(recipe), "--expert", "rsft"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "started only this one" in done.stderr
    assert not (tmp_path / "ddp" / "adapters").exists()


@pytest.mark.parametrize(("var", "engine"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")])
def test_an_engine_accelerate_did_not_set_up_is_refused(monkeypatch, var, engine):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pluribus.distill.distributed import check_engine

    monkeypatch.setenv(var, "true")  # what `accelerate launch --config_file configs/accelerate/...` exports
    with pytest.raises(PluribusError, match=rf"asks for {engine}, but accelerate set this training up as MULTI_CPU"):
        check_engine(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # what it does on CPU for FSDP
    check_engine(SimpleNamespace(distributed_type=getattr(DistributedType, engine)))
