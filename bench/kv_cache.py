"""A KV cache written in place (``kv_cache.RoomyLayer``, what ``decode_rows`` runs) against transformers'
``DynamicLayer`` (a ``torch.cat`` of the whole cache at every step), same prompts, same ``decode_rows`` otherwise.

The embedded SmolLM2-135M in the dtype pluribus runs on this CPU (bf16 where it computes it natively, else
float32; ``--dtype`` to choose), greedy, GSM8K training questions from ``../shared/data/gsm8k`` (long prompts:
the cost of a copy grows with the cached length) under the quickstart's question prompt, ``--rows`` prompts
through ``--slots`` slots, ``--max-new-tokens`` new tokens at most. The sides run in turn, ``--reps`` rounds
(interleaved, so that load on a shared machine hits both alike); prints each side's median seconds, generated
tokens per second, how many rows are token-for-token equal, and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kv_cache.py --rows 96 --slots 96 --max-new-tokens 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus import device as devices  # noqa: E402
from pluribus.data import kv_cache  # noqa: E402
from pluribus.data.backends import eos_ids  # noqa: E402
from pluribus.data.decoding import decode_rows  # noqa: E402
from pluribus.data.tasks import default_gsm8k_path  # noqa: E402
from pluribus.models import EMBEDDED, load_model  # noqa: E402

PROMPT = "{question} Answer briefly: show the one calculation and end with \\boxed{N}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--slots", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: what pluribus runs on this machine (bf16 where the CPU computes it natively)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(default_gsm8k_path()) as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(args.rows), f, strict=False)]
    dtype = devices.dtype_for(torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(EMBEDDED, dtype=dtype, device="cpu")
    eos = eos_ids(model, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPT.replace("{question}", q)}],
                                       tokenize=True, add_generation_prompt=True) for q in questions]
    prompts = sorted([list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts], key=lambda p: -len(p))
    roomy = kv_cache.roomy

    def run(in_place: bool) -> list[list[int]]:
        kv_cache.roomy = roomy if in_place else (lambda cache, room: cache)
        try:
            return decode_rows(model, prompts, max_new_tokens=args.max_new_tokens, eos=eos, slots=args.slots)
        finally:
            kv_cache.roomy = roomy

    sides = {"DynamicLayer (cat)": False, "RoomyLayer (in place)": True}
    times: dict[str, list[float]] = {name: [] for name in sides}
    outs = {}
    run(True)  # warm-up
    for _ in range(args.reps):
        for name, in_place in sides.items():
            t0 = time.perf_counter()
            outs[name] = run(in_place)
            times[name].append(time.perf_counter() - t0)
    lengths = [len(p) for p in prompts]
    print(f"{len(prompts)} GSM8K prompts of {min(lengths)}-{max(lengths)} tokens, {args.slots} slots, "
          f"{args.max_new_tokens} new tokens at most, {dtype}, greedy, torch threads {torch.get_num_threads()}, "
          f"{args.reps} interleaved pairs")
    base = next(iter(outs.values()))
    for name, ts in times.items():
        t = statistics.median(ts)
        n = sum(map(len, outs[name]))
        equal = sum(a == b for a, b in zip(base, outs[name], strict=True))
        print(f"  {name:22s} {t:6.1f} s  {n / t:6.1f} generated tok/s  ({n} tokens; rows equal: {equal} / {len(prompts)})")
    cat, room = (statistics.median(times[name]) for name in sides)
    print(f"  in place against cat: {cat / room:.2f}x")


if __name__ == "__main__":
    main()
