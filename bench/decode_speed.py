"""What continuous batching buys: pluribus' ``decode_rows`` against its ``decode`` before it, same prompts.

The embedded SmolLM2-135M in the dtype pluribus runs on this CPU (bf16 where it computes it natively, else
float32; ``--dtype`` to choose), the quickstart team's round-0 prompt on held-out problems of a synthetic level,
greedy, longest prompts first (as the transformers backend orders them). The baseline (``decode_before``, the old
algorithm kept verbatim below) decodes left-padded batches of ``--batch-size`` one after the other, each until its
last row ends (finished rows leave its cache); ``decode_rows`` keeps ``--batch-size`` slots, a finished row's slot
taken by the next prompt. ``--generate`` adds one batched ``model.generate`` per batch. The sides run in turn
(``--reps`` rounds, interleaved so that load on a shared machine hits all alike); prints seconds, generated tokens
per second, how many rows are token-for-token equal to the baseline's, and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/decode_speed.py --problems 200 --batch-size 100 --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus import device as devices  # noqa: E402
from pluribus.config import TaskConfig  # noqa: E402
from pluribus.data.backends import eos_ids  # noqa: E402
from pluribus.data.decoding import _prunable, decode_rows  # noqa: E402
from pluribus.data.tasks import load_problems  # noqa: E402
from pluribus.models import EMBEDDED, load_model  # noqa: E402

PROMPT = "{question} Answer briefly: show the one calculation and end with \\boxed{N}."


def _forward_params(model: Any) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel takes **kwargs
    return set(inspect.signature(inner.forward).parameters)


def decode_before(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int, eos: list[int],
                  pick: Any = None) -> list[list[int]]:
    """pluribus' ``decode`` before continuous batching, verbatim (the baseline): one left-padded batch, finished
    rows dropped from the cache, shared prefill of identical prompts only."""
    import torch
    from transformers import DynamicCache

    n = input_ids.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    if n == 0 or max_new_tokens <= 0:
        return out
    params = _forward_params(model)
    # the KV cache is `cache` from transformers 5.24, `past_key_values` before (5.24 still takes the old name,
    # with a deprecation warning)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    # the last position as an index tensor, not `logits_to_keep=1`: the slice that 1 makes is a strided view, and
    # torch's linear on a strided 3-d input with a frozen weight (every PeftModel's head) expands the head to one
    # copy per row: 12 s of a 96-row prefill on SmolLM2 instead of 0.01 s (bench/lora_decode.py)
    last_position = input_ids.new_tensor([input_ids.shape[1] - 1])
    keep_last = {"logits_to_keep": last_position} if "logits_to_keep" in params else {}
    cache = DynamicCache(config=model.config)
    stop = torch.tensor(sorted(set(eos)), dtype=torch.long, device=input_ids.device)
    mask = attention_mask
    # left padding: positions count real tokens only, as generate derives them from the mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    alive = list(range(n))
    # rows leave the batch only where every cache layer can drop rows exactly; a linear-attention or hybrid
    # layer keeps per-row state beside its keys and values, so there finished rows run on, as in generate
    prunable = _prunable()
    prune = all(type(layer) in prunable for layer in getattr(cache, "layers", [None]))
    with torch.inference_mode():
        # rows with the same prompt (self-consistency's samples, an RL group, a single agent's k samples, the
        # rollouts from one step) share one prefill: the cache of each distinct prompt is copied to its rows
        unique, inverse = torch.unique(torch.cat([input_ids, mask.to(input_ids.dtype)], 1), dim=0,
                                       return_inverse=True) if prune else (None, None)
        if unique is not None and unique.shape[0] < n:
            width = input_ids.shape[1]
            ids, first_mask = unique[:, :width], unique[:, width:].to(mask.dtype)
            logits = model(input_ids=ids, attention_mask=first_mask,
                           position_ids=(first_mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=True,
                           **keep_last, **{cache_arg: cache}).logits[:, -1]
            cache.batch_select_indices(inverse.to(input_ids.device))
            logits = logits[inverse.to(logits.device)]
        else:
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **keep_last, **{cache_arg: cache}).logits[:, -1]
        stop = stop.to(logits.device)
        last = positions[:, -1]
        done = torch.zeros(n, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            scores = logits.float()
            tokens = scores.argmax(-1) if pick is None else pick(scores, alive)
            for row, t, finished in zip(alive, tokens.tolist(), done.tolist(), strict=True):
                if not finished:
                    out[row].append(t)
            done = done | torch.isin(tokens, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if prune and bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep.to(input_ids.device))
                alive = [alive[i] for i in keep.tolist()]
                mask, last, tokens, done = mask[keep], last[keep], tokens[keep], done[keep]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            last = last + 1
            logits = model(input_ids=tokens[:, None].to(input_ids.device), attention_mask=mask,
                           position_ids=last[:, None], use_cache=True, **{cache_arg: cache}).logits[:, -1]
    return out



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="addsub12")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: what pluribus runs on this machine (bf16 where the CPU computes it natively)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--generate", action="store_true", help="also one batched model.generate per batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    problems = load_problems(TaskConfig(source="synthetic", n=args.problems, split="heldout",
                                        heldout_fraction=0.25, synthetic={"level": args.level}))
    dtype = devices.dtype_for(torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(EMBEDDED, dtype=dtype, device="cpu")
    eos = eos_ids(model, tok)
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPT.replace("{question}", p.question)}],
                                     tokenize=False, add_generation_prompt=True) for p in problems]
    texts.sort(key=lambda t: -len(tok(t, add_special_tokens=False)["input_ids"]))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
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

    def before() -> list[list[int]]:
        return [row for enc in batches for row in decode_before(model, enc["input_ids"], enc["attention_mask"],
                                                                 max_new_tokens=args.max_new_tokens, eos=eos)]

    def ours() -> list[list[int]]:
        return decode_rows(model, prompts, max_new_tokens=args.max_new_tokens, eos=eos, slots=args.batch_size)

    sides = {"before": before, "decode": ours, **({"generate": hf} if args.generate else {})}
    times: dict[str, list[float]] = {name: [] for name in sides}
    outs = {}
    for _ in range(args.reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    tokens = {k: sum(map(len, v)) for k, v in outs.items()}
    print(f"{len(problems)} prompts of {args.level}, batches of {args.batch_size}, {args.max_new_tokens} new tokens at "
          f"most, {dtype}, torch threads {torch.get_num_threads()}, {args.reps} interleaved pairs")
    for name in times:
        t = statistics.median(times[name])
        equal = sum(a == b for a, b in zip(outs["before"], outs[name], strict=True))
        print(f"  {name:9s} {t:6.1f} s  {tokens[name] / t:7.1f} generated tok/s  ({tokens[name]} tokens; rows equal "
              f"to before's token for token: {equal} / {len(problems)})")
    print("  (bf16 rounds differently as batch compositions differ; float32 rarely)")
    base = statistics.median(times["before"])
    print("  speed against before: " + ", ".join(f"{name} {base / statistics.median(t):.2f}x"
                                                 for name, t in times.items() if name != "before"))


if __name__ == "__main__":
    main()
