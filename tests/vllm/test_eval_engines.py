"""Eval on vLLM starts one engine per base model: the single agent, the team and every expert (a LoRA request
each) answer from it, and each adapter's answers are its own."""

from __future__ import annotations

import json
from pathlib import Path

from pluribus.config import load_recipe
from pluribus.data import vllm_engine
from pluribus.data.store import TrajectoryStore

AGENT = ("{model: smollm2-135m, backend: vllm, context_length: 1024, vllm: {kv_cache_gib: 1}, "
         "sampling: {temperature: 0.0, max_new_tokens: 24}}")


def _random_adapter(base: Path, out: Path, seed: int, r: int) -> None:
    """A LoRA whose B is not zero (PEFT's init leaves an adapter that changes nothing), so it answers otherwise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # strong enough to move greedy answers of one-step sums
    model.save_pretrained(out)


def _answers(folder: Path) -> dict[str, str]:
    stores = [d for d in folder.rglob("trajectories") if (d / "manifest.json").is_file()]
    assert len(stores) == 1, stores
    return {r["problem_id"]: r["rounds"][0][0]["response"] for r in TrajectoryStore(stores[0]).iter_records()}


def test_eval_on_vllm_starts_one_engine_for_every_system_of_a_base(tmp_path, smollm2_dir, monkeypatch):
    run = tmp_path / "shared"
    _random_adapter(smollm2_dir, run / "adapters" / "a", seed=1, r=8)
    _random_adapter(smollm2_dir, run / "adapters" / "b", seed=2, r=16)  # another rank: the engine holds both
    starts: list[dict] = []
    real = vllm_engine.start_engine

    def counting(kwargs, *, what):
        starts.append(kwargs)
        return real(kwargs, what=what)

    monkeypatch.setattr(vllm_engine, "start_engine", counting)
    recipe = load_recipe(None, [
        f"root={tmp_path}", "name=shared", "task.source=synthetic", "task.synthetic.level=quickstart", "task.n=8",
        "task.heldout_fraction=0.5", f"team.agents=[{AGENT}, {AGENT}]", "team.rounds=2",
        "team.prompts.question='{question} Answer with \\boxed{N}.'",
        "train.experts=[{name: a, objective: rsft}, {name: b, objective: rsft}]",
        "eval.systems=[single, team, experts]", "eval.n=4",
    ])
    from pluribus.stages.eval import run_eval

    payload = run_eval(recipe, progress=False)
    assert set(payload["systems"]) == {"single-greedy", "team", "a-greedy", "b-greedy"}
    assert all(r["problems"] == 4 for r in payload["systems"].values())
    # one engine for the base and both adapters, with LoRA on at a rank that holds the larger one
    assert len(starts) == 1 and starts[0]["enable_lora"] and starts[0]["max_lora_rank"] == 16
    eval_dir = run / "eval"
    base, a, b = (_answers(eval_dir / name) for name in ("single-greedy", "a-greedy", "b-greedy"))
    assert base.keys() == a.keys() == b.keys()
    # each system answered with its own weights: the adapters' greedy answers are neither the base's nor each other's
    assert a != base and b != base and a != b
    # a rerun resumes from the stores without starting an engine
    starts.clear()
    assert run_eval(recipe, progress=False) == json.loads((eval_dir / "results.json").read_text())
    assert starts == []
