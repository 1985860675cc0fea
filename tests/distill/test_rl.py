"""Process-aware RL: advantages and loss against hand computation, and a few real steps on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from pluribus.config import Recipe, RLSettings
from pluribus.distill.prm import train_prm
from pluribus.distill.rl import (
    LocalSampler,
    aggregate_steps,
    group_advantages,
    policy_loss,
    token_logprobs,
    train_rl,
)
from pluribus.errors import PluribusError
from tests.distill.conftest import read_record


def test_aggregate_steps():
    assert aggregate_steps([0.9, 0.2, 0.7], "min") == pytest.approx(0.2)
    assert aggregate_steps([0.9, 0.2, 0.7], "mean") == pytest.approx(0.6)
    assert aggregate_steps([0.9, 0.2, 0.7], "last") == pytest.approx(0.7)
    assert aggregate_steps([], "min") == 0.0


def test_group_advantages_by_hand():
    # group rewards 1, 0, 0.5, 0.5: mean 0.5, population std sqrt((.25 + .25 + 0 + 0) / 4) = sqrt(0.125)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]]), eps=0.0 + 1e-12)
    s = math.sqrt(0.125)
    torch.testing.assert_close(adv[0], torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]))
    torch.testing.assert_close(adv[1], torch.zeros(4))  # a group that all agrees teaches nothing


def test_dr_grpo_advantages_are_not_divided_by_the_group_std():
    # Dr. GRPO (Liu et al. 2025, arXiv:2503.20783) drops the std normalisation (a question bias): A = r - mean_g r
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 4.0]])
    torch.testing.assert_close(group_advantages(rewards, loss_type="dr_grpo"),
                               torch.tensor([[0.5, -0.5, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]]))
    for loss_type in ("grpo", "dapo"):  # these keep GRPO's scaled advantages
        torch.testing.assert_close(group_advantages(rewards, loss_type=loss_type), group_advantages(rewards))


def test_policy_loss_by_hand():
    # two completions: A = +1 (2 tokens, second padded away), A = -2 (2 tokens)
    logp = torch.tensor([[math.log(0.5), math.log(0.9)], [math.log(0.3), math.log(0.2)]])
    old = torch.tensor([[math.log(0.25), math.log(0.9)], [math.log(0.3), math.log(0.4)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.6), math.log(0.2)]])
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1, 0], [1, 1]])
    # ratios: row 0: 2.0 (clipped to 1.2 since A > 0) ; row 1: 1.0, 0.5 (clipped to 0.8 since A < 0: max(...))
    # pg per token = -min(r A, clip(r) A): row0 t0: -min(2, 1.2) = -1.2
    # row1 t0: -min(-2, -2) = 2 ; row1 t1: -min(-1.0, -1.6) = 1.6
    # k3 KL: q = ref - logp; row0 t0: q = 0 -> 0; row1 t0: q = log 2 -> 2 - log 2 - 1; row1 t1: q = 0 -> 0
    beta = 0.1
    kl10 = 2 - math.log(2) - 1
    expected = ((-1.2) + ((2 + beta * kl10) + 1.6) / 2) / 2
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2, ref_logp=ref, beta=beta)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["kl"] == pytest.approx(kl10 / 3, rel=1e-5)
    # without the KL term there is no reference pass: no KL figure, rather than a KL of 0
    assert "kl" not in policy_loss(logp, old, adv, mask, clip=0.2, ref_logp=None, beta=0.0)[1]
    # the gradient flows through logp only (old and ref are constants)
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, adv, mask, 0.2, ref, beta)[0].backward()
    assert lp.grad[0, 1] == 0  # padded token
    assert lp.grad[0, 0] == 0  # clipped with A > 0: no gradient from the PG term, KL term is 0 at q = 0


def test_policy_loss_variants_by_hand():
    # the batch of test_policy_loss_by_hand: token losses (PG + beta KL) row 0: [-1.2, padded], row 1: [2 + b kl, 1.6]
    logp = torch.tensor([[math.log(0.5), math.log(0.9)], [math.log(0.3), math.log(0.2)]])
    old = torch.tensor([[math.log(0.25), math.log(0.9)], [math.log(0.3), math.log(0.4)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.6), math.log(0.2)]])
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1, 0], [1, 1]])
    beta = 0.1
    t00, t10, t11 = -1.2, 2 + beta * (2 - math.log(2) - 1), 1.6
    expected = {
        "grpo": (t00 / 1 + (t10 + t11) / 2) / 2,  # each completion's token mean, then the mean of completions
        "dapo": (t00 + t10 + t11) / 3,  # every completion token weighs the same: / 3 tokens
        "dr_grpo": (t00 + t10 + t11) / (2 * 5),  # / (2 completions x max_new_tokens 5): no length normalisation
    }
    for loss_type, value in expected.items():
        loss, _ = policy_loss(logp, old, adv, mask, clip=0.2, ref_logp=ref, beta=beta, loss_type=loss_type,
                              max_tokens=5)
        assert float(loss) == pytest.approx(value, rel=1e-6), loss_type
    assert len({round(v, 6) for v in expected.values()}) == 3  # the batch tells the three apart
    with pytest.raises(PluribusError, match="max_tokens"):
        policy_loss(logp, old, adv, mask, loss_type="dr_grpo")


def test_repeated_batches_give_each_steps_prompts_num_iterations_times():
    from pluribus.distill.rl import RepeatedBatches

    sampler = RepeatedBatches(5, chunk=2, repeats=3, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 3 * 2 * 3  # 5 prompts padded to 3 chunks of 2, each given 3 times
    chunks = [order[i:i + 6] for i in range(0, len(order), 6)]
    assert all(c[:2] == c[2:4] == c[4:] for c in chunks)  # one step's prompts, three steps in a row
    assert set(order) == set(range(5))  # every prompt, the last chunk filled from the start of the order
    sampler.set_epoch(1)
    assert list(sampler) != order and len(list(sampler)) == len(order)  # another order each epoch, seeded


def test_rl_refuses_settings_without_effect():
    from pydantic import ValidationError

    from pluribus.config import TrainConfig

    with pytest.raises(ValidationError, match="rl.clip 0.05 has no effect with rl.num_iterations 1"):
        TrainConfig(objective="rl", rl={"clip": 0.05})
    with pytest.raises(ValidationError, match="rl.reference base has no effect with rl.kl 0"):
        TrainConfig(objective="rl", rl={"reference": "base"})
    TrainConfig(objective="rl", rl={"clip": 0.05, "num_iterations": 2, "reference": "base", "kl": 0.1})
    # a shared section's rl completed by an expert's entry is judged on the expert
    TrainConfig(rl={"clip": 0.05}, experts=[{"objective": "rl", "rl": {"num_iterations": 2}}])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_trainer_logprobs_are_the_samplers_distribution(top_p):
    # The distribution the sampler draws from must be the one the loss differentiates, even for a model whose
    # generation_config.json asks for top_k, min_p and a repetition penalty (decode never reads it).
    from transformers import LlamaConfig, LlamaForCausalLM

    from pluribus.data.decoding import decode, row_sampler
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    model.generation_config.update(top_k=5, top_p=0.5, min_p=0.2, repetition_penalty=1.3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked distribution, so the nucleus drops tokens at top_p 0.9
    prompt = torch.randint(1, 23, (2, 6), generator=torch.Generator().manual_seed(1))
    prompt_mask = torch.ones_like(prompt)
    prompt[1, :2], prompt_mask[1, :2] = 0, 0  # left padding, as the sampler batches
    draws = 2000
    ids, mask = prompt.repeat_interleave(draws, 0), prompt_mask.repeat_interleave(draws, 0)
    picked = torch.tensor(decode(model, ids, mask, max_new_tokens=2, eos=[],
                                 pick=row_sampler(list(range(2 * draws)), 0.7, top_p)))
    for r in range(2):
        rows = picked[r * draws:(r + 1) * draws]
        seq = torch.cat([ids[r * draws:(r + 1) * draws], rows], dim=1)
        attention = torch.cat([mask[r * draws:(r + 1) * draws], torch.ones_like(rows)], dim=1)
        with torch.no_grad():
            lp = token_logprobs(model, seq, attention, 2, 0.7, top_p)  # each drawn token under the loss's p
        assert torch.isfinite(lp).all()
        # first token: empirical frequencies match exp(logp) of the loss's distribution, token by token
        with torch.no_grad():
            last = model(input_ids=prompt[r:r + 1], attention_mask=prompt_mask[r:r + 1],
                         position_ids=(prompt_mask[r:r + 1].cumsum(1) - 1).clamp(min=0)).logits[0, -1]
        scaled = last[None] / 0.7
        if top_p < 1.0:
            from transformers.generation.logits_process import TopPLogitsWarper

            scaled = TopPLogitsWarper(top_p)(None, scaled)
            assert torch.isinf(scaled).sum() > 0  # the nucleus leaves tokens out
        p = scaled[0].softmax(-1)
        freq = torch.bincount(rows[:, 0], minlength=23).float() / draws
        torch.testing.assert_close(freq, p, atol=0.035, rtol=0)  # 2000 draws: 3.5 standard errors at p=0.5
        assert freq[p == 0].sum() == 0
        assert torch.allclose(lp[:, 0], torch.log(p[rows[:, 0]]), atol=1e-4)


def test_local_sampler_samples_with_the_distribution_the_loss_uses(student_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pluribus.data.decoding as decoding

    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    seen = {}
    sampler = decoding.row_sampler

    def spy(seeds, temperature, top_p):
        seen.update(n=len(seeds), temperature=temperature, top_p=top_p)
        return sampler(seeds, temperature, top_p)

    monkeypatch.setattr(decoding, "row_sampler", spy)
    settings = RLSettings(group_size=2, sampling={"temperature": 0.7, "max_new_tokens": 3})
    torch.manual_seed(0)
    first = LocalSampler(tok, settings)(model, ["What is 2 + 2?", "What is 3 + 1?"])
    assert seen == {"n": 4, "temperature": 0.7, "top_p": 1.0}
    assert len(first) == 4 and all(1 <= len(c) <= 3 for c in first)
    torch.manual_seed(0)
    assert LocalSampler(tok, settings)(model, ["What is 2 + 2?", "What is 3 + 1?"]) == first  # reproducible


def test_rl_trains_a_few_steps_with_prm_and_kl(tmp_path, student_dir, process_dir):
    base = {"model": str(student_dir), "kernels": "off", "max_steps": 2, "batch_size": 4, "logging_steps": 1,
            "save_steps": 10, "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4}}
    prm = train_prm(Recipe(name="t", root=str(tmp_path / "runs"), train={**base, "objective": "prm", "max_steps": 1}),
                    dataset=process_dir)
    r = Recipe(name="t", root=str(tmp_path / "runs"), train={
        **base, "objective": "rl", "kernels": "torch", "rl": {"group_size": 3, "prompts_per_step": 2, "max_new_tokens": 12, "kl": 0.05,
                                      "aggregate": "mean", "prm": str(prm)}})
    out = train_rl(r, dataset=process_dir)
    record = read_record(out)
    assert record["data"]["prompts"] == 24
    for key in ("final_reward", "final_accuracy", "final_kl", "final_prm_score"):
        assert key in record["metrics"], key
    # reward = PRM part + answer weight * accuracy, all logged
    m = record["metrics"]
    assert m["final_reward"] == pytest.approx(m["final_prm_score"] + m["final_accuracy"], abs=1e-5)
    # every logged step is kept for `pluribus view`'s curves, the last one the final figures above
    logged = [h for h in record["log_history"] if "reward" in h]
    assert [h["step"] for h in logged] == [1, 2] and logged[-1]["reward"] == pytest.approx(m["final_reward"])


def test_rl_needs_gold_answers(tmp_path, student_dir):
    from tests.distill.conftest import write_parquet

    rows = [{"prompt": "q", "completions": ["a"], "labels": [True], "scores": [1.0], "problem_id": "p"}]
    ds = write_parquet(rows, tmp_path / "p")
    r = Recipe(name="t", root=str(tmp_path / "runs"), train={"objective": "rl", "model": str(student_dir),
                                                             "kernels": "off"})
    with pytest.raises(PluribusError, match="gold answers"):
        train_rl(r, dataset=ds)


def test_rl_grades_a_multiple_choice_task_by_its_choices(tmp_path):
    # The gold of a multiple-choice task is a letter; without the choices no reply names it, so every reward's
    # answer part was 0. The prompts carry the task's meta, and the default check is answers.grade.
    import json

    from datasets import Dataset

    from pluribus.data.answers import grade
    from pluribus.data.records import Problem
    from pluribus.data.tasks import load_problems
    from pluribus.distill.rl import collate_prompts, default_verify, rl_prompts

    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Capital of France?", "choices": ["Paris", "London", "Rome"], "answer": 0},
        {"question": "Color of the sky?", "choices": ["green", "blue"], "answer": "blue"}]) + "\n")
    recipe = Recipe(name="t", root=str(tmp_path / "runs"),
                    task={"source": "mc", "path": str(path), "heldout_fraction": 0.0})
    problems = load_problems(recipe.task)
    rows = Dataset.from_list([{"prompt": p.question, "problem_id": p.id} for p in problems])
    prompts = rl_prompts(rows, recipe)
    batch = collate_prompts(prompts)
    metas = [json.loads(m) for m in batch["metas"]]
    assert [m["choices"] for m in metas] == [p.meta["choices"] for p in problems]
    for prompt, gold, meta in zip(batch["prompts"], batch["answers"], metas, strict=True):
        assert grade(f"The answer is ({gold}).", Problem("rl", prompt, gold, meta=meta)).correct
        assert not default_verify(f"The answer is ({gold}).", gold)  # what the reward saw before: never right


def _rl_recipe(tmp_path, student_dir, prm, name: str, **rl) -> Recipe:
    return Recipe(name=name, root=str(tmp_path / "runs"), train={
        "model": str(student_dir), "kernels": "off", "max_steps": 2, "logging_steps": 1, "save_steps": 10,
        "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4}, "lr": 0.05, "warmup_ratio": 0.0,
        "scheduler": "constant", "objective": "rl",
        "rl": {"group_size": 3, "prompts_per_step": 2, "max_new_tokens": 8, "prm": str(prm), **rl}})


@pytest.fixture()
def prm_adapter(tmp_path, student_dir, process_dir):
    return train_prm(Recipe(name="prm", root=str(tmp_path / "runs"), train={
        "model": str(student_dir), "kernels": "off", "objective": "prm", "max_steps": 1, "batch_size": 4,
        "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4}}), dataset=process_dir)


def _lora(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_rl_clip_bites_with_several_iterations(tmp_path, student_dir, process_dir, prm_adapter):
    # two optimizer steps on one sampled batch: the second step's ratio is no longer 1, and the clip decides
    outs = {clip: train_rl(_rl_recipe(tmp_path, student_dir, prm_adapter, f"c{clip}", num_iterations=2, clip=clip),
                           dataset=process_dir) for clip in (0.05, 0.95)}
    a, b = _lora(outs[0.05]), _lora(outs[0.95])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4
    m = read_record(outs[0.05])["metrics"]
    assert m["final_clip_fraction"] > 0  # the second step's ratios left [0.95, 1.05]
    assert read_record(outs[0.05])["data"]["num_iterations"] == 2


def test_rl_kl_reference_is_the_starting_policy(tmp_path, student_dir, process_dir, prm_adapter):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # a starting adapter far from the base (random B), as an rsft expert would be
    start = tmp_path / "start"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(start)
    kl = {}
    for reference in ("start", "base"):
        r = _rl_recipe(tmp_path, student_dir, prm_adapter, f"r{reference}", kl=0.1, reference=reference)
        r = r.model_copy(update={"train": r.train.model_copy(update={"init_adapter": str(start), "max_steps": 1})})
        record = read_record(train_rl(r, dataset=process_dir))
        kl[reference] = record["metrics"]["final_kl"]
        assert record["data"]["kl_reference"] == (f"init_adapter {start}" if reference == "start" else "base")
    # step 0's policy is the starting one: no divergence from itself, a real one from the base
    assert kl["start"] == pytest.approx(0.0, abs=1e-6)
    assert kl["base"] > 1e-4


def test_rl_samples_once_per_num_iterations_steps_with_gradient_accumulation(tmp_path, student_dir, process_dir,
                                                                             prm_adapter, monkeypatch):
    import pluribus.distill.rl as rl

    drawn: list[tuple[str, ...]] = []
    sample = rl.LocalSampler.__call__

    def counted(self, model, prompts, seeds=None):
        drawn.append(tuple(prompts))
        return sample(self, model, prompts, seeds)

    monkeypatch.setattr(rl.LocalSampler, "__call__", counted)
    r = _rl_recipe(tmp_path, student_dir, prm_adapter, "gas", num_iterations=2, clip=0.1)
    r = r.model_copy(update={"train": r.train.model_copy(update={"grad_accum": 2, "max_steps": 4})})
    train_rl(r, dataset=process_dir)
    # 4 optimizer steps x 2 micro-batches, sampled at steps 0 and 2 only: 2 x 2 draws of 4 distinct prompt pairs
    assert len(drawn) == 4 and len(set(drawn)) == 4


def test_the_prm_scores_where_train_rl_prm_device_says(tmp_path, student_dir, process_dir, monkeypatch):
    """The PRM is placed through the device policy with train.rl.prm_device when it is set (else on the Trainer's
    device), and the record says where the policy and the PRM ran. The policy stub answers cpu for every
    setting and keeps what it was asked, which is how a setting that never reached it would show on a CPU."""
    from pluribus import device as devices

    asked: list[str | None] = []
    real = devices.resolve
    monkeypatch.setattr(devices, "resolve", lambda setting=None: asked.append(setting) or real("cpu"))
    base = {"model": str(student_dir), "kernels": "off", "max_steps": 1, "batch_size": 4, "save_steps": 10,
            "eval_fraction": 0.0, "report_to": ["none"], "lora": {"r": 4}}
    prm = train_prm(Recipe(name="t", root=str(tmp_path / "runs"), train={**base, "objective": "prm"}),
                    dataset=process_dir)
    r = Recipe(name="t", root=str(tmp_path / "runs"), device="cpu", train={
        **base, "objective": "rl", "rl": {"group_size": 2, "prompts_per_step": 2, "prm": str(prm),
                                          "prm_device": "cuda:1", "sampling": {"max_new_tokens": 4}}})
    asked.clear()
    record = read_record(train_rl(r, dataset=process_dir))
    assert asked == ["cpu", "cuda:1"]  # the policy's (the recipe's device), then the PRM's own
    assert record["ran_on"]["device"] == "cpu" and record["data"]["prm_ran_on"]["device"] == "cpu"


def test_rl_dapo_averages_over_every_token_of_the_optimizer_step(tmp_path, student_dir, process_dir, prm_adapter,
                                                                  monkeypatch):
    # DAPO's token-level mean is over the whole batch of a step: with 2 micro-batches, each divides its token sum by
    # the step's token count / 2 (the Trainer then halves each), not by its own count (a mean of two means)
    import inspect

    import pluribus.distill.rl as rl

    calls: list[tuple[float, float | None]] = []
    loss = rl.policy_loss

    def recorded(*args, **kwargs):
        bound = inspect.signature(loss).bind(*args, **kwargs).arguments
        calls.append((float(bound["mask"].sum()), bound.get("tokens")))
        return loss(*args, **kwargs)

    monkeypatch.setattr(rl, "policy_loss", recorded)
    r = _rl_recipe(tmp_path, student_dir, prm_adapter, "dapo", loss_type="dapo", max_new_tokens=12)
    r = r.model_copy(update={"train": r.train.model_copy(update={"grad_accum": 2, "max_steps": 2})})
    train_rl(r, dataset=process_dir)
    assert len(calls) == 4
    for step in (calls[:2], calls[2:]):
        total = sum(n for n, _ in step)
        assert [t for _, t in step] == [pytest.approx(total / 2)] * 2
