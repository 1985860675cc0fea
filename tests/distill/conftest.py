"""Fixtures for the trainer tests: a tiny random causal LM with a chat template, and small synthetic datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _build_tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pluribus.models import EMBEDDED, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def student_dir(request, tmp_path_factory) -> Path:
    """The lead's ``tiny_llama_dir`` when tests/conftest.py provides it, else a tiny Llama built here."""
    try:
        return Path(request.getfixturevalue("tiny_llama_dir"))
    except pytest.FixtureLookupError:
        return _build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def other_student_dir(tmp_path_factory) -> Path:
    """A second tiny base (same shapes, other folder) for the resume-from-another-base test."""
    return _build_tiny_llama(tmp_path_factory.mktemp("other_llama"))


def synthetic_problems(n: int, seed: int = 0) -> list[dict]:
    """Small multi-step arithmetic problems with gold steps, in the synthetic task's spirit."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        steps = [f"{a} + {b} = {a + b}.", f"{a + b} * {c} = {(a + b) * c}.", f"The answer is {(a + b) * c}."]
        out.append({"id": f"p{i}", "question": f"What is ({a} + {b}) * {c}?", "answer": str((a + b) * c),
                    "steps": steps})
    return out


def write_parquet(rows: list[dict], folder: Path) -> Path:
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(folder / "data.parquet"))
    return folder


@pytest.fixture()
def rsft_dir(tmp_path) -> Path:
    rows = [{"messages": [{"role": "user", "content": p["question"]},
                          {"role": "assistant", "content": "\n".join(p["steps"])}],
             "problem_id": p["id"], "agent": "agent0", "round": 0} for p in synthetic_problems(24)]
    return write_parquet(rows, tmp_path / "datasets" / "rsft")


@pytest.fixture()
def augmented_dir(tmp_path) -> Path:
    rows = []
    for i, p in enumerate(synthetic_problems(16)):
        rows.append({"messages": [{"role": "user", "content": p["question"]},
                                  {"role": "assistant", "content": "\n".join(p["steps"])}],
                     "problem_id": p["id"], "agent": "agent0", "round": 1,
                     "kind": "corrective" if i % 3 == 0 else "diverse"})
    return write_parquet(rows, tmp_path / "datasets" / "augmented")


@pytest.fixture()
def process_dir(tmp_path) -> Path:
    rows = []
    for i, p in enumerate(synthetic_problems(24)):
        wrong = i % 2 == 1
        steps = list(p["steps"])
        if wrong:
            steps[1] = steps[1].replace("=", "= 1 +")
        labels = [True, not wrong, not wrong]
        rows.append({"prompt": p["question"], "completions": steps, "labels": labels,
                     "scores": [1.0, 0.2 if wrong else 0.9, 0.1 if wrong else 0.95], "problem_id": p["id"],
                     "answer": p["answer"]})
    return write_parquet(rows, tmp_path / "datasets" / "process")


def read_record(folder: Path) -> dict:
    return json.loads((folder / "training_record.json").read_text())
