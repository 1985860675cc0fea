"""Benchmark: fused LoRA linear (pluribus.kernels) vs PEFT's eager LoRA layer, measured side by side in one process.

On a CUDA GPU: Triton vs PEFT eager vs torch.compile'd PEFT at Llama-3-8B shapes (forward, backward, both; time,
TFLOP/s, GB/s, peak memory). Without one: the CPU rows, the PyTorch twin (the autograd Function with the
memory-saving backward) vs PEFT eager, forward+backward, time and saved-activation memory, at the embedded
model's shapes (SmolLM2-135M: d=576, d_ff=1536) and at d=4096, in float32 and under bfloat16 autocast.

    .venv/bin/python bench/fused_kernels.py [--tokens 2048] [--big-tokens 512] [--reps 10] [--threads 1]
    python bench/fused_kernels.py --quick --json rows.json   # GPU: d=4096, r=16 only, no torch.compile (gpu-check)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# keep bench/ off sys.path: a script there must never shadow an installed package (transformers tries `import kernels`,
# the Hub kernels package, and this script was once named kernels.py)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from pluribus.kernels.lora_linear import lora_linear  # noqa: E402
from pluribus.kernels.reference import lora_linear_ref  # noqa: E402


class _One(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


def peft_layer(k: int, n: int, r: int, dtype: torch.dtype, device: str) -> nn.Module:
    """A PEFT LoRA Linear (lora_dropout 0, alpha 2r) with a non-zero B, as after some training."""
    torch.manual_seed(0)
    model = get_peft_model(_One(k, n), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj.to(device=device, dtype=dtype)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def fused_call(layer: nn.Module, mode: str):
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    return lambda x: lora_linear(x, w, a, b, s, mode=mode)


def saved_bytes(fn, x: torch.Tensor, params: list[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after ``fn(x)``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def _best_times(steps: list, reps: int, sync=lambda: None, clock=time.perf_counter) -> list[float]:
    """Best time of each step, alternating them call by call so that load from other jobs hits all alike.

    The minimum: on a machine shared with other jobs, noise only ever adds time.
    """
    for step in steps:
        step()
    sync()
    best = [float("inf")] * len(steps)
    for _ in range(reps):
        for i, step in enumerate(steps):
            t0 = clock()
            step()
            sync()
            best[i] = min(best[i], clock() - t0)
    return best


# ------------------------------------------------------------------------------------------------- CPU


def cpu_rows(tokens: int, big_tokens: int, reps: int, threads: int) -> None:
    print("No CUDA GPU here: the GPU rows (Triton vs PEFT eager vs torch.compile'd PEFT) are skipped.")
    torch.set_num_threads(threads)
    # one thread: time its CPU time, which other jobs on a shared machine cannot inflate by descheduling us
    clock, clock_name = (time.thread_time, "thread CPU time") if threads == 1 else (time.perf_counter, "wall time")
    print(f"CPU rows: PyTorch twin (fused Function) vs PEFT eager LoRA layer, forward+backward, {threads} thread(s), "
          f"{clock_name}, best of {reps} alternating calls\n")
    shapes = [
        ("smollm2 q/o  576->576", tokens, 576, 576, 16),
        ("smollm2 gate 576->1536", tokens, 576, 1536, 16),
        ("smollm2 down 1536->576", tokens, 1536, 576, 16),
        ("d=4096 4096->4096", big_tokens, 4096, 4096, 16),
    ]
    header = f"{'shape':<24}{'M':>6}{'precision':>16}{'peft ms':>10}{'fused ms':>10}{'speedup':>9}" \
             f"{'peft saved':>12}{'fused saved':>13}{'mem ratio':>11}{'max |diff|':>12}"
    print(header)
    print("-" * len(header))
    for label, m, k, n, r in shapes:
        for precision in ("fp32", "bf16-autocast", "bf16 W+autocast"):
            layer = peft_layer(k, n, r, torch.float32, "cpu")
            # "bf16 W": how pluribus trains (train.bf16): a bf16 base, fp32 adapter weights, bf16 autocast
            act = torch.bfloat16 if precision.startswith("bf16 W") else torch.float32
            layer.base_layer.to(act)
            params = [p for p in layer.parameters()]
            x = torch.randn(m, k, dtype=act, requires_grad=True)
            dy = torch.randn(m, n, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
            fused = fused_call(layer, "torch")
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32")

            def step(fn, x=x, dy=dy, autocast=autocast, params=params):
                with autocast:
                    y = fn(x)
                y.backward(dy)
                x.grad = None
                for p in params:
                    p.grad = None

            with torch.no_grad(), autocast:
                ref = lora_linear_ref(x, layer.base_layer.weight, layer.lora_A["default"].weight,
                                      layer.lora_B["default"].weight, layer.scaling["default"])
                diff = (fused(x).float() - ref.float()).abs().max().item()
            tp, tf = _best_times([lambda f=layer, s=step: s(f), lambda f=fused, s=step: s(f)], reps, clock=clock)
            with autocast:
                mp = saved_bytes(layer, x, params)
                mf = saved_bytes(fused, x, params)
            print(f"{label:<24}{m:>6}{precision:>16}{tp * 1e3:>10.1f}{tf * 1e3:>10.1f}{tp / tf:>8.2f}x"
                  f"{mp / 2**20:>10.2f}MB{mf / 2**20:>11.2f}MB{mp / mf:>10.2f}x{diff:>12.2e}")


# ------------------------------------------------------------------------------------------------- GPU


def gpu_rows(reps: int, quick: bool = False) -> list[dict]:
    """Print the GPU rows and return them; ``quick``: q/o 4096->4096 at r=16 only, without torch.compile."""
    from triton.testing import do_bench

    compiled = "" if quick else " vs torch.compile'd PEFT"
    print(f"GPU rows on {torch.cuda.get_device_name()}: Triton vs PEFT eager{compiled} (bf16)\n")
    rows: list[dict] = []
    header = f"{'shape':<22}{'M':>6}{'r':>4}{'pass':>9}{'impl':>14}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}" \
             f"{'peak GB':>9}{'vs eager':>9}"
    print(header)
    print("-" * len(header))
    shapes = [("q/o 4096->4096", 4096, 4096), ("gate 4096->14336", 4096, 14336), ("down 14336->4096", 14336, 4096)]
    for label, k, n in shapes[:1] if quick else shapes:
        for m in (2048, 8192):
            for r in (16,) if quick else (16, 64):
                layer = peft_layer(k, n, r, torch.bfloat16, "cuda")
                impls = {"peft eager": layer, **({} if quick else {"peft compiled": torch.compile(layer)}),
                         "triton": fused_call(layer, "triton")}
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
                flops = {"fwd": 2 * m * n * k + 2 * m * r * (k + n), "bwd": 2 * m * n * k + 4 * m * r * (k + n)}
                flops["fwd+bwd"] = flops["fwd"] + flops["bwd"]
                nbytes = 2 * (m * k + n * k + m * n)
                for pass_ in ("fwd", "bwd", "fwd+bwd"):
                    eager_ms = None
                    for name, fn in impls.items():
                        if pass_ == "fwd":
                            def run(fn=fn, x=x):
                                with torch.no_grad():
                                    fn(x)
                        elif pass_ == "bwd":
                            y = fn(x)

                            def run(y=y, dy=dy):
                                y.backward(dy, retain_graph=True)
                        else:
                            def run(fn=fn, x=x, dy=dy):
                                fn(x).backward(dy)
                        torch.cuda.reset_peak_memory_stats()
                        ms = do_bench(run, rep=max(reps * 20, 100))
                        peak = torch.cuda.max_memory_allocated() / 2**30
                        eager_ms = eager_ms or ms
                        print(f"{label:<22}{m:>6}{r:>4}{pass_:>9}{name:>14}{ms:>9.3f}"
                              f"{flops[pass_] / ms / 1e9:>9.1f}{nbytes / ms / 1e6:>8.0f}{peak:>9.2f}"
                              f"{eager_ms / ms:>8.2f}x")
                        rows.append({"shape": label, "k": k, "n": n, "m": m, "r": r, "pass": pass_, "impl": name,
                                     "ms": ms, "tflops": flops[pass_] / ms / 1e9, "peak_gb": peak,
                                     "vs_eager": eager_ms / ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="M at the embedded model's shapes (CPU rows)")
    parser.add_argument("--big-tokens", type=int, default=512, help="M at d=4096 (CPU rows)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU rows: torch threads (1: time thread CPU time)")
    parser.add_argument("--quick", action="store_true", help="GPU rows: d=4096, r=16 only, no torch.compile")
    parser.add_argument("--json", type=Path, help="GPU rows: also write them to this JSON file")
    args = parser.parse_args()
    if torch.cuda.is_available():
        rows = gpu_rows(args.reps, quick=args.quick)
        if args.json:
            import json

            args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    else:
        cpu_rows(args.tokens, args.big_tokens, args.reps, args.threads)


if __name__ == "__main__":
    main()
