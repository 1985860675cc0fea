"""GPU check: the kernel tests on CUDA, the fused-LoRA rows against PEFT, and a tiny recipe end to end on the GPU.

One prepared script for the day a GPU is at hand (``make gpu-check``; sized for one H100 in at most 8 minutes,
offline). It leaves its results in one folder (``--out``, default runs/gpu-check; 8 files at most: a log per
step, ``results.json`` with the recipe it ran, ``summary.md``, the GPU rows and eval's results); the model and
the run it trains go to ``--work`` (default runs/gpu-check-work). Steps:

1. ``kernels``: tests/kernels on the GPU, compiled (``PLURIBUS_KERNEL_DEVICE=cuda``, no TRITON_INTERPRET).
2. ``fused_kernels``: bench/fused_kernels.py's GPU rows at d=4096, r=16, bf16 (``--quick``); the target is
   fused LoRA forward+backward at least 1.3x PEFT eager.
3. ``recipe``: a random Qwen3-shaped model of about 0.5B parameters built here from a config (no download),
   then ``pluribus run`` of a tiny recipe (debate on the transformers backend, build with Monte-Carlo rollouts,
   rsft, prm, rl, a merge folded into a model, eval); every stage's record must name the device it ran on. The
   model answers by construction (each token's embedding points its output head at the next token of one fixed
   reply, with large margins), so a random model still gives parseable answers, consensus data and rollouts.
4. ``cpu_agreement``: eval again with ``device=cpu`` on a copy of the run, the same adapters and merge; how
   many greedy answers equal the GPU's, and the base model's logits on both devices (bf16).

``--cpu`` (what runs where there is no GPU, as here): steps 1 and 2 are skipped, step 3 runs on the CPU with a
small model of the same shape family (``--size tiny``) and step 4 compares the CPU with itself, so the script
itself is exercised end to end.

    python bench/gpu_check.py [--out runs/gpu-check] [--cpu] [--size 0.5b|tiny] [--tokenizer DIR]

The tokenizer comes from ``gpu-wheels/tokenizer`` (``make gpu-wheels`` copies the embedded model's there), else
from the embedded model itself. Exit status 1 when a check failed.

On a lent GPU machine (no network; its python3 holds torch, transformers, peft, accelerate, triton): run
``make gpu-wheels`` here first, then ``make gpu-check`` there with ``gpu-wheels`` carried beside the working tree
(it is git-ignored), e.g. ``make gpu-check GPU_OUT=$OUT/gpu-check 2>&1`` (its 8 files are all the tool brings
back: no ``tee $OUT/log`` beside them; the command's own output comes back anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# keep bench/ off sys.path: a script there must never shadow an installed package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
REPLIES = ("Step one! The answer is 4.", "Step one! So the answer is 7.", "First step! Then 9.")
SIZES = {  # Qwen3-0.6B's shape (vocab: the tokenizer's), and a small one for the CPU run
    "0.5b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128),
}
# caps per step, 460 s together: with the model build (about 20 s) the check stays under 8 minutes on one H100,
# so a 15-minute slot holds a rerun; a step past its cap is stopped and reported as failed
TIMEOUTS = {"kernels": 130, "fused_kernels": 60, "recipe": 200, "cpu_agreement": 70}


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_logged(cmd: list[str], log: Path, timeout: int, **kwargs: Any) -> int:
    """Run ``cmd`` with its output in ``log``; its exit status (124 when it ran past ``timeout``)."""
    with log.open("w") as f:
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                                  **kwargs).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu-check] stopped after {timeout} s\n")
            return 124


def tail(log: Path, n: int = 8) -> str:
    return "\n".join(log.read_text(errors="replace").strip().splitlines()[-n:]) if log.is_file() else ""


# ------------------------------------------------------------------------------------------------ 1, 2


def kernels(out: Path) -> dict[str, Any]:
    log = out / "kernels.log"
    rc = run_logged([sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider", "-rfE"],
                    log, TIMEOUTS["kernels"],
                    env=env(PLURIBUS_KERNEL_DEVICE="cuda", TRITON_INTERPRET="0"))
    return {"ok": rc == 0, "exit": rc, "last_lines": tail(log, 3)}


def fused_kernels(out: Path) -> dict[str, Any]:
    log, rows_file = out / "fused_kernels.log", out / "fused_kernels.json"
    rc = run_logged([sys.executable, "bench/fused_kernels.py", "--quick", "--json", str(rows_file)], log,
                    TIMEOUTS["fused_kernels"], env=env())
    if rc != 0 or not rows_file.is_file():
        return {"ok": False, "exit": rc, "last_lines": tail(log)}
    rows = json.loads(rows_file.read_text())["rows"]
    target = [r for r in rows if r["pass"] == "fwd+bwd" and r["impl"] == "triton" and r["k"] == 4096 and r["r"] == 16]
    speedups = {f"M={r['m']}": round(r["vs_eager"], 3) for r in target}
    return {"ok": bool(target) and min(speedups.values()) >= 1.3, "target": ">= 1.3x PEFT eager, fwd+bwd, d=4096, "
            "r=16, bf16", "fused_vs_peft_eager": speedups, "rows": len(rows)}


# ------------------------------------------------------------------------------------------------ 3


def tokenizer_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    carried = REPO / "gpu-wheels" / "tokenizer"
    if (carried / "tokenizer_config.json").is_file():
        return carried
    from pluribus.models import resolve_model

    return resolve_model("smollm2-135m")


def chain(tok: Any) -> tuple[list[int], str]:
    """The token path of one fixed reply: the generation prompt's last token, the reply, end of turn; each
    token followed by exactly one other (the model maps a token to its successor)."""
    text = tok.apply_chat_template([{"role": "user", "content": "2 + 2?"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]  # as the backends encode it
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    for reply in REPLIES:
        path = [prompt[-1], *tok(reply, add_special_tokens=False)["input_ids"], end]
        if len(set(path[:-1])) == len(path) - 1:  # no token has two successors
            return path, reply
    raise SystemExit("gpu-check: no reply of REPLIES tokenizes without a repeated token; add one")


def build_model(folder: Path, tok_dir: Path, size: str) -> dict[str, Any]:
    """A random Qwen3-shaped model that answers one fixed reply by construction, saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    path, reply = chain(tok)
    config = Qwen3Config(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=path[-1], pad_token_id=tok.pad_token_id,
                         **SIZES[size])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.normal_(0.0, 1.0)  # the token's own embedding dominates the residual stream ...
        for layer in model.model.layers:  # ... over the layers' (small) writes to it
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
        head.normal_(0.0, 0.02)
        h = config.hidden_size
        for a, b in zip(path, path[1:], strict=False):
            # after the final RMSNorm the state is about sqrt(h) * emb[a] / |emb[a]|: a logit of 40 for b
            head[b] += 40.0 / h**0.5 * emb[a] / emb[a].norm()
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "reply": reply, "size": size, "config": SIZES[size]}


