"""Rank-64 merge of 4 LoRA adapters (ranks 8, 16, 32, 64, all linear modules of the embedded SmolLM2-135M):
pluribus (Gram/Cholesky + small eigenproblem, from the adapter files) vs PEFT `add_weighted_adapter("svd",
svd_rank=64)` vs the mergekit route (task_arithmetic over `base+adapter` models, i.e. one full model per adapter).

Prints each side's wall time, its relative Frobenius error against the exact weighted sum (computed in float64
from the factors), and the time ratios. Every side runs on the same number of threads (``--threads``, default all
cores: pluribus spreads modules over them, PEFT and mergekit use them inside torch), after its imports: pluribus is
timed on `run_merge` from the adapter folders to a new merged folder (median of 3 runs, after a warm-up); PEFT on
`add_weighted_adapter` alone, with the base model and the 4 adapters already loaded (the time that loading needs,
which pluribus never does, is printed separately); the mergekit route runs what `mergekit-yaml` runs in a child
process, its merge timed there after its imports (the whole process, start-up included, is printed too).

    .venv/bin/python bench/merge_adapters.py [--threads 1] [--no-mergekit]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import yaml  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = [8, 16, 32, 64]


def base_model(root: Path) -> Path:
    """The embedded model's folder; without it, a random Llama of identical shapes (the shapes are what matter)."""
    try:
        from pluribus.models import resolve_model

        return resolve_model("smollm2-135m")
    except Exception as e:  # the embedded model is an optional package; its shapes are all this needs
        print(f"embedded model unavailable ({e}); using a random Llama with SmolLM2-135M's shapes")
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "base")
        return root / "base"


def make_adapters(base: Path, root: Path) -> list[Path]:
    """4 adapters with random factors on every linear module, written as PEFT folders."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pluribus.merge.checkpoint import Checkpoint

    shapes = {n.removesuffix(".weight"): i.shape for n, i in Checkpoint(base).tensors.items()
              if n.endswith(".weight") and n.split(".")[-2] in TARGETS}
    paths = []
    for j, r in enumerate(RANKS):
        g = torch.Generator().manual_seed(j)
        out = root / f"lora-r{r}"
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, base_model_name_or_path=str(base),
                   task_type="CAUSAL_LM").save_pretrained(str(out))
        tensors = {}
        for name, (d_out, d_in) in shapes.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.01
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        paths.append(out)
    return paths


def exact_deltas(paths: list[Path]) -> dict[str, torch.Tensor]:
    from pluribus.merge.adapters import load_adapter

    out: dict[str, torch.Tensor] = {}
    for p in paths:
        for name, m in load_adapter(p).modules.items():
            d = m.delta(torch.float64)
            out[name] = out[name] + d if name in out else d
    return out


def rel_error(exact: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    num = sum(float((exact[k] - got[k].double()).pow(2).sum()) for k in exact)
    den = sum(float(v.pow(2).sum()) for v in exact.values())
    return math.sqrt(num / den)


def median_time(fn: Callable[[], object], runs: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``runs`` calls of ``fn``."""
    times = []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return sorted(times)[len(times) // 2]


def run_pluribus(paths: list[Path], out: Path) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    """run_merge from the folders (median of 3), and the in-memory merge alone on loaded adapters (as PEFT's is)."""
    from pluribus.merge import MergeInput, MergeSpec, run_merge
    from pluribus.merge.adapters import load_adapter, merge_adapters

    spec = MergeSpec(method="svd", rank=64, inputs=[MergeInput(path=str(p)) for p in paths])
    runs = iter(range(100))  # each run writes a new folder, as the mergekit route does
    seconds, cpu = median_time(lambda: run_merge(spec, out.with_name(f"{out.name}-{next(runs)}")))
    adapters = [load_adapter(p) for p in paths]
    in_memory, _ = median_time(lambda: merge_adapters(spec, adapters))
    return seconds, cpu, in_memory, {k: m.delta(torch.float64) for k, m in load_adapter(out.with_name(f"{out.name}-0")).modules.items()}


def run_peft(base: Path, paths: list[Path]) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    load = time.perf_counter() - start
    names = [f"a{i}" for i in range(len(paths))]
    start, cpu = time.perf_counter(), time.process_time()
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="svd", svd_rank=64)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    got = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "merged" in module.lora_A:
            got[name] = module.get_delta_weight("merged").detach().double()
    return seconds, cpu, load, got


MERGEKIT_CHILD = """
import json, sys, time
start = time.perf_counter()
import torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
cfg_path, out, cache, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
imported = time.perf_counter()
source = open(cfg_path).read()
options = MergeOptions(lora_merge_cache=cache, quiet=True)
options.apply_global_options()
run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), out, options=options, config_source=source)
print(json.dumps({"imports": imported - start, "merge": time.perf_counter() - imported}))
"""


