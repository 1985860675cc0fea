"""The device policy (pluribus.device): what ``auto`` means here, refusals, the dtype rule, and that every loader
places its model where the policy says.

On a CPU-only machine a loader that ignored the policy would still land on the CPU, where the policy's answer
is too; so the placement tests swap in a policy that answers ``meta`` (a real torch device that holds shapes
only) for every setting and records which settings it was asked: a loader that bypassed it leaves its model
on the CPU, and one that asked with the wrong setting shows in the record. A static check beside them keeps
new loaders from moving models themselves.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pluribus import device as devices
from pluribus.config import AgentConfig, validate_recipe
from pluribus.errors import PluribusError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pluribus"
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


@pytest.fixture
def meta_policy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The policy answers ``meta`` for every setting; the list collects the settings it was asked."""
    asked: list[str] = []

    def resolve(setting: str | None = None) -> torch.device:
        asked.append(setting or "auto")
        return torch.device("meta")

    monkeypatch.setattr(devices, "resolve", resolve)
    return asked


def _on(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


# ---------------------------------------------------------------------------------------------- settings


@needs_no_gpu
def test_auto_resolves_to_the_cpu_here() -> None:
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve(None) == torch.device("cpu")
    assert devices.resolve(devices.pick(None, None)) == torch.device("cpu")
    assert validate_recipe({}).device == "auto"


@needs_no_gpu
@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_is_refused_without_a_gpu(setting: str) -> None:
    with pytest.raises(PluribusError, match=f"device '{setting}' was asked for, but torch sees no CUDA GPU"):
        devices.resolve(setting)


def test_settings_are_checked_where_the_recipe_is_read() -> None:
    with pytest.raises(PluribusError, match="'gpu' is not a device; use auto, cpu, cuda or cuda:N"):
        validate_recipe({"device": "gpu"})
    with pytest.raises(PluribusError, match="team.agents.0.device"):
        validate_recipe({"team": {"agents": [{"device": "cuda:x"}]}})
    recipe = validate_recipe({"device": "cpu", "team": {"agents": [{"device": "cuda:1"}]},
                              "eval": {"device": "cuda"}, "train": {"objective": "rl", "rl": {"prm_device": "cpu"}}})
    assert (recipe.device, recipe.team.agents[0].device, recipe.eval.device, recipe.train.rl.prm_device) == \
        ("cpu", "cuda:1", "cuda", "cpu")
    assert devices.pick("cuda:1", "cpu") == "cuda:1" and devices.pick(None, "cpu") == "cpu"
    with pytest.raises(PluribusError, match="the backend is vllm, which places its own"):
        validate_recipe({"team": {"agents": [{"backend": "vllm", "device": "cuda:1"}]}})
    with pytest.raises(PluribusError, match="remove eval.device"):
        validate_recipe({"team": {"agents": [{"backend": "vllm"}]}, "eval": {"device": "cpu"}})


def test_device_settings_orphan_no_store() -> None:
    """Where a part runs is not what it computes: the hashes that key stores and stage freshness leave it out."""
    from pluribus.config import without_engine_settings

    a = validate_recipe({"team": {"agents": [{"device": "cuda:1"}]}, "train": {"rl": {"prm_device": "cpu"}}})
    b = validate_recipe({"team": {"agents": [{}]}})
    assert (without_engine_settings(a.team.model_dump(mode="json"))
            == without_engine_settings(b.team.model_dump(mode="json")))
    assert "prm_device" not in json.dumps(without_engine_settings(a.train.model_dump(mode="json")))


def test_dtype_follows_what_the_device_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    native = devices.supports_bf16(cpu)
    assert devices.dtype_for(cpu, "bfloat16") == (torch.bfloat16 if native else torch.float32)
    assert devices.dtype_for(cpu, "auto") == devices.dtype_for(cpu, torch.bfloat16)
    assert devices.dtype_for(cpu, "float32") == torch.float32
    assert devices.dtype_for(cpu, "float16") == torch.float16  # asked for by name: kept
    monkeypatch.setattr(devices, "supports_bf16", lambda device: False)  # a CPU without AVX512-BF16 / AMX
    assert devices.dtype_for(cpu, "bfloat16") == torch.float32
    assert devices.dtype_for(cpu, "auto") == torch.float32


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "pluribus.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@needs_no_gpu
def test_a_recipe_naming_cuda_is_refused_with_exit_2_before_any_output(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "root": str(tmp_path / "runs"), "device": "cuda",
                                      "task": {"n": 2}, "team": {"agents": [{}]}}))
    for args in (["debate", str(recipe)], ["run", str(recipe)], ["debate", str(recipe), "device=cpu",
                                                                  "team.agents.0.device=cuda:1"]):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "was asked for, but torch sees no CUDA GPU" in lines[0], proc.stderr
        assert "set device: cpu or auto" in lines[0]
    assert "team.agents.0.device" in lines[0]
    proc = _cli("debate", str(recipe), "device=cpu", "--device", "cuda:0", cwd=tmp_path)  # --device: the override
    assert proc.returncode == 2 and "device 'cuda:0' was asked for" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- placement


