"""Reasoning SFT throughput: pluribus (packed, assistant-only logits) vs TRL SFTTrainer + PEFT (default padding).

Same rsft dataset, the embedded model in bf16, LoRA r=16 all-linear, the same batch, learning rate, schedule,
seed (so the same examples in the same order) and one epoch. Each side runs as a child process of this script,
so its peak RSS is its own (``ru_maxrss``). Printed per side: trained tokens/s (labelled tokens, i.e. the
non-padding tokens that carry a loss, over Trainer's train_runtime), peak RSS, the final loss and the ratios.
Targets: >= 1.5x tokens/s, RSS no higher, final loss within 2%.

Final loss is measured twice. As each trainer logs it (mean of the last 5 steps), which is not like for like:
TRL's completion labels also take the template's newline after ``<|im_end|>``, a nearly free token that lowers
its mean. And like for like: a third child loads the base with each side's final adapter and computes one loss
function (mean NLL over the assistant tokens through ``<|im_end|>``, one unpadded row at a time) on the same
rows; held-out rows that follow the training rows when the dataset has them. The target is judged on that one.

    .venv/bin/python bench/sft_throughput.py --dataset runs/bench-distill/harvest/datasets/rsft --rows 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}


def store_rows(run: Path) -> list[dict]:
    """rsft-format rows from EVERY response of a debate store (correct or not: throughput does not depend on it),
    with the user turn the debate asked (the run's question prompt)."""
    import yaml

    from pluribus.data.prompts import DEFAULT_PROMPTS
    from pluribus.data.store import TrajectoryStore

    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
    prompt = ((recipe.get("team") or {}).get("prompts") or {}).get("question", DEFAULT_PROMPTS["question"])
    store = TrajectoryStore(run / "trajectories")  # no config hash: read-only
    rows = []
    for rec in store.iter_records():
        for rnd in rec["rounds"]:
            for turn in rnd:
                rows.append({"messages": [{"role": "user", "content": prompt.replace("{question}", rec["question"])},
                                          {"role": "assistant", "content": turn["response"]}],
                             "problem_id": rec["problem_id"], "agent": turn["agent"], "round": turn["round"]})
    return rows


def subset(dataset: str | None, stores: list[str] | None, rows: int, batch: int, eval_rows: int, work: Path) -> Path:
    """The first ``rows`` rows (a multiple of the batch), as one parquet file both sides read, and the
    ``eval_rows`` after them (or the last training rows when there are none) for the like-for-like loss."""
    from datasets import Dataset

    from pluribus.distill.data import load_rows

    if stores:
        ds = Dataset.from_list([row for store in stores for row in store_rows(Path(store))])
    else:
        ds = load_rows(dataset, "rsft")
    n = min(rows, len(ds)) // batch * batch
    if n < batch:
        raise SystemExit(f"dataset {dataset} has {len(ds)} rows; need at least one batch of {batch}")
    out = work / "data" / "data.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.select(range(n)).to_parquet(str(out))
    held = range(n, min(n + eval_rows, len(ds))) if len(ds) > n else range(max(0, n - eval_rows), n)
    ds.select(held).to_parquet(str(work / "eval.parquet"))
    return out.parent


def common_loss(args) -> None:
    """Mean NLL of each adapter (``--adapter`` pairs side=path) on the eval rows, by one function."""
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pluribus.distill.sft import tokenize_conversation
    from pluribus.models import resolve_model

    torch.manual_seed(0)
    folder = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = load_dataset("parquet", data_files=args.data, split="train")
    encoded = [tokenize_conversation(tok, r["messages"]) for r in rows]
    encoded = [(ids[: args.max_length], labels[: args.max_length]) for ids, labels in encoded]
    out = {}
    for spec in args.adapter:
        side, path = spec.split("=", 1)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, path).eval()
        nll, count = 0.0, 0
        with torch.no_grad():
            for ids, labels in encoded:
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                target = torch.tensor(labels[1:])
                nll += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
                count += int((target != -100).sum())
        out[side] = {"loss": nll / count, "tokens": count, "rows": len(encoded)}
    Path(args.result).write_text(json.dumps(out))


