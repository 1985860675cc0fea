"""What dropping finished rows buys: pluribus' ``decode`` against one batched ``model.generate``, same prompts.

The embedded SmolLM2-135M, bf16, the quickstart team's round-0 prompt on held-out problems of a synthetic level,
greedy, left-padded batches of ``--batch-size``. Both sides decode the same batches in turn (``--reps`` pairs,
interleaved so that load on a shared machine hits both alike); prints seconds, generated tokens per second, how
many rows are token-for-token equal, and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_speed.py --problems 200 --batch-size 100 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus.config import TaskConfig  # noqa: E402
from pluribus.data.backends import _eos_ids  # noqa: E402
from pluribus.data.decoding import decode  # noqa: E402
from pluribus.data.tasks import load_problems  # noqa: E402
from pluribus.models import EMBEDDED, load_model  # noqa: E402

PROMPT = "{question} Answer briefly: show the one calculation and end with \\boxed{N}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="addsub12")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = load_problems(TaskConfig(source="synthetic", n=args.problems, split="heldout",
                                        heldout_fraction=0.25, synthetic={"level": args.level}))
    model, tok = load_model(EMBEDDED, dtype=torch.bfloat16)
    eos = _eos_ids(model, tok)
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPT.replace("{question}", p.question)}],
                                     tokenize=False, add_generation_prompt=True) for p in problems]
    batches = [tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
               for i in range(0, len(texts), args.batch_size)]

    def hf() -> list[list[int]]:
        rows = []
        for enc in batches:
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, eos_token_id=eos, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                stop = next((k for k, t in enumerate(row) if t in eos), None)
                rows.append(row if stop is None else row[:stop + 1])
        return rows

    def ours() -> list[list[int]]:
        return [row for enc in batches for row in decode(model, enc["input_ids"], enc["attention_mask"],
                                                          max_new_tokens=args.max_new_tokens, eos=eos)]

    times: dict[str, list[float]] = {"generate": [], "decode": []}
    outs = {}
    for _ in range(args.reps):
        for name, fn in (("generate", hf), ("decode", ours)):
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    tokens = {k: sum(map(len, v)) for k, v in outs.items()}
    equal = sum(a == b for a, b in zip(outs["generate"], outs["decode"], strict=True))
    print(f"{len(problems)} prompts of {args.level}, batches of {args.batch_size}, {args.max_new_tokens} new tokens at "
          f"most, bf16, torch threads {torch.get_num_threads()}, {args.reps} interleaved pairs")
    for name in times:
        t = statistics.median(times[name])
        print(f"  {name:9s} {t:6.1f} s  {tokens[name] / t:7.1f} generated tok/s  ({tokens[name]} tokens)")
    print(f"  rows equal token for token: {equal} / {len(problems)} (bf16 rounds differently as the batch shrinks)")
    print(f"  decode / generate speed: {statistics.median(times['generate']) / statistics.median(times['decode']):.2f}x")


if __name__ == "__main__":
    main()
