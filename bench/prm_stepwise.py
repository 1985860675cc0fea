"""How good a PRM trained from a TRL stepwise-supervision file is: held-out step AUROC, F1, first-error accuracy.

Writes a seeded jsonl in TRL's stepwise format (``prompt``, ``completions``, ``labels``): multi-step arithmetic
("What is 7 + 5 - 3 + 8?", one operation a step), half the solutions with one wrong operation whose step and every
later one (which carry the wrong number on) are labelled false; then trains a PRM on it with
``pluribus train --dataset FILE`` (``train.eval_fraction`` of the problems held out) and prints the adapter's
``prm_metrics``. Chance is AUROC 0.5; first-error accuracy of a PRM that calls every step right is the share of
all-correct rows.

    python bench/prm_stepwise.py --out /tmp/prm-bench --rows 400 --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path


def stepwise_rows(n: int, seed: int) -> list[dict]:
    """``n`` problems of 3 operations; every other one with one wrong operation (off by 1-3)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        terms = [rng.randint(2, 20) for _ in range(4)]
        ops = [rng.choice("+-") for _ in range(3)]
        question = f"What is {terms[0]} " + " ".join(f"{o} {t}" for o, t in zip(ops, terms[1:], strict=True)) + "?"
        wrong_at = rng.randrange(3) if i % 2 else None
        value, steps, labels = terms[0], [], []
        for k, (o, t) in enumerate(zip(ops, terms[1:], strict=True)):
            result = value + t if o == "+" else value - t
            if k == wrong_at:
                result += rng.choice([-3, -2, -1, 1, 2, 3])
            steps.append(f"{value} {o} {t} = {result}")
            labels.append(wrong_at is None or k < wrong_at)
            value = result
        steps.append(f"The answer is {value}.")
        labels.append(wrong_at is None)
        rows.append({"prompt": question, "completions": steps, "labels": labels})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "stepwise.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in stepwise_rows(args.rows, args.seed)))
    recipe = {"name": "prm-bench", "root": str(args.out / "runs"), "seed": args.seed, "threads": args.threads,
              "train": {"objective": "prm", "model": args.model, "epochs": args.epochs, "batch_size": 8,
                        "lr": 2e-4, "max_length": 256, "eval_fraction": args.eval_fraction, "save_steps": 1000,
                        "report_to": ["none"], "lora": {"r": 16, "alpha": 32}}}
    (args.out / "recipe.yaml").write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    adapter = args.out / "prm"
    cmd = [sys.executable, "-m", "pluribus.cli", "train", str(args.out / "recipe.yaml"), "--dataset", str(data),
           "--out", str(adapter), "--overwrite"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    record = json.loads((adapter / "training_record.json").read_text())
    print(json.dumps({"rows": args.rows, "data": record["data"], "step_format": record["step_format"],
                      "prm_metrics": record["prm_metrics"]}, indent=2))


if __name__ == "__main__":
    main()