def recipe_yaml(root: Path, model: Path, device: str) -> dict[str, Any]:
    m = str(model)
    sampling = {"temperature": 0.0, "max_new_tokens": 24}
    return {
        "name": "gpu-check", "root": str(root), "seed": 0, "device": device,
        "task": {"source": "synthetic", "n": 8, "heldout_fraction": 0.5, "synthetic": {"steps": 1}},
        "team": {"rounds": 2, "batch_size": 16, "agents": [
            {"name": "a", "model": m, "sampling": sampling},
            {"name": "b", "model": m, "sampling": {**sampling, "temperature": 0.7, "seed": 1}}]},
        "build": {"kinds": ["rsft", "process"], "target": "consensus", "step_rule": "sentences",
                  "rollouts_per_step": 2, "traces_per_problem": 1,
                  "completer": {"model": m, "sampling": {"temperature": 0.7, "max_new_tokens": 24}}},
        "train": {"model": m, "max_steps": 2, "batch_size": 4, "max_length": 256, "eval_fraction": 0.0,
                  "save_steps": 1000, "report_to": ["none"], "lora": {"r": 8, "alpha": 16}, "experts": [
                      {"objective": "rsft"}, {"objective": "prm"},
                      {"name": "rl", "objective": "rl", "init_adapter": "rsft",
                       "rl": {"group_size": 2, "prompts_per_step": 2, "sampling": {"max_new_tokens": 24}}}]},
        "merge": {"experts": ["rsft", "rl"], "method": "task_arithmetic", "name": "merged",
                  "params": {"output": "model", "base": m}},
        "eval": {"n": 4, "systems": ["single", "experts", "merged"], "modes": ["greedy"]},
    }


