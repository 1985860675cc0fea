"""Streaming full-model TIES: pluribus vs `mergekit-yaml` on 3 experts of a >=0.5B random Llama; time and peak RSS.

Builds a random base from a config (bf16 safetensors, 500MB shards), makes 3 experts by perturbing every tensor,
then runs the same mergekit YAML (ties, density 0.5, float32 arithmetic, bf16 out) through `pluribus merge` and
through `mergekit-yaml`, each in its own child process so the peak RSS (os.wait4) is that process's alone.
Prints wall time and peak RSS of each side, their ratios, and the largest difference between the two outputs.

    .venv/bin/python bench/merge_full.py [--layers 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Keep bench/ off sys.path: a script's name must never shadow an installed package (transformers
# probes for optional ones such as `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import yaml  # noqa: E402

BIN = Path(sys.executable).parent


def build_models(root: Path, layers: int, seed: int = 0) -> int:
    """Save base + 3 perturbed experts under root; returns the parameter count."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base", max_shard_size="500MB")
    del model
    for e in range(3):
        out = root / f"expert{e}"
        out.mkdir()
        g = torch.Generator().manual_seed(seed + 1 + e)
        for f in (root / "base").iterdir():
            if f.suffix == ".safetensors":
                sd = load_file(f)
                sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()}
                save_file(sd, out / f.name, metadata={"format": "pt"})
                del sd
            else:
                shutil.copy2(f, out / f.name)
    return n_params


def run_child(cmd: list[str]) -> tuple[float, float, float]:
    """Run cmd as a child; returns (wall seconds, peak RSS in GiB, CPU seconds) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime  # ru_maxrss is KiB on Linux


def max_diff(a: Path, b: Path) -> float:
    from pluribus.merge.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    worst = 0.0
    for name in ca.tensors:
        worst = max(worst, float((ca.get(name).float() - cb.get(name).float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="32 layers of hidden 1024 = 0.50B parameters")
    ap.add_argument("--compat", action="store_true", help="Also run pluribus on the mergekit YAML (its semantics)")
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it (default: temp, removed)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-merge-full-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        n_params = build_models(root, args.layers)
        print(f"built base + 3 experts: {n_params / 1e9:.3f}B parameters (bf16) in {time.perf_counter() - t:.0f} s")
        config = {
            "merge_method": "ties",
            "base_model": str(root / "base"),
            "models": [{"model": str(root / f"expert{e}"), "parameters": {"weight": 1.0, "density": 0.5}}
                       for e in range(3)],
            "parameters": {"lambda": 1.0},
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
        (root / "ties.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        native = {  # the same merge in pluribus' own YAML: paper semantics (equal weights: the same sign vote)
            "method": "ties", "base": str(root / "base"), "density": 0.5, "out_dtype": "bfloat16",
            "inputs": [{"path": str(root / f"expert{e}"), "weight": 1.0} for e in range(3)],
        }
        (root / "ties-pluribus.yaml").write_text(yaml.safe_dump(native, sort_keys=False))
        pl = [str(BIN / "pluribus"), "merge"]
        ours = run_child([*pl, str(root / "ties-pluribus.yaml"), "-o", str(root / "out-pluribus")])
        base = run_child([str(BIN / "mergekit-yaml"), str(root / "ties.yaml"), str(root / "out-mergekit")])
        diff = max_diff(root / "out-pluribus", root / "out-mergekit")
        result = {"pluribus": ours, "mergekit": base}
        print(f"pluribus ties {ours[0]:.1f} s wall, {ours[2]:.1f} s CPU, {ours[1]:.2f} GiB peak RSS | "
              f"mergekit-yaml {base[0]:.1f} s wall, {base[2]:.1f} s CPU, {base[1]:.2f} GiB")
        print(f"speedup {base[0] / ours[0]:.2f}x wall, {base[2] / ours[2]:.2f}x CPU time (target >= 2x); memory ratio "
              f"pluribus/mergekit {ours[1] / base[1]:.2f} (target <= 1); max |pluribus - mergekit| = {diff:.3g} "
              "(paper semantics: cut ties kept; bf16 outputs)")
        if args.compat:
            compat = run_child([*pl, str(root / "ties.yaml"), "-o", str(root / "out-compat")])
            result["pluribus_mergekit_mode"] = compat
            diff_compat = max_diff(root / "out-compat", root / "out-mergekit")
            print(f"pluribus on the mergekit YAML (mergekit semantics): {compat[0]:.1f} s wall ({base[0] / compat[0]:.2f}x), "
                  f"{compat[2]:.1f} s CPU ({base[2] / compat[2]:.2f}x), {compat[1]:.2f} GiB; max |diff| vs mergekit = {diff_compat:.3g}")
        print(json.dumps({k: {"seconds": round(v[0], 1), "cpu_seconds": round(v[2], 1), "peak_rss_gib": round(v[1], 2)}
                          for k, v in result.items()}))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