def last_losses(state_file: Path, k: int = 5) -> tuple[float, list[float]]:
    history = json.loads(state_file.read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    return sum(losses[-k:]) / len(losses[-k:]), losses


def run_pluribus(args, data: Path, work: Path) -> dict:
    from pluribus.config import Recipe
    from pluribus.distill.output import checkpoints_dir
    from pluribus.distill.sft import train_sft

    steps = args.rows_used // args.batch
    recipe = Recipe(name="pluribus", root=str(work / "runs"), seed=0, train={
        "model": args.model, "lr": args.lr, "epochs": 1, "batch_size": args.batch, "max_length": args.max_length,
        "kernels": args.kernels, "lora": {**LORA, "target_modules": "all-linear"}, "bf16": True,
        "warmup_ratio": 0.0, "scheduler": "constant", "logging_steps": 1, "save_steps": steps,
        "eval_fraction": 0.0, "report_to": ["none"]})
    out = train_sft(recipe, dataset=data)
    record = json.loads((out / "training_record.json").read_text())
    adapter = out
    final, losses = last_losses(checkpoints_dir(out) / f"checkpoint-{steps}" / "trainer_state.json")
    return {"labelled_tokens": record["data"]["labelled_tokens"], "tokens": record["data"]["tokens"],
            "train_runtime": record["metrics"]["train_runtime"], "final_loss": final, "losses": losses,
            "attention": record["data"]["attention"], "dropped": record["data"]["dropped"], "adapter": str(adapter)}


def run_trl(args, data: Path, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pluribus.models import resolve_model

    folder = resolve_model(args.model)
    ds = load_dataset("parquet", data_files=str(data / "data.parquet"), split="train")
    ds = ds.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                remove_columns=ds.column_names)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    steps = args.rows_used // args.batch
    config = SFTConfig(
        output_dir=str(work / "trl"), learning_rate=args.lr, num_train_epochs=1,
        per_device_train_batch_size=args.batch, max_length=args.max_length, bf16=True, use_cpu=True,
        warmup_steps=0, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=steps,
        report_to="none", seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft)
    labelled = sum(sum(x != -100 for x in lab[1:]) for lab in trainer.train_dataset["labels"])
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    result = trainer.train()
    final, losses = last_losses(work / "trl" / f"checkpoint-{steps}" / "trainer_state.json")
    return {"labelled_tokens": labelled, "tokens": tokens, "train_runtime": result.metrics["train_runtime"],
            "final_loss": final, "losses": losses, "adapter": str(work / "trl" / f"checkpoint-{steps}")}


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    work = Path(args.work)
    data = Path(args.data)
    result = (run_pluribus if args.side == "pluribus" else run_trl)(args, data, work)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["tokens_per_s"] = result["labelled_tokens"] / result["train_runtime"]
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="runs/bench-distill/harvest/datasets/rsft", help="rsft dataset folder")
    ap.add_argument("--store", action="append", default=None,
                    help="a run folder (repeatable): use every response of its debate store instead of --dataset")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--eval-rows", type=int, default=128, help="rows for the like-for-like final loss")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kernels", default="auto", help="pluribus train.kernels (auto | triton | torch | off)")
    ap.add_argument("--order", default="trl,pluribus", help="which side runs first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per side (OMP_NUM_THREADS)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--rows-used", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", action="append", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "eval":
        common_loss(args)
        return
    if args.side:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    data = subset(args.dataset, args.store, args.rows, args.batch, args.eval_rows, work)
    import pyarrow.parquet as pq

    rows_used = pq.ParquetFile(data / "data.parquet").metadata.num_rows
    print(f"dataset: {rows_used} rows of {', '.join(args.store or [args.dataset])}; batch {args.batch}, {rows_used // args.batch} steps, "
          f"LoRA r={LORA['r']} all-linear, bf16, model {args.model}, threads {args.threads or 'default'}", flush=True)
    results = {}
    for side in args.order.split(","):
        out = work / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--work", str(work / side), "--data", str(data),
               "--result", str(out), "--rows-used", str(rows_used), "--batch", str(args.batch), "--lr", str(args.lr),
               "--max-length", str(args.max_length), "--model", args.model, "--kernels", args.kernels]
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
            raise SystemExit(f"{side} side failed (exit {proc.returncode})")
        results[side] = json.loads(out.read_text())
        print(f"{side}: done in {time.perf_counter() - t0:.0f}s", flush=True)

    out = work / "eval.json"
    cmd = [sys.executable, __file__, "--side", "eval", "--data", str(work / "eval.parquet"), "--result", str(out),
           "--model", args.model, "--max-length", str(args.max_length)]
    for side in ("pluribus", "trl"):
        cmd += ["--adapter", f"{side}={results[side]['adapter']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        raise SystemExit(f"common loss evaluation failed (exit {proc.returncode})")
    common = json.loads(out.read_text())
    for side in ("pluribus", "trl"):
        results[side]["common_loss"] = common[side]["loss"]

    p, t = results["pluribus"], results["trl"]
    print(f"\n{'':22s} {'pluribus':>12s} {'trl':>12s} {'ratio':>8s}")
    rows = [("labelled tokens", "labelled_tokens", "{:.0f}"), ("tokens in rows", "tokens", "{:.0f}"),
            ("train seconds", "train_runtime", "{:.1f}"), ("labelled tokens/s", "tokens_per_s", "{:.1f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"), ("logged loss (last 5)", "final_loss", "{:.4f}"),
            ("final loss, same rows", "common_loss", "{:.4f}")]
    for label, key, fmt in rows:
        print(f"{label:22s} {fmt.format(p[key]):>12s} {fmt.format(t[key]):>12s} {p[key] / t[key]:8.3f}")
    speed, rss = p["tokens_per_s"] / t["tokens_per_s"], p["peak_rss_mib"] / t["peak_rss_mib"]
    loss_gap = abs(p["common_loss"] - t["common_loss"]) / t["common_loss"]
    logged_gap = abs(p["final_loss"] - t["final_loss"]) / t["final_loss"]
    c = common["pluribus"]
    print(f"\ntokens/s ratio {speed:.2f}x (target >= 1.5) | RSS ratio {rss:.2f} (target <= 1.0) | "
          f"final loss gap {loss_gap:.2%} (target <= 2%; {c['rows']} rows, {c['tokens']} assistant tokens) | "
          f"logged-loss gap {logged_gap:.2%} (different label sets) | pluribus attention: {p['attention']}")
    (work / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"details: {work / 'summary.json'}")


if __name__ == "__main__":
    main()