def test_generation_backends_land_where_the_policy_says(meta_policy: list[str], tiny_llama_dir: Path) -> None:
    from pluribus.data.backends import make_backend

    backend = make_backend(AgentConfig(model=str(tiny_llama_dir), dtype="float32"), device="cuda")
    assert _on(backend.model) == {"meta"} and backend.where == {"device": "meta", "dtype": "float32"}
    assert meta_policy == ["cuda"]  # the caller's (the recipe's) setting, for an agent that names none
    make_backend(AgentConfig(model=str(tiny_llama_dir), dtype="float32", device="cuda:1"), device="cpu")
    assert meta_policy[-1] == "cuda:1"  # the agent's own wins


def test_load_model_places_the_adapter_with_its_base(meta_policy: list[str], tiny_llama_dir: Path,
                                                     tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pluribus.models import load_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    model, _ = load_model(tiny_llama_dir, dtype=torch.float32, adapter=tmp_path / "a", device="cuda")
    assert meta_policy == ["cuda"] and _on(model) == {"meta"}  # the LoRA weights too


def test_the_prm_lands_where_the_policy_says(meta_policy: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from pluribus.distill.prm import load_prm
    from pluribus.distill.student import score_head_model

    model = score_head_model(tiny_llama_dir, dtype=torch.float32)
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="TOKEN_CLS")
    get_peft_model(model, lora).save_pretrained(tmp_path / "prm")
    prm = load_prm(tmp_path / "prm", device="cuda:2")
    assert meta_policy == ["cuda:2"] and _on(prm.model) == {"meta"}  # the score head and the LoRA with the base


def test_the_teams_verifier_lands_where_the_recipe_says(meta_policy: list[str], tiny_llama_dir: Path,
                                                         tmp_path: Path) -> None:
    """A team that aggregates with a PRM loads it through the recipe's device, not the machine's default."""
    from peft import LoraConfig, get_peft_model

    from pluribus.config import Recipe
    from pluribus.distill.student import score_head_model
    from pluribus.stages.debate import load_verifier

    model = score_head_model(tiny_llama_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="TOKEN_CLS")).save_pretrained(
        tmp_path / "prm")
    recipe = Recipe(name="v", root=str(tmp_path), device="cuda:3",
                    team={"aggregation": "prm_best", "verifier": str(tmp_path / "prm")})
    scorer = load_verifier(recipe)
    assert meta_policy == ["cuda:3"] and _on(scorer.prm.model) == {"meta"}


@pytest.mark.parametrize("head", ["causal", "token-cls"])
def test_the_student_lands_where_the_policy_says(meta_policy: list[str], tiny_llama_dir: Path, head: str) -> None:
    """Before its kernels are patched and its attention chosen (both look at where it is), not at the Trainer."""
    from pluribus.config import TrainConfig
    from pluribus.distill.student import load_student

    model, _ = load_student(TrainConfig(model=str(tiny_llama_dir)), head=head, device="cuda")
    assert meta_policy == ["cuda"] and _on(model) == {"meta"}


def test_training_is_told_the_policys_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a machine with a GPU, a recipe that says cpu trains on the CPU: the Trainer is told so (use_cpu), and
    the policy's answer decides bf16. Before the policy, training took the GPU whenever there was one."""
    from pluribus.config import TrainConfig
    from pluribus.distill.loop import training_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = training_arguments(TrainConfig(), tmp_path, seed=0, has_eval=False,
                              device=devices.training_device("cpu"))
    assert args.use_cpu and args.device.type == "cpu"
    assert args.bf16 == devices.supports_bf16(torch.device("cpu"))


def test_training_refuses_a_gpu_it_cannot_honour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "resolve", lambda setting=None: torch.device(setting or "cpu"))
    with pytest.raises(PluribusError, match="CUDA_VISIBLE_DEVICES=1 and device: cuda"):
        devices.training_device("cuda:1")
    with pytest.raises(PluribusError, match="runs in 2 processes"):
        devices.training_device("cuda:1", processes=2)
    assert devices.training_device("cuda:0") == torch.device("cuda:0")


def test_where_names_the_compute_dtype(tiny_llama_dir: Path) -> None:
    from pluribus.models import load_model

    model, _ = load_model(tiny_llama_dir, dtype=torch.float32, device="cpu")
    assert devices.where(model) == {"device": "cpu", "dtype": "float32"}
    assert devices.ran_on({"a": {"device": "cpu", "dtype": "float32"}, "b": {"device": "cpu", "dtype": "float32"},
                           "j": {"device": "server"}}) == "a, b: cpu float32; j: server"


