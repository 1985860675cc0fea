"""train.rl.backend=vllm: the policy's current LoRA weights reach the vLLM sampler after every update."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pluribus.config import RLSettings, TrainConfig, VLLMSettings

MODEL = "smollm2-135m"
PROMPTS = ["Name one colour.", "Say any word."]
G = 48  # samples per prompt of the one-token distributions compared below


@pytest.fixture(scope="module")
def policy_and_sampler():
    from pluribus.distill.rl import VLLMSampler
    from pluribus.distill.student import attach_lora, base_identity, load_student

    cfg = TrainConfig(model=MODEL, lora={"r": 8, "alpha": 16})
    model, tokenizer = load_student(cfg, seed=0)
    model = attach_lora(model, cfg, "CAUSAL_LM")
    settings = RLSettings(backend="vllm", group_size=G, temperature=1.0, max_new_tokens=1,
                          vllm=VLLMSettings(kv_cache_gib=1.0))
    sampler = VLLMSampler(tokenizer, settings, str(base_identity(model)), 8, prompts=PROMPTS,
                          dtype="bfloat16", seed=0)
    yield model, tokenizer, sampler
    sampler.close()


def _first_tokens(sampler, model) -> Counter:
    return Counter(c[0] for c in sampler(model, PROMPTS))


def _train_towards(model, tokenizer, token: int, steps: int = 30) -> None:
    """Gradient steps on the LoRA only, raising log p(token) as the first reply token of every prompt."""
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for p in PROMPTS]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = sum(-torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, -1].float(), -1)[token]
                   for x in ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _policy_prob(model, tokenizer, token: int) -> float:
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                         add_generation_prompt=True)
    with torch.no_grad():
        logits = model(input_ids=tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]).logits
    return float(torch.softmax(logits[0, -1].float(), -1)[token])


def test_every_update_reaches_the_sampler(policy_and_sampler):
    model, tokenizer, sampler = policy_and_sampler
    targets = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" zebra", " quartz")]
    before = _first_tokens(sampler, model)
    total = 2 * G
    assert all(before[t] < 0.1 * total for t in targets)  # neither word is a likely first token of the base

    for target in targets:  # two updates in a row: the second must replace the first, not be cached behind it
        _train_towards(model, tokenizer, target)
        assert _policy_prob(model, tokenizer, target) > 0.9
        after = _first_tokens(sampler, model)
        assert after[target] > 0.7 * total, (target, after.most_common(3))
    assert sampler.step == 3


def test_sampler_engine_follows_the_policy_and_the_settings(policy_and_sampler):
    _, tokenizer, sampler = policy_and_sampler
    kw = sampler.engine_kwargs
    import torch

    from pluribus.data.vllm_engine import on_cpu
    from pluribus.device import supports_bf16

    # the policy's bf16, or float32 on a CPU without native bf16 (as every backend there)
    native = not on_cpu() or supports_bf16(torch.device("cpu"))
    assert kw["enable_lora"] and kw["max_lora_rank"] == 8 and kw["dtype"] == ("bfloat16" if native else "float32")
    longest = max(len(sampler._ids(p)) for p in PROMPTS)
    assert sampler.llm.llm_engine.vllm_config.model_config.max_model_len == longest + 1
    assert sampler.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 1024**3
