"""Torch CPU threads for generation: the transformers backend on 96 brief round-0 replies, one run per count.

The quickstart's question prompt on 96 `word1` problems, SmolLM2-135M bf16, T=0.7, 64 new tokens, one warm-up
call, then two timed calls; prints seconds and generated tokens per second per thread count and the ratio of
the last count to the first. Run on a quiet machine (and beside a busy process, to see what load does).

    python bench/threads.py --threads 1 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

PROMPT = " Answer briefly: show the one calculation and end with \\boxed{N}."


def one(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    from pluribus.config import AgentConfig, SamplingConfig, TaskConfig
    from pluribus.data.backends import TransformersBackend
    from pluribus.data.tasks import load_problems

    problems = load_problems(TaskConfig(source="synthetic", n=96, synthetic={"level": "word1"}))
    backend = TransformersBackend(AgentConfig(model="smollm2-135m"), batch_size=96)
    convs = [[{"role": "user", "content": p.question + PROMPT}] for p in problems]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=64)
    backend.generate(convs[:4], sampling, seeds=list(range(4)))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        gens = backend.generate(convs, sampling, seeds=list(range(96)))
        best = min(best, time.perf_counter() - t0)
    print(f"{threads} threads: {best:.1f} s, {sum(g.tokens_out for g in gens) / best:.0f} generated tok/s", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(f"RESULT {one(args.one)}")
        return
    times = []
    for n in args.threads:  # a process each: torch sizes its thread pool once
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(n)], capture_output=True,
                             text=True, check=True).stdout
        print("\n".join(line for line in out.splitlines() if not line.startswith("RESULT")))
        times.append(float(out.split("RESULT ")[-1]))
    print(f"ratio {args.threads[-1]} vs {args.threads[0]} threads: {times[0] / times[-1]:.2f}x")


if __name__ == "__main__":
    main()