def run_mergekit(
    base: Path, paths: list[Path], root: Path, exact: dict[str, torch.Tensor], threads: int
) -> dict[str, float]:
    """The mergekit route in a child process (what `mergekit-yaml` runs): its merge timed inside the child after
    its imports (the like-for-like figure: pluribus is timed in-process after its imports), and the whole process."""
    from pluribus.merge.checkpoint import Checkpoint

    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "models": [{"model": f"{base}+{p}", "parameters": {"weight": 1.0}} for p in paths]}
    (root / "mk.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),  # its LoRA cache stays in root
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", MERGEKIT_CHILD, str(root / "mk.yaml"), str(root / "out-mergekit"),
                             str(root / "lora-cache"), str(threads)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    out, err = proc.communicate()
    process = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mergekit failed:\n{err.decode()[-2000:]}")
    times = json.loads(out.decode().strip().splitlines()[-1])
    merged, b = Checkpoint(root / "out-mergekit"), Checkpoint(base)
    got = {k: merged.get(f"{k}.weight").double() - b.get(f"{k}.weight").double() for k in exact}
    return {"merge_seconds": times["merge"], "process_seconds": process, "import_seconds": times["imports"],
            "error": rel_error(exact, got)}


def warm_up() -> None:
    """Import both sides and run LAPACK/BLAS once, so no timed region pays for imports or first-call set-up."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from peft.tuners.lora import LoraLayer  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import pluribus.merge  # noqa: F401
    import pluribus.merge.adapters  # noqa: F401

    x = torch.randn(256, 128)
    for dtype in (torch.float32, torch.float64):
        y = x.to(dtype)
        torch.linalg.svd(y, full_matrices=False)
        torch.linalg.qr(y)
        torch.linalg.cholesky(y.T @ y + torch.eye(128, dtype=dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-mergekit", action="store_true", help="Skip the (slow) mergekit route.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every side (default: all cores)")
    args = ap.parse_args()
    # the same thread count for every side: a like-for-like comparison
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-merge-adapters-"))
    try:
        warm_up()
        base = base_model(root)
        paths = make_adapters(base, root)
        exact = exact_deltas(paths)
        print(f"{len(exact)} modules, adapters of ranks {RANKS}, exact sum of rank <= {sum(RANKS)}, {args.threads} thread(s)")
        t_ours, c_ours, t_mem, ours = run_pluribus(paths, root / "out-pluribus")
        e_ours = rel_error(exact, ours)
        t_peft, c_peft, t_load, peft = run_peft(base, paths)
        e_peft = rel_error(exact, peft)
        result = {"pluribus": {"seconds": round(t_ours, 3), "cpu_seconds": round(c_ours, 3), "error": e_ours,
                                 "in_memory_seconds": round(t_mem, 3)},
                  "peft_svd": {"seconds": round(t_peft, 3), "cpu_seconds": round(c_peft, 3), "error": e_peft,
                               "load_seconds": round(t_load, 3)}}
        print(f"pluribus rank-64 (run_merge, folders -> folder, median of 3): {t_ours:.3f} s wall, {c_ours:.3f} s CPU, "
              f"relative error {e_ours:.4e}")
        print(f"pluribus in-memory merge alone (merge_adapters on loaded adapters, median of 3): {t_mem:.3f} s wall")
        print(f"PEFT svd rank-64 (add_weighted_adapter only): {t_peft:.3f} s wall, {c_peft:.3f} s CPU, "
              f"relative error {e_peft:.4e}")
        print(f"PEFT loading base model + 4 adapters first (untimed above; pluribus needs no base): {t_load:.3f} s")
        print(f"speedup vs PEFT {t_peft / t_ours:.1f}x wall, {c_peft / c_ours:.1f}x CPU (target >= 20x); "
              f"in-memory vs in-memory {t_peft / t_mem:.1f}x; including PEFT's loading {(t_peft + t_load) / t_ours:.1f}x; "
              f"error ratio pluribus/PEFT {e_ours / e_peft:.4f} (target <= 1)")
        if not args.no_mergekit:
            mk = run_mergekit(base, paths, root, exact, args.threads)
            result["mergekit_route"] = {k: round(v, 2) if k != "error" else v for k, v in mk.items()}
            t_mk = mk["merge_seconds"]
            print(f"mergekit route (4 full models + task_arithmetic), timed after its imports: {t_mk:.2f} s wall, relative "
                  f"error {mk['error']:.4e} (full rank); speedup {t_mk / t_ours:.1f}x wall (target >= 50x)")
            print(f"  the whole mergekit process (interpreter, {mk['import_seconds']:.2f} s of imports, merge): "
                  f"{mk['process_seconds']:.2f} s = {mk['process_seconds'] / t_ours:.1f}x pluribus in-process")
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
