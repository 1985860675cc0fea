"""Calibrate the synthetic task's LEVELS: greedy accuracy of the embedded SmolLM2-135M-Instruct per level.

    .venv/bin/python bench/task_levels.py --n 60 [--levels add1,word1] [--threads 1] [--show 2]

Each level's first ``n`` problems (the seed-0 stream) are asked with the chat template and a prompt asking to
end with "The answer is N" (``--prompt debate``: the debate's round-0 prompt, asking for \\boxed{}); replies
are generated greedily in left-padded batches and graded with ``pluribus.data.answers.grade``.
Prints accuracy, how answers were found, and seconds per level.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from pluribus.config import SyntheticConfig  # noqa: E402
from pluribus.data.answers import grade  # noqa: E402
from pluribus.data.tasks import LEVELS, synthetic  # noqa: E402
from pluribus.models import EMBEDDED, load_model  # noqa: E402

PROMPTS = {
    "answer_is": "{question}\nSolve it step by step, then end your reply with: The answer is <number>.",
    "short": "{question}\nEnd your reply with: The answer is <number>.",
}


def generate(model, tok, prompt: str, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": prompt.replace("{question}", q)}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep it low on shared machines)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--show", type=int, default=0, help="print this many replies per level")
    ap.add_argument(
        "--prompt", default="answer_is", choices=[*PROMPTS, "debate"], help="debate: the debate's round-0 prompt"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prompt == "debate":
        from pluribus.data.prompts import DEFAULT_PROMPTS

        prompt = DEFAULT_PROMPTS["question"]
    else:
        prompt = PROMPTS[args.prompt]

    model, tok = load_model(EMBEDDED, dtype=getattr(torch, args.dtype))
    print(f"model={EMBEDDED} dtype={args.dtype} n={args.n} max_new_tokens={args.max_new_tokens} greedy")
    print(f"prompt={args.prompt}: {prompt!r}")
    print(f"{'level':<12} {'acc':>6} {'right':>6} {'none':>5}  methods                         seconds")
    for level in args.levels.split(","):
        problems = list(itertools.islice(synthetic(SyntheticConfig(level=level), seed=0), args.n))
        t0 = time.perf_counter()
        replies = generate(model, tok, prompt, [p.question for p in problems], args.max_new_tokens, args.batch_size)
        seconds = time.perf_counter() - t0
        grades = [grade(r, p) for r, p in zip(replies, problems, strict=True)]
        right = sum(g.correct for g in grades)
        none = sum(g.answer is None for g in grades)
        methods = collections.Counter(g.method for g in grades if g.method)
        shown = ", ".join(f"{m}:{c}" for m, c in methods.most_common())
        print(f"{level:<12} {right / len(problems):>6.0%} {right:>3}/{len(problems):<3} {none:>4}  {shown:<31} {seconds:7.1f}")
        for p, r, g in list(zip(problems, replies, grades, strict=True))[: args.show]:
            print(f"  Q: {p.question}\n  gold={p.answer} got={g.answer} ({g.method}) reply: {r.strip()[:300]!r}")


if __name__ == "__main__":
    main()
