"""Monte-Carlo step labelling throughput: pluribus (rollouts of whole traces batched) vs one generate per rollout.

Same traces (GSM8K gold solutions, one step a line), the same model (embedded SmolLM2-135M), the same
sampling (temperature 0.8, the same max new tokens), the same prompt and prefixes, one process:

- pluribus: ``label_traces`` with ``BackendCompleter``: every step's ``n`` rollouts of a group of traces are
  one ``Backend.generate`` call (``--batch-size`` rows per ``model.generate``);
- naive: the usual MC-labelling loop (Math-Shepherd style), one ``generate`` call per rollout.

Prints rollouts/s and generated tokens/s of both and the ratio.

    .venv/bin/python bench/build_rollouts.py --traces 6 --rollouts 4 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus.config import AgentConfig, SamplingConfig  # noqa: E402
from pluribus.data.backends import make_backend  # noqa: E402
from pluribus.data.builders.datasets import BackendCompleter  # noqa: E402
from pluribus.data.builders.process import Trace, label_traces, requests_for  # noqa: E402
from pluribus.data.builders.steps import split_steps  # noqa: E402
from pluribus.data.tasks import load_gsm8k  # noqa: E402
from pluribus.models import EMBEDDED  # noqa: E402

PROMPT = "Can you solve the following problem? {question}\nExplain your reasoning step by step."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=6)
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts per step")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    problems = load_gsm8k()[: args.traces]
    traces = [Trace(p.id, p, p.solution, split_steps(p.solution, "lines")) for p in problems]
    agent = AgentConfig(model=EMBEDDED, dtype=args.dtype,
                        sampling=SamplingConfig(temperature=0.8, max_new_tokens=args.max_new_tokens, seed=0))
    backend = make_backend(agent, batch_size=args.batch_size)
    completer = BackendCompleter(backend, agent, PROMPT, seed=0)
    n_rollouts = sum(len(t.steps) for t in traces) * args.rollouts
    print(f"{len(traces)} traces, {n_rollouts} rollouts of <= {args.max_new_tokens} tokens, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")

    counted = []

    def counting(requests):  # the tokens generated, for tokens/s (same text -> same count for both)
        out = completer(requests)
        counted.extend(backend.count_tokens(t) for t in out)
        return out

    label_traces(traces[:1], counting, n=1, batch_size=args.batch_size)  # warm-up (weights, kernels)
    counted.clear()
    t0 = time.perf_counter()
    label_traces(traces, counting, n=args.rollouts, batch_size=args.batch_size)
    ours_s = time.perf_counter() - t0
    ours_tok = sum(counted)

    counted.clear()
    t0 = time.perf_counter()
    for t in traces:
        for r in requests_for(t, args.rollouts):
            counting([r])
    naive_s = time.perf_counter() - t0
    naive_tok = sum(counted)

    print(f"pluribus: {n_rollouts / ours_s:8.2f} rollouts/s {ours_tok / ours_s:8.1f} tok/s ({ours_s:.1f} s)")
    print(f"naive:    {n_rollouts / naive_s:8.2f} rollouts/s {naive_tok / naive_s:8.1f} tok/s ({naive_s:.1f} s)")
    print(f"ratio (rollouts/s): {naive_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
