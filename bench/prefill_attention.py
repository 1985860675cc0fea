"""A prefill's attention on the key/value heads (``attention.kv_head_attention``: SDPA with ``enable_gqa``) against
transformers' ``sdpa``, which repeats every key and value per query head wherever a mask is given.

The embedded SmolLM2-135M (9 query heads on 3 key/value heads) in the dtype pluribus picks for this CPU (bf16
where it computes it natively, else float32; ``--dtype`` to choose), debate-shaped prompts: the quickstart's
round-1 prompt over a GSM8K training question, with two other questions' reference solutions as the peers'
answers (``../shared/data/gsm8k``; about 200-650 tokens). The prompts go longest first in batches of ``--batch-size``,
left-padded, as the transformers backend prefills them; the sides run in turn, ``--reps`` rounds, interleaved.
Prints each side's median seconds for the prefill of all ``--prompts``, prompt tokens per second, whether every
prompt's last-position logits are equal to the bit, and the ratio.

    .venv/bin/python bench/prefill_attention.py --prompts 96 --batch-size 24 --threads 1
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
from pluribus.data.attention import NAME, kv_head_attention  # noqa: E402
from pluribus.data.tasks import default_gsm8k_path  # noqa: E402
from pluribus.models import EMBEDDED, load_model  # noqa: E402

DEBATE = ("Other agents answered:\n\n{peers}\n\nThe problem is: {question} Check their calculations and yours, "
          "then answer briefly and end with \\boxed{N}.")


def prompts_of(tok: object, n: int) -> list[list[int]]:
    with open(default_gsm8k_path()) as f:
        rows = [json.loads(line) for _, line in zip(range(3 * n), f, strict=False)]
    out = []
    for i in range(n):
        peers = "\n\n".join(f"Agent {k + 1}: {rows[n + 2 * i + k]['answer']}" for k in range(2))
        text = DEBATE.replace("{peers}", peers).replace("{question}", rows[i]["question"])
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return sorted(out, key=lambda p: -len(p))


def prefill(model: object, prompts: list[list[int]], batch_size: int, pad: int) -> torch.Tensor:
    """The last position's logits of every prompt, ``batch_size`` left-padded prompts per forward."""
    last = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = ids.new_tensor([width - 1])
            last.append(model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              logits_to_keep=keep).logits[:, -1].float())
    return torch.cat(last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = devices.dtype_for(torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(EMBEDDED, dtype=dtype, device="cpu")
    model.eval()
    prompts = prompts_of(tok, args.prompts)
    tokens = sum(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    print(f"{len(prompts)} prompts, {min(map(len, prompts))}-{max(map(len, prompts))} tokens ({tokens} in all), "
          f"batches of {args.batch_size}, {dtype}, {args.threads} thread(s)", flush=True)
    assert kv_head_attention(model)
    sides = {"sdpa (keys and values repeated per query head)": "sdpa", "pluribus_sdpa (on the KV heads)": NAME}
    times: dict[str, list[float]] = {s: [] for s in sides}
    logits: dict[str, torch.Tensor] = {}
    for implementation in sides.values():  # warm-up, each side
        model.set_attn_implementation(implementation)
        prefill(model, prompts[: args.batch_size], args.batch_size, pad)
    for rep in range(args.reps):
        # each round in the other order, so neither side always runs first after the other
        for side, implementation in (list(sides.items()) if rep % 2 == 0 else list(sides.items())[::-1]):
            model.set_attn_implementation(implementation)
            t0 = time.perf_counter()
            logits[side] = prefill(model, prompts, args.batch_size, pad)
            times[side].append(time.perf_counter() - t0)
    base, ours = (statistics.median(times[s]) for s in sides)
    for side in sides:
        t = statistics.median(times[side])
        print(f"{side:50s} {t:7.2f} s  {tokens / t:7.1f} prompt tok/s  (runs: "
              f"{', '.join(f'{x:.2f}' for x in times[side])})")
    equal = torch.equal(*logits.values())
    print(f"last-position logits equal to the bit: {equal}; ratio sdpa / pluribus_sdpa: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
