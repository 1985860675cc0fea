"""The PRM as a TRL reward: the signature GRPOTrainer calls, the aggregations, and a few GRPO steps of TRL's own."""

from __future__ import annotations

import pytest

from pluribus.distill.prm import aggregate_steps, load_prm, score_solutions, train_prm
from pluribus.distill.reward import PRMReward
from pluribus.errors import PluribusError
from tests.distill.test_prm_format import formatted_dataset, prm_recipe


@pytest.fixture(scope="module")
def prm_adapter(tmp_path_factory, student_dir):
    tmp = tmp_path_factory.mktemp("prm-reward")
    return train_prm(prm_recipe(tmp, student_dir, max_steps=1), dataset=formatted_dataset(tmp / "process"))


def test_aggregations_by_hand() -> None:
    scores = [0.9, 0.5, 0.8]
    assert aggregate_steps(scores, "min") == 0.5 and aggregate_steps(scores, "last") == 0.8
    assert aggregate_steps(scores, "product") == pytest.approx(0.36)
    assert aggregate_steps(scores, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps([], "product") == 0.0
    with pytest.raises(PluribusError, match="unknown step aggregation 'max'"):
        PRMReward.__init__(object.__new__(PRMReward), "unused", aggregate="max")


def test_plain_and_conversational_calls_score_as_the_prm_learned(prm_adapter) -> None:
    prm = load_prm(prm_adapter)
    question = "What is (1 + 2) * 3?"
    solutions = ["1 + 2 = 3.\n3 * 3 = 9.\nThe answer is 9.", "1 + 2 = 4.\nThe answer is 12."]
    expected = score_solutions(prm, [question] * 2, solutions)  # the template filled with the question
    prompt = prm.step_format.prompt(question)  # a GRPO prompt made from a process row: already the PRM's prompt
    for how in ("min", "product", "last"):
        reward = PRMReward(prm, aggregate=how)
        plain = reward(prompts=[prompt] * 2, completions=solutions, completion_ids=[[1], [2]], trainer_state=None)
        chat = reward(prompts=[[{"role": "user", "content": prompt}]] * 2,
                      completions=[[{"role": "assistant", "content": s}] for s in solutions])
        by_column = PRMReward(prm, aggregate=how, question_column="question")(
            prompts=["the policy's own prompt"] * 2, completions=solutions, question=[question] * 2)
        want = [aggregate_steps(s, how) for s in expected]
        assert plain == pytest.approx(want, abs=1e-6) and chat == pytest.approx(want, abs=1e-6)
        assert by_column == pytest.approx(want, abs=1e-6)
    with pytest.raises(PluribusError, match="no such column"):
        PRMReward(prm, question_column="question")(prompts=[prompt], completions=["x"])


@pytest.mark.slow
def test_a_few_grpo_steps_of_trls_own_trainer(tmp_path, student_dir, prm_adapter) -> None:
    trl = pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.distill.conftest import synthetic_problems

    prm = load_prm(prm_adapter)
    seen: list[tuple[list[str], list[str], list[float]]] = []

    class Recorded(PRMReward):  # what TRL handed in and what it got back
        def __call__(self, prompts, completions, **kwargs):
            out = super().__call__(prompts, completions, **kwargs)
            seen.append(([p[-1]["content"] for p in prompts], [c[0]["content"] for c in completions], out))
            return out

    reward = Recorded(prm, aggregate="min")
    prompts = [[{"role": "user", "content": prm.step_format.prompt(p["question"])}] for p in synthetic_problems(4)]
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=12, max_steps=2, learning_rate=1e-3, logging_steps=1,
                          report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
                          temperature=1.0, disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[reward], args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train()
    assert len(seen) == 2 and all(len(r) == 4 for _, _, r in seen)  # 2 steps x (1 prompt x 4 generations)
    for asked, texts, rewards in seen:  # what TRL got: the PRM's weakest step, on the policy's own completions
        direct = score_solutions(prm, asked, texts, rendered=True)
        assert rewards == pytest.approx([min(s) if s else 0.0 for s in direct], abs=1e-6)
    logged = [h["rewards/prm_min/mean"] for h in trainer.state.log_history if "rewards/prm_min/mean" in h]
    assert logged == pytest.approx([sum(r) / len(r) for _, _, r in seen], abs=1e-5)
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())  # the policy moved