def records_say(run: Path, expected: str) -> dict[str, Any]:
    """Where every stage's record says it ran; ``ok`` when each names ``expected`` (cuda or cpu), and on cuda none
    says float32."""
    seen: dict[str, str] = {}

    def parts(stage: str, data: Any) -> None:
        for name, w in (data or {}).items():
            seen[f"{stage} {name}"] = " ".join(str(v) for v in w.values())

    for stage, f in (("debate", run / "trajectories" / "devices.json"), ("build", run / "rollouts" / "devices.json")):
        parts(stage, json.loads(f.read_text())["parts"] if f.is_file() else {"(no record)": {"device": "missing"}})
    for rec in sorted((run / "adapters").glob("*/training_record.json")):
        data = json.loads(rec.read_text())
        parts(f"train:{rec.parent.name}", {"policy": data.get("ran_on") or {"device": "missing"}})
        if "prm_ran_on" in data.get("data", {}):
            parts(f"train:{rec.parent.name}", {"prm": data["data"]["prm_ran_on"]})
    for rep in sorted((run / "merged").glob("*/merge_report.json")):
        seen[f"merge:{rep.parent.name}"] = str(json.loads(rep.read_text()).get("ran_on", "missing"))
    results = run / "eval" / "results.json"
    for system, agents in (json.loads(results.read_text()).get("ran_on", {}) if results.is_file() else
                           {"(no results)": {"": {"device": "missing"}}}).items():
        parts(f"eval {system}", agents or {"": {"device": "missing"}})
    # on a GPU (compute capability 8+, as an H100) the policy's dtype is bf16: a float32 record is a fallback
    wrong = {k: v for k, v in seen.items() if not v.startswith(expected) or (expected == "cuda" and "float32" in v)}
    return {"ok": bool(seen) and not wrong, "expected": expected, "records": seen, "not_on_expected": wrong}


def greedy_answers(run: Path) -> dict[str, tuple[str, str | None]]:
    """Every eval store's greedy replies: (store folder, problem) -> (first reply, final answer)."""
    out = {}
    for shard in sorted((run / "eval").rglob("trajectories/*.jsonl")):
        folder = str(shard.parent.parent.relative_to(run / "eval"))
        for line in shard.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(folder, r["problem_id"])] = (r["rounds"][0][0]["response"], r["final_answer"])
    return {f"{k[0]}/{k[1]}": v for k, v in out.items()}


