"""vLLM-CPU in float32 against bf16 on this CPU: why an engine asked for bf16 runs float32 where the CPU lacks
native bf16 (``vllm_engine._cpu_dtype``).

vLLM's own engine defaults but the dtype (not ``engine_kwargs``: the dtype is what differs), one in-process engine
per dtype, one after the other (each in its own process: vLLM-CPU binds its cores), the
embedded SmolLM2-135M, ``--prompts`` synthetic questions under its chat template and the quickstart's brief-answer
instruction, greedy, ``--max-new-tokens`` at most, after a
4-prompt warm-up. Prints each dtype's seconds and generated tokens per second, and the ratio. Needs vLLM (run it with
``.venv-vllm/bin/python``).

    .venv-vllm/bin/python bench/vllm_cpu_dtype.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def one(dtype: str, prompts: int, max_new_tokens: int) -> None:
    """Time one engine in ``dtype``; prints ``RESULT dtype seconds tokens``."""
    from vllm import LLM, SamplingParams

    from pluribus.models import EMBEDDED, resolve_model

    llm = LLM(model=str(resolve_model(EMBEDDED)), dtype=dtype, max_model_len=1024, enable_chunked_prefill=False,
              kv_cache_memory_bytes=1024**3)
    tok = llm.get_tokenizer()

    def ids(i: int) -> list[int]:
        text = (f"Tom has {i} apples and buys {i + 3} more. How many apples does he have? Answer briefly: show the "
                "one calculation and end with \\boxed{N}.")
        out = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    questions = [{"prompt_token_ids": ids(i)} for i in range(prompts)]
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
    llm.generate(questions[:4], params, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(questions, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    print(f"RESULT {dtype} {seconds:.3f} {sum(len(o.outputs[0].token_ids) for o in outs)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--one", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)  # the child's side
    args = ap.parse_args()
    if args.one:
        one(args.one, args.prompts, args.max_new_tokens)
        return
    speed = {}
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, __file__, "--one", dtype, "--prompts", str(args.prompts),
                              "--max-new-tokens", str(args.max_new_tokens)], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"the {dtype} engine failed:\n{out.stderr[-2000:]}")
        _, _, seconds, tokens = line.split()
        speed[dtype] = int(tokens) / float(seconds)
        print(f"{dtype:9s} {float(seconds):6.1f} s  {int(tokens):5d} tokens  {speed[dtype]:6.1f} generated tok/s",
              flush=True)
    print(f"float32 / bf16: {speed['float32'] / speed['bfloat16']:.2f}x generated tok/s")


if __name__ == "__main__":
    main()
