"""What transformers ships against pluribus' ``decode_rows``: continuous batching (``generate_batch``, paged
attention), ``generate`` with a static cache, and ``generate`` as is, on the same prompts.

The embedded SmolLM2-135M in the dtype pluribus runs on this CPU (bf16 where it computes it natively, else
float32; ``--dtype`` to choose), the quickstart team's round-0 prompt on held-out problems of a synthetic level,
greedy. Each side runs once (``generate_batch`` twice: its first call builds its manager); prints seconds,
generated tokens per second and how many rows are token-for-token equal to ``decode_rows``'.

    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_hf_options.py --problems 24 --max-new-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus import device as devices  # noqa: E402
from pluribus.config import TaskConfig  # noqa: E402
from pluribus.data.backends import eos_ids  # noqa: E402
from pluribus.data.decoding import decode_rows  # noqa: E402
from pluribus.data.tasks import load_problems  # noqa: E402
from pluribus.models import EMBEDDED, load_model  # noqa: E402

PROMPT = "{question} Answer briefly: show the one calculation and end with \\boxed{N}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="addsub12")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: what pluribus runs on this machine (bf16 where the CPU computes it natively)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GenerationConfig

    problems = load_problems(TaskConfig(source="synthetic", n=args.problems * 4, split="heldout",
                                        heldout_fraction=0.25, synthetic={"level": args.level}))[: args.problems]
    dtype = devices.dtype_for(torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(EMBEDDED, dtype=dtype, device="cpu")
    eos = eos_ids(model, tok)
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPT.replace("{question}", p.question)}],
                                     tokenize=False, add_generation_prompt=True) for p in problems]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def cut(row: list[int]) -> list[int]:
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        return row if stop is None else row[: stop + 1]

    def generate(**extra) -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, eos_token_id=eos, pad_token_id=tok.pad_token_id, **extra)
        return [cut(r) for r in out[:, enc["input_ids"].shape[1]:].tolist()]

    def generate_batch() -> list[list[int]]:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id)
        # a KV cache of fixed size: left to itself it takes 90% of free memory, and on a shared machine the kernel
        # then kills a process
        from transformers import ContinuousBatchingConfig

        paged = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=4096)
        with torch.inference_mode():
            out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=paged,
                                       max_new_tokens=args.max_new_tokens)
        rows = sorted(out.values(), key=lambda o: int(o.request_id.split("_")[-1]))
        return [cut(list(o.generated_tokens)) for o in rows]

    sides = {"decode_rows": lambda: decode_rows(model, prompts, max_new_tokens=args.max_new_tokens, eos=eos),
             "generate_batch (1st)": generate_batch, "generate_batch": generate_batch,
             "generate static": lambda: generate(cache_implementation="static"), "generate": generate}
    print(f"{len(prompts)} prompts of {args.level}, {args.max_new_tokens} new tokens at most, {dtype}, greedy, torch "
          f"threads {torch.get_num_threads()}")
    ours = None
    for name, fn in sides.items():
        t0 = time.perf_counter()
        try:
            rows = fn()
        except Exception as e:  # noqa: BLE001 - a side that does not run here is reported, not fatal
            print(f"  {name:20s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        seconds = time.perf_counter() - t0
        ours = rows if ours is None else ours
        n = sum(map(len, rows))
        equal = sum(a == b for a, b in zip(ours, rows, strict=True))
        print(f"  {name:20s} {seconds:6.1f} s  {n / seconds:6.1f} tok/s  ({n} tokens; rows equal to decode_rows': "
              f"{equal} / {len(rows)})", flush=True)


if __name__ == "__main__":
    main()