def test_a_fold_computes_on_the_policys_device(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path,
                                               tmp_path: Path) -> None:
    """Folding adapters into a model asks the policy with the merge's setting and says where it ran; a merge
    that does not fold refuses an explicit --device rather than ignoring it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pluribus.merge import run_merge
    from pluribus.merge.config import parse_merge_config

    asked: list[str | None] = []
    monkeypatch.setattr(devices, "resolve", lambda setting=None: asked.append(setting) or torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "a")
    spec = parse_merge_config({"method": "linear", "inputs": [{"path": str(tmp_path / "a")}],
                               "base": str(tiny_llama_dir), "output": "model"})
    summary = run_merge(spec, tmp_path / "out", device="cuda:3")
    assert asked == ["cuda:3"] and summary.ran_on == "cpu (folding)" and "ran on cpu (folding)" in summary.lines()
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["ran_on"] == "cpu (folding)"


# ---------------------------------------------------------------------------------------------- static check

# Functions that load a model without placing it, and why that is right.
UNPLACED = {
    ("distill/student.py", "score_head_model"): "a loader's helper: load_student and load_prm place its model",
    ("gguf.py", "dequantize_gguf"): "converts a GGUF file into a safetensors folder; the model never runs",
}
LOADS = ("from_pretrained", "from_config", "score_head_model")
# Files that may ask torch about CUDA or name a CUDA device themselves, and why.
CUDA_ASKED = {
    "threads.py": "the CPU thread default, not where a model runs",
    "distill/student.py": "the policy's bare cuda is this process's GPU (LOCAL_RANK), where its Trainer trains",
}


def _calls(func: ast.AST) -> list[tuple[str, str]]:
    """(receiver, name) of every call in ``func``: ``AutoModel.from_pretrained`` -> ("AutoModel", ...)."""
    out = []
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                out.append((ast.unparse(f.value), f.attr))
            elif isinstance(f, ast.Name):
                out.append(("", f.id))
    return out


def test_no_loader_bypasses_the_device_policy() -> None:
    """Every function in pluribus/ that loads a model (``<any model class>.from_pretrained`` / ``from_config``,
    ``score_head_model``) places it with ``pluribus.device.place`` or is listed in UNPLACED with its reason;
    nothing outside pluribus/device.py moves a model (``<model>.to(...)``, ``.cuda()``) or picks a CUDA device
    itself (``torch.cuda.is_available()``, a ``"cuda"`` argument) but CUDA_ASKED, and only the QLoRA loader sets
    a ``device_map`` (from the policy)."""
    problems = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE).as_posix()
        if rel == "device.py":
            continue
        tree = ast.parse(file.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            calls = _calls(func)
            # any receiver but a tokenizer, a config or PEFT (which puts an adapter on a model already placed)
            loads = [c for c in calls if c[1] in LOADS and not re.search(r"Tokenizer|Config|Peft|Processor", c[0])]
            placed = any(name == "place" for _, name in calls)
            if loads and not placed and (rel, func.name) not in UNPLACED:
                problems.append(f"{rel}:{func.name} loads a model ({loads[0][0]}.{loads[0][1]}) without "
                                "pluribus.device.place")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = ast.unparse(node.func.value)
                if node.func.attr == "cuda" or (node.func.attr == "to" and "model" in receiver.lower()):
                    problems.append(f"{rel}:{node.lineno} moves a model itself ({receiver}.{node.func.attr})")
            asks = (isinstance(node, ast.Attribute) and node.attr in ("is_available", "device_count")
                    and ast.unparse(node.value).endswith("cuda"))
            if isinstance(node, ast.Call) and rel not in CUDA_ASKED:
                asks = asks or any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                   and a.value.startswith("cuda") for a in [*node.args, *(k.value for k in node.keywords)])
            if asks and rel not in CUDA_ASKED:
                problems.append(f"{rel}:{node.lineno} picks a CUDA device itself, not through pluribus.device")
            named = (node.arg if isinstance(node, ast.keyword) else node.value if isinstance(node, ast.Constant)
                     else None)
            if named == "device_map" and rel != "distill/student.py":
                problems.append(f"{rel}:{node.lineno} sets a device_map outside the QLoRA loader")
    assert not problems, "\n".join(problems)
    for (rel, name), _why in UNPLACED.items():  # the exceptions still exist (a rename must update them)
        assert f"def {name}(" in (PACKAGE / rel).read_text()
    for rel in CUDA_ASKED:
        assert "cuda" in (PACKAGE / rel).read_text()


def test_the_debate_records_where_it_ran(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from pluribus.stages.debate import run_debate

    recipe = validate_recipe({"name": "r", "root": str(tmp_path), "device": "cpu", "task": {"n": 2},
                              "team": {"rounds": 1, "agents": [{"name": "x", "model": str(tiny_llama_dir),
                                                                "dtype": "float32",
                                                                "sampling": {"max_new_tokens": 4}}]}})
    summary = run_debate(recipe, progress=False)
    assert summary.ran_on == "x: cpu float32" and ("ran on (this run)", "x: cpu float32") in summary.rows()
    record = json.loads((recipe.layout.trajectories() / "devices.json").read_text())
    assert record["stage"] == "debate" and record["parts"] == {"x": {"device": "cpu", "dtype": "float32"}}
    assert run_debate(recipe, progress=False).ran_on == ""  # a resume that generated nothing ran nowhere
