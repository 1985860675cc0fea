"""Decoding through a LoRA adapter: pluribus's inference path against PEFT's defaults with ``generate``.

Eval and the debate backend run every expert as base model + adapter. ``generate``'s prefill asks for the last
position's logits with ``logits_to_keep=1``, a strided slice on which torch expands a frozen head (every
PeftModel's) to one copy per row: a LoRA system cost 3x the base model here. ``decoding.decode`` keeps the last
position by an index tensor. Both keep the adapter in float32, as PEFT loads it; ``--adapter-dtype model`` casts
it to the model's dtype (about 5% less time relative to the base model here, and it changes greedy
answers: pluribus does not cast).

SmolLM2-135M bf16, an all-linear r=16 adapter with random B (so the adapter changes the output), the quickstart's
question prompt on ``--rows`` (96) ``word1`` problems, greedy, 64 new tokens, one process, ``--threads`` torch threads; one
warm-up, then the best of two. Prints seconds per batch of `--rows` rows for the base model, PEFT + generate and pluribus, and
the ratios.

    python bench/lora_decode.py --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable

PROMPT = " Answer briefly: show the one calculation and end with \\boxed{N}."


def best_of(fn: Callable[[], int], repeats: int = 2) -> tuple[float, int]:
    fn()
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        best = min(best, time.perf_counter() - t0)
    return best, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--adapter-dtype", choices=["float32", "model"], default="float32")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from pluribus.config import TaskConfig
    from pluribus.data.decoding import decode
    from pluribus.data.tasks import load_problems
    from pluribus.models import load_model, resolve_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = resolve_model("smollm2-135m")
    adapter = tempfile.mkdtemp(prefix="pluribus-bench-lora-")
    torch.manual_seed(0)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                             LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=2e-3)
    trained.save_pretrained(adapter)

    base, tok = load_model("smollm2-135m")
    problems = load_problems(TaskConfig(source="synthetic", n=args.rows, synthetic={"level": "word1"}))
    texts = [tok.apply_chat_template([{"role": "user", "content": p.question + PROMPT}], tokenize=False,
                                     add_generation_prompt=True) for p in problems]
    enc = tok(texts, return_tensors="pt", padding=True)
    eos = [tok.eos_token_id]

    def ours(model: object) -> Callable[[], int]:
        return lambda: sum(map(len, decode(model, enc.input_ids, enc.attention_mask, max_new_tokens=64, eos=eos)))

    def peft_generate(model: object) -> Callable[[], int]:
        def run() -> int:
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
            # generate pads finished rows with the pad token (= eos here): count each row up to its first eos,
            # included, as decode's rows are
            tokens = 0
            for row in out[:, enc.input_ids.shape[1]:].tolist():
                tokens += row.index(eos[0]) + 1 if eos[0] in row else len(row)
            return tokens
        return run

    t_base, n_base = best_of(ours(base.eval()))
    print(f"base model, decode:              {t_base:5.1f} s  ({n_base} tokens)", flush=True)
    peft_default = PeftModel.from_pretrained(base, adapter, is_trainable=False).eval()
    t_peft, n_peft = best_of(peft_generate(peft_default))
    print(f"LoRA, PEFT defaults + generate:  {t_peft:5.1f} s  ({n_peft} tokens)", flush=True)
    del peft_default
    model, _ = load_model("smollm2-135m", adapter=adapter)
    if args.adapter_dtype == "model":
        dtype = model.get_base_model().dtype
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    t_ours, n_ours = best_of(ours(model.eval()))
    print(f"LoRA, pluribus (load_model + decode): {t_ours:5.1f} s  ({n_ours} tokens)", flush=True)
    print(f"ratio PEFT+generate / pluribus: {t_peft / t_ours:.2f}x; pluribus LoRA / base: {t_ours / t_base:.2f}x")


if __name__ == "__main__":
    main()
