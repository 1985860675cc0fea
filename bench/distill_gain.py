"""Does distillation work? Held-out single-agent accuracy of the embedded model before and after reasoning SFT.

End to end, with pluribus's own stages (everything under --root/<name>-*):
1. harvest: K sampled agents answer each training problem of the synthetic task alone (debate N=K, R=1);
2. build: the rsft dataset keeps the verified-correct traces (user turn = the same prompt as the debate's);
3. train: LoRA reasoning SFT of the embedded model on it;
4. eval: the debate CLI's single-agent setting (N=1, R=1) on held-out problems, greedy and sampled
   (sampled = the round-0 accuracy of S agents at temperature 0.7, i.e. the mean over S samples per problem),
   base model vs base + adapter.

    .venv/bin/python bench/distill_gain.py --level quickstart --train-n 300 --heldout-n 100
    .venv/bin/python bench/distill_gain.py --probe quickstart,word1,easy   # base accuracy per level, to pick one

A pilot with the \\boxed{} prompt found almost no correct traces; with this prompt the base scores 40% greedy on
the quickstart level (pluribus/data/tasks.py), inside the 20-60% band where distillation has traces to learn from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from pluribus.config import validate_recipe  # noqa: E402
from pluribus.models import EMBEDDED  # noqa: E402
from pluribus.stages.debate import run_debate  # noqa: E402

# The prompt bench/task_levels.py calibrated the levels with (the debate's default asks for \boxed{}, which the
# 135M model rarely produces); the rsft user turn is the same prompt, so training matches evaluation.
PROMPT = "{question}\nSolve it step by step, then end your reply with: The answer is <number>."


def recipe(name: str, root: str, level: str, split: str, n: int, agents: list[dict], **extra) -> object:
    return validate_recipe({
        "name": name, "root": root, "seed": 0,
        "task": {"source": "synthetic", "split": split, "n": n, "synthetic": {"level": level}},
        "team": {"agents": agents, "rounds": 1, "batch_size": 64, "prompts": {"question": PROMPT}},
        **extra,
    })


def agents(k: int, temperature: float, max_new_tokens: int, adapter: str | None = None) -> list[dict]:
    return [{"name": f"a{i}", "model": EMBEDDED, "adapter": adapter,
             "sampling": {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": 100 + i}}
            for i in range(k)]


def accuracy(name: str, args, split: str, n: int, k: int, temperature: float, adapter: str | None = None) -> float:
    summary = run_debate(recipe(name, args.root, args.level, split, n,
                                agents(k, temperature, args.max_new_tokens, adapter)), progress=False)
    args.evaluated = summary.problems  # a level's pool can hold fewer problems than asked for
    return summary.round0_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="quickstart")
    ap.add_argument("--train-n", type=int, default=400, help="training problems harvested")
    ap.add_argument("--samples", type=int, default=4, help="sampled agents per training problem")
    ap.add_argument("--harvest-temperature", type=float, default=0.5,
                    help="sampling temperature of the harvest (0.8 gave 6%% correct on quickstart: too few traces)")
    ap.add_argument("--heldout-n", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=2, help="sampled agents per held-out problem")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--root", default="runs/bench-distill")
    ap.add_argument("--probe", default=None, help="comma-separated levels: print base greedy accuracy and stop")
    ap.add_argument("--probe-n", type=int, default=32)
    args = ap.parse_args()

    if args.probe:
        for level in args.probe.split(","):
            args.level = level
            t0 = time.perf_counter()
            acc = accuracy(f"probe-{level}", args, "heldout", args.probe_n, 1, 0.0)
            print(f"{level}: base greedy accuracy {acc:.1%} on {args.probe_n} held-out ({time.perf_counter() - t0:.0f}s)")
        return

    t0 = time.perf_counter()
    # 1. harvest training traces (K independent sampled answers per problem)
    harvest = recipe(f"harvest-t{args.harvest_temperature:g}", args.root, args.level, "train", args.train_n,
                     agents(args.samples, args.harvest_temperature, args.max_new_tokens),
                     build={"kinds": ["rsft"], "prompt_template": PROMPT})
    h = run_debate(harvest)
    print(f"harvest: {h.problems} problems x {args.samples} samples, train accuracy {h.round0_accuracy:.1%}",
          flush=True)

    # 2. the rsft dataset (verified-correct traces)
    from pluribus.stages.build import build_recipe

    built = build_recipe(harvest, overwrite=True, progress=False)
    rows = built[0].rows
    print(f"rsft dataset: {rows} rows at {built[0].path}")

    # 3. LoRA reasoning SFT
    from pluribus.stages.train import train_stage

    train = validate_recipe({**harvest.to_dict(), "train": {
        "objective": "rsft", "model": EMBEDDED, "lr": args.lr, "epochs": args.epochs, "batch_size": 8,
        "kernels": "auto", "eval_fraction": 0.05, "save_steps": 1000, "report_to": ["none"]}})
    adapter = train_stage(train, overwrite=True)
    record = json.loads((adapter / "training_record.json").read_text())
    print(f"adapter: {adapter} (train_loss {record['metrics'].get('train_loss'):.4f}, "
          f"eval_loss {record['metrics'].get('eval_loss', float('nan')):.4f})")

    # 4. held-out single-agent accuracy, base vs distilled, greedy and sampled
    results = {}
    for label, ad in (("base", None), ("distilled", str(adapter))):
        results[label] = {
            "greedy": accuracy(f"eval-{label}-greedy", args, "heldout", args.heldout_n, 1, 0.0, ad),
            "sampled": accuracy(f"eval-{label}-sampled", args, "heldout", args.heldout_n, args.eval_samples, 0.7, ad),
        }
    print(f"\nlevel {args.level}: held-out single-agent accuracy on {args.evaluated} problems "
          f"(trained on {rows} verified traces from {h.problems} problems)")
    print(f"{'':10s} {'greedy':>8s} {'sampled':>8s}")
    for label, r in results.items():
        print(f"{label:10s} {r['greedy']:8.1%} {r['sampled']:8.1%}")
    out = Path(args.root) / "distill_gain.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "train_problems": h.problems,
                               "heldout_problems": args.evaluated, "results": results,
                               "seconds": time.perf_counter() - t0}, indent=2))
    print(f"written {out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
