"""patch_model on tiny Llama / Qwen2 / Qwen3 + PEFT LoRA: same loss and gradients as unpatched, and reversible."""

import importlib.util
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pluribus.errors import PluribusError
from pluribus.kernels import patch_model

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
POS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]] * 2)  # two packed sequences per row


def tiny_peft(family="llama", dropout=0.0, targets="all-linear"):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(model_cls(config), lora)


def loss_and_grads(model):
    model.zero_grad()
    out = model(input_ids=IDS, labels=IDS, position_ids=POS)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_torch_equals_unpatched(family):
    model = tiny_peft(family)
    before = loss_and_grads(model)
    handle = patch_model(model, "torch")
    assert handle.counts == {"attention": 2, "mlp": 2, "lora_linear": 14}
    assert_same(loss_and_grads(model), before)
    handle.unpatch()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert_same(loss_and_grads(model), before, tol=0)


@needs_triton
def test_patched_triton_equals_unpatched():
    model = tiny_peft("qwen2")  # q/k/v biases, GQA
    before = loss_and_grads(model)
    with patch_model(model, "triton"):
        assert_same(loss_and_grads(model), before, tol=2e-5)


def test_training_five_steps_same_losses():
    def train(patched):
        model = tiny_peft("llama")
        handle = patch_model(model, "torch") if patched else None
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(input_ids=IDS, labels=IDS, position_ids=POS).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if handle:
            handle.unpatch()
        return losses

    plain, fused = train(False), train(True)
    assert plain[-1] < plain[0]
    assert fused == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_layers_the_fused_path_cannot_take_fall_back(caplog):
    model = tiny_peft("llama", dropout=0.1, targets=["q_proj", "v_proj"])
    before = loss_and_grads(model.eval())  # eval: dropout off, the fused path applies
    with caplog.at_level(logging.INFO, logger="pluribus.kernels"), patch_model(model, "auto") as handle:
        assert handle.counts == {"lora_linear": 4}
        assert {reason for _, reason in handle.skipped} >= {"Linear is not a PEFT LoRA Linear"}
        assert_same(loss_and_grads(model), before)
        model.train()
        torch.manual_seed(1)
        out = model(input_ids=IDS, labels=IDS).loss  # dropout on: PEFT's own forward, logged
        assert torch.isfinite(out)
        with model.disable_adapter():
            model(input_ids=IDS)
    assert "lora_dropout > 0 while training" in caplog.text
    assert "adapters are disabled" in caplog.text


def test_modes():
    model = tiny_peft("llama")
    assert patch_model(model, "off").counts == {}
    with pytest.raises(PluribusError, match="Unknown kernels mode 'fast'"):
        patch_model(model, "fast")
    handle = patch_model(model, "torch")
    with pytest.raises(PluribusError, match="already patched"):
        patch_model(model, "torch")
    handle.unpatch()


@needs_triton
def test_triton_mode_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(PluribusError, match="kernels: triton cannot run here"):
        patch_model(tiny_peft("llama").cpu(), "triton")  # on the CPU also where the tests run on CUDA


def test_lora_bias_is_not_taken_by_the_fused_path():
    from pluribus.kernels.patching import lora_projection

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    spec, reason = lora_projection(layer)
    assert spec is None and "lora_bias" in reason


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_generates_like_unpatched_with_kv_cache(family):
    # Left-padded batch, greedy, cache on: the patched attention must update the cache it is handed, or every step
    # after the prefill attends to the new token only.
    model = tiny_peft(family).eval()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    gen = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "use_cache": True,
           "pad_token_id": 0, "eos_token_id": None, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model.generate(input_ids=ids, **gen)
        with patch_model(model, "torch") as handle:
            assert handle.counts["attention"] == 2
            fused = model.generate(input_ids=ids, **gen)
    assert fused.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(torch.stack(fused.logits), torch.stack(plain.logits), atol=1e-5, rtol=1e-5)


def _forward_4x(self, hidden_states, position_embeddings, attention_mask, past_key_value=None, cache_position=None,
                **kwargs):
    from transformers.models.llama.modeling_llama import LlamaAttention

    return LlamaAttention.__dict__["_saved"](self, hidden_states, position_embeddings, attention_mask,
                                             cache=kwargs.pop("cache", past_key_value), **kwargs)


def _forward_past_key_values(self, hidden_states, position_embeddings=None, attention_mask=None,
                             past_key_values=None, **kwargs):
    from transformers.models.llama.modeling_llama import LlamaAttention

    return LlamaAttention.__dict__["_saved"](self, hidden_states, position_embeddings, attention_mask,
                                             cache=kwargs.pop("cache", past_key_values), **kwargs)


@pytest.mark.parametrize("old_forward", [_forward_4x, _forward_past_key_values])
def test_attention_with_an_unknown_forward_signature_is_not_patched(monkeypatch, caplog, old_forward):
    # Signatures of other transformers releases (the cache under another name, cache_position): standing in for
    # them could drop the cache, so the block keeps its own forward, and says why.
    from transformers.models.llama.modeling_llama import LlamaAttention

    monkeypatch.setattr(LlamaAttention, "_saved", LlamaAttention.forward, raising=False)
    monkeypatch.setattr(LlamaAttention, "forward", old_forward)
    model = tiny_peft("llama")
    before = loss_and_grads(model)
    with caplog.at_level(logging.WARNING, logger="pluribus.kernels"), patch_model(model, "torch") as handle:
        assert "attention" not in handle.counts and handle.counts["mlp"] == 2
        reasons = [reason for name, reason in handle.skipped if name.endswith("self_attn")]
        assert len(reasons) == 2 and "past_key_value" in reasons[0] and "not an attention signature" in reasons[0]
        assert_same(loss_and_grads(model), before)
    assert "attention blocks run their original forward" in caplog.text
