"""The GPU recipe validates as `pluribus config` reads it, and its CPU twin (run end to end by tests/vllm) has its
structure: every setting of the GPU recipe, the same backends, trainings and eval systems."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "configs" / "gpu-qwen3-gsm8k.yaml"
TWIN = REPO / "configs" / "gpu-qwen3-gsm8k-cpu-twin.yaml"


def _paths(node, prefix=""):
    """Every dotted key path of a YAML tree (list items by index)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}"
            yield from _paths(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, dict | list):
                yield from _paths(v, f"{prefix}{i}.")


def test_pluribus_config_validates_the_gpu_recipe():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pluribus.cli", "config", str(GPU)], capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert [a["backend"] for a in shown["team"]["agents"]] == ["vllm"] * 3
    assert shown["train"]["experts"][2]["rl"]["backend"] == "vllm"


def test_the_cpu_twin_has_the_gpu_recipes_structure():
    gpu, twin = yaml.safe_load(GPU.read_text()), yaml.safe_load(TWIN.read_text())
    missing = sorted(set(_paths(gpu)) - set(_paths(twin)))
    assert not missing, f"the CPU twin lacks {missing}"
    assert [a["backend"] for a in twin["team"]["agents"]] == [a["backend"] for a in gpu["team"]["agents"]]
    assert twin["build"]["completer"]["backend"] == gpu["build"]["completer"]["backend"] == "vllm"
    assert twin["build"]["kinds"] == gpu["build"]["kinds"]
    strip = ("objective", "name", "init_adapter")
    assert ([{k: e.get(k) for k in strip} for e in twin["train"]["experts"]]
            == [{k: e.get(k) for k in strip} for e in gpu["train"]["experts"]])
    assert twin["train"]["experts"][2]["rl"]["backend"] == "vllm"
    assert twin["eval"]["systems"] == gpu["eval"]["systems"]
    for key in ("rounds", "topology", "aggregation"):
        assert twin["team"][key] == gpu["team"][key]