def recipe(out: Path, work: Path, device: str, size: str, tok: str | None, timeout: int) -> dict[str, Any]:
    import yaml

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    model = build_model(work / "model", tokenizer_dir(tok), size)
    model["build_seconds"] = round(time.perf_counter() - t0, 1)
    cfg = recipe_yaml(work / "runs", work / "model", device)
    (work / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = run_logged([sys.executable, "-m", "pluribus.cli", "run", str(work / "recipe.yaml"), "--no-progress"],
                    out / "recipe.log", timeout, env=env())
    run = work / "runs" / "gpu-check"
    where = records_say(run, device)
    results = run / "eval" / "results.json"
    if results.is_file():
        shutil.copy(results, out / "eval_results.json")
    return {"ok": rc == 0 and where["ok"], "exit": rc, "model": model, "recipe": cfg, "where": where,
            "answers": greedy_answers(run), "last_lines": "" if rc == 0 else tail(out / "recipe.log")}


# ------------------------------------------------------------------------------------------------ 4


def cpu_agreement(out: Path, work: Path, gpu_answers: dict[str, Any], device: str) -> dict[str, Any]:
    """Eval on the CPU over a copy of the ``device`` run (its adapters and merge), against its greedy answers
    (``device`` cpu: the step's own dry run, the CPU against itself)."""
    import torch

    gpu_run, cpu_run = work / "runs" / "gpu-check", work / "runs" / "gpu-check-cpu"
    shutil.rmtree(cpu_run, ignore_errors=True)
    shutil.copytree(gpu_run, cpu_run, ignore=lambda d, names: ["eval"] if Path(d) == gpu_run else [])
    rc = run_logged([sys.executable, "-m", "pluribus.cli", "eval", str(work / "recipe.yaml"), "name=gpu-check-cpu",
                     "--device", "cpu", "--no-progress"], out / "cpu_eval.log", TIMEOUTS["cpu_agreement"], env=env())
    cpu_answers = greedy_answers(cpu_run)
    both = sorted(set(gpu_answers) & set(cpu_answers))
    same_text = sum(gpu_answers[k][0] == cpu_answers[k][0] for k in both)
    same_answer = sum(gpu_answers[k][1] == cpu_answers[k][1] for k in both)
    # the base model's logits on one prompt, bf16 on both devices
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = {}
    for dev in (device, "cpu"):
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16).to(dev).eval()
        with torch.no_grad():
            logits[dev] = model(ids.to(dev)).logits.float().cpu()
        del model
    gpu, cpu = logits[device], logits["cpu"]
    diff = (gpu - cpu).abs()
    top1 = (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item()
    scale = cpu.abs().max().item()
    return {"ok": rc == 0 and bool(both) and same_answer == len(both) and top1 >= 0.95, "exit": rc,
            "compared": len(both), "same_text": same_text, "same_answer": same_answer,
            "logits_max_abs_diff": round(diff.max().item(), 4), "logits_scale": round(scale, 2),
            "logits_top1_agreement": round(top1, 4), "positions": int(diff.shape[1]),
            **({} if device != "cpu" else {"note": "no GPU: the CPU against itself, exercising the step only"})}


# ------------------------------------------------------------------------------------------------ main


def summary_md(results: dict[str, Any]) -> str:
    lines = [f"# gpu-check: {results['device']}", "", f"{results['seconds']:.0f} s in all; mode: {results['mode']}",
             "", "| step | ok | seconds | detail |", "|---|---|---:|---|"]
    for name, s in results["steps"].items():
        detail = {k: v for k, v in s.items() if k not in ("ok", "seconds", "answers", "where", "model", "recipe")}
        if "where" in s:
            detail["records"] = f"{len(s['where']['records'])} say {s['where']['expected']}" if s["where"]["ok"] \
                else f"not on {s['where']['expected']}: {s['where']['not_on_expected']}"
        lines.append(f"| {name} | {s.get('ok')} | {s.get('seconds', 0):.0f} | {json.dumps(detail)[:400]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="the folder of results")
    parser.add_argument("--cpu", "--dry-run", action="store_true", dest="cpu",
                        help="the CPU parts only: the recipe on the CPU with a small model (no GPU here)")
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default 0.5b on the GPU, tiny with --cpu)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default gpu-wheels/tokenizer, else the embedded one)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu-check-work",
                        help="where the model and its run go (replaced)")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        raise SystemExit("gpu-check: torch sees no CUDA GPU here; run with --cpu for the CPU parts")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if gpu else "cpu"
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if gpu else "CPU (no GPU)", "mode": "gpu" if gpu else "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0], "steps": {}}
    start = time.perf_counter()

    def step(name: str, fn: Any, *a: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            r = fn(*a)
        except Exception as e:  # a step that breaks is a finding, reported with the others
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results["steps"][name] = r
        print(f"[gpu-check] {name}: {'ok' if r.get('ok') else 'FAILED'} ({r['seconds']} s)", flush=True)
        return r

    if gpu:
        step("kernels", kernels, out)
        step("fused_kernels", fused_kernels, out)
    else:
        results["steps"]["kernels"] = {"ok": None, "skipped": "no GPU: make test runs them under TRITON_INTERPRET"}
        results["steps"]["fused_kernels"] = {"ok": None, "skipped": "no GPU: the CPU rows are bench/fused_kernels.py's"}
    # the CPU run (a shared 2-core machine, say) gets 6x the GPU's time: it is there to exercise the script
    rec = step("recipe", recipe, out, args.work, device, args.size or ("0.5b" if gpu else "tiny"), args.tokenizer,
               TIMEOUTS["recipe"] * (1 if gpu else 6))
    if rec.get("exit") == 0:
        step("cpu_agreement", cpu_agreement, out, args.work, rec.get("answers", {}), device)
    else:
        results["steps"]["cpu_agreement"] = {"ok": None, "skipped": "the recipe did not finish"}
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_md(results))
    print(summary_md(results))
    failed = [k for k, s in results["steps"].items() if s.get("ok") is False]
    print(f"[gpu-check] results in {out}; " + (f"FAILED: {', '.join(failed)}" if failed else "every check passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
