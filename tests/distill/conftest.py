"""Fixtures for the trainer tests: a tiny random causal LM with a chat template, and small synthetic datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def student_dir(tiny_llama_dir: Path) -> Path:
    """The student of the trainer tests: tests/conftest.py's tiny Llama."""
    return tiny_llama_dir


@pytest.fixture(scope="session")
def other_student_dir(tmp_path_factory, smollm2_dir: Path) -> Path:
    """A second tiny base in bf16 (hidden 32, another folder) for the resume-from-another-base test."""
    import torch
    from transformers import AutoTokenizer

    from tests.tiny import save_tiny, tiny_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_causal_lm("llama", tokenizer=tokenizer, dtype=torch.bfloat16, pad_token_id=None, hidden_size=32,
                           intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True)
    return save_tiny(tmp_path_factory.mktemp("other_llama"), model, tokenizer)


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
