"""What batch invariance costs: does a conversation's response depend on the batch it is generated in?

The embedded SmolLM2-135M, the synthetic task's round-0 prompts, greedy and sampled (per-row seeds), in bf16
and float32 on the CPU: each prompt generated in one batch of all of them, and alone (batch of one). Prints,
per dtype and decoding, how many responses are equal batched and alone, and generated tokens/s batched and
alone, measured in one run. Then the cost of per-row generators: pluribus' ``decode`` with its row sampler vs one batched sampled
``generate`` with HF's own batch sampling (global RNG), interleaved, same rows and tokens.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch_invariance.py --problems 12 --max-new-tokens 48 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus.config import AgentConfig, SamplingConfig, TaskConfig  # noqa: E402
from pluribus.data.backends import TransformersBackend  # noqa: E402
from pluribus.data.debate import conversation_seed  # noqa: E402
from pluribus.data.prompts import DEFAULT_PROMPTS, fill  # noqa: E402
from pluribus.data.tasks import load_problems  # noqa: E402
from pluribus.models import EMBEDDED  # noqa: E402


def run(backend: TransformersBackend, convs, sampling: SamplingConfig, seeds: list[int]):
    t0 = time.perf_counter()
    gens = backend.generate(convs, sampling, seeds=seeds)
    return gens, time.perf_counter() - t0


def left_padded(backend: TransformersBackend, convs, max_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversations as one left-padded batch of ids and its attention mask, as the backend builds them."""
    prompts = [backend.builder.encode(c, max_new) for c in convs]
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), backend.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p.ids):] = torch.tensor(p.ids)
        mask[r, width - len(p.ids):] = 1
    return ids, mask


def hf_sampling(backend: TransformersBackend, convs, max_new: int) -> float:
    """Seconds of one batched generate with HF's own sampling (one draw for the whole batch per step)."""
    ids, mask = left_padded(backend, convs, max_new)
    t0 = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                               do_sample=True, temperature=0.8, top_p=1.0, top_k=None, pad_token_id=backend.pad)
    return time.perf_counter() - t0


def row_sampling(backend: TransformersBackend, convs, max_new: int, seeds: list[int]) -> float:
    """The same with pluribus' decode and per-row generators (no stop token, so both make max_new tokens a row)."""
    from pluribus.data.decoding import decode, row_sampler

    ids, mask = left_padded(backend, convs, max_new)
    t0 = time.perf_counter()
    decode(backend.model, ids, mask, max_new_tokens=max_new, eos=[], pick=row_sampler(seeds, 0.8, 1.0))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--sampler-only", action="store_true", help="only the per-row generator cost")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = load_problems(TaskConfig(source="synthetic", n=args.problems))
    convs = [[{"role": "user", "content": fill(DEFAULT_PROMPTS["question"], question=p.question)}]
             for p in problems]
    seeds = [conversation_seed(0, p.id, "agent0", 0) for p in problems]
    print(f"{len(convs)} prompts, {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    if not args.sampler_only:
        invariance(args, convs, seeds)
    backend = TransformersBackend(AgentConfig(model=EMBEDDED, dtype="bfloat16"), batch_size=len(convs))
    ours, theirs = [], []
    for _ in range(args.reps):
        theirs.append(hf_sampling(backend, convs, args.max_new_tokens))
        ours.append(row_sampling(backend, convs, args.max_new_tokens, seeds))
    print(f"bf16 batched sampling, {len(convs)} rows x {args.max_new_tokens} tokens, best of {args.reps}: "
          f"HF {min(theirs):.2f} s, per-row generators {min(ours):.2f} s "
          f"(ratio {min(ours) / min(theirs):.3f})")


def invariance(args: argparse.Namespace, convs, seeds: list[int]) -> None:
    print(f"{'dtype':9} {'decoding':8} {'equal':>7} {'tok/s batched':>14} {'tok/s alone':>12}")
    for dtype in args.dtypes.split(","):
        backend = TransformersBackend(AgentConfig(model=EMBEDDED, dtype=dtype), batch_size=len(convs))
        for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
            sampling = SamplingConfig(temperature=temperature, max_new_tokens=args.max_new_tokens)
            batched, tb = run(backend, convs, sampling, seeds)
            alone, ta = [], 0.0
            for c, s in zip(convs, seeds, strict=True):
                g, t = run(backend, [c], sampling, [s])
                alone += g
                ta += t
            equal = sum(a.text == b.text for a, b in zip(batched, alone, strict=True))
            tokens_b, tokens_a = sum(g.tokens_out for g in batched), sum(g.tokens_out for g in alone)
            print(f"{dtype:9} {name:8} {equal:>3}/{len(convs):<3} {tokens_b / tb:>14.1f} {tokens_a / ta:>12.1f}",
                  flush=True)
        backend.close()


if __name__ == "__main__":
    main()
