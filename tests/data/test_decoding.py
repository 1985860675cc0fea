"""decode: the tokens generate would pick, with finished rows leaving the batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pluribus.data.decoding import decode, row_sampler


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids, mask


def _alone(model, row: list[int], max_new: int, eos: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=eos, pad_token_id=0)
    new = out[0, len(row):].tolist()
    return new[: new.index(eos[0]) + 1] if eos[0] in new else new


@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_greedy_decode_equals_generate_row_by_row_as_rows_finish(family, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(family), dtype=torch.float32).eval()
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4], [11, 12, 13, 14, 15]]
    never = model.config.vocab_size + 1
    free = [_alone(model, r, 12, [never]) for r in rows]
    # a stop token that one row reaches within a few steps and another never does: the first leaves the
    # batch while the other runs on
    eos = next([t] for r in free for k, t in enumerate(r[:6]) if t not in r[:k] and any(t not in o for o in free))
    expected = [_alone(model, r, 12, eos) for r in rows]
    assert min(map(len, expected)) < 7 and max(map(len, expected)) == 12
    ids, mask = _left_padded(rows, pad=0)
    got = decode(model, ids, mask, max_new_tokens=12, eos=eos)
    assert got == expected


def test_sampled_decode_depends_on_the_row_seed_only(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4]]
    ids, mask = _left_padded(rows, pad=0)
    together = decode(model, ids, mask, max_new_tokens=10, eos=[], pick=row_sampler([7, 8, 9], 0.9, 1.0))
    for r, seed in enumerate([7, 8, 9]):
        one_ids, one_mask = _left_padded([rows[r]], pad=0)
        alone = decode(model, one_ids, one_mask, max_new_tokens=10, eos=[], pick=row_sampler([seed], 0.9, 1.0))
        assert alone[0] == together[r]
    other = decode(model, ids, mask, max_new_tokens=10, eos=[], pick=row_sampler([1, 2, 3], 0.9, 1.0))
    assert other != together


def test_nothing_to_decode():
    assert decode(None, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), max_new_tokens=4, eos=[0]) == []


def test_linear_attention_cache_keeps_finished_rows_and_equals_generate():
    # a Qwen3-Next layer caches conv and recurrent state per row, which batch_select_indices cannot drop:
    # decode keeps such rows in the batch (as generate does) instead of failing or mixing states
    from tests.tiny import tiny_causal_lm

    model = tiny_causal_lm(
        "qwen3_next", hidden_size=32, intermediate_size=64, vocab_size=512, head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"]).eval()
    rows = [[5, 17, 99, 3, 9, 9, 10, 11, 12], [8, 8, 2, 41, 7, 7, 120, 5, 6, 7], [300, 4]]
    free = _alone(model, rows[0], 12, [model.config.vocab_size + 1])
    eos = [free[3]] if free[3] not in free[:3] else [free[0]]
    ids, mask = _left_padded(rows, pad=0)
    got = decode(model, ids, mask, max_new_tokens=12, eos=eos)
    assert got == [_alone(model, r, 12, eos) for r in rows]
    assert len(got[0]) < 12


def test_sampler_and_loss_share_one_nucleus_also_on_ties():
    # tied logits at the nucleus edge: the sampler draws only tokens the loss's nucleus keeps
    from pluribus.data.decoding import nucleus
    from pluribus.distill.rl import sampling_logprobs

    logits = torch.tensor([[0.0, 0.0, 0.0, -3.0]]).to(torch.bfloat16).float()
    kept = torch.isfinite(nucleus(logits, 0.5))[0]
    assert 0 < int(kept.sum()) < 3  # the edge cuts through the tie
    pick = row_sampler([11], 1.0, 0.5)
    drawn = {int(pick(logits, [0])[0]) for _ in range(200)}
    assert drawn == set(kept.nonzero().squeeze(1).tolist())
    lp = sampling_logprobs(logits.expand(len(drawn), 4), torch.tensor(sorted(drawn)), 1.0, 0.5).exp()
    torch.testing.assert_close(lp, torch.full_like(lp, 1.0 / len(drawn)))


def test_rows_with_one_prompt_share_its_prefill_and_sample_as_if_alone(tiny_llama_dir):
    # self-consistency's samples and an RL group ask one prompt k times: one prefill serves them, and each row
    # still draws what it draws alone (greedy rows: what generate gives)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = [[5, 17, 99, 3], [300, 4], [5, 17, 99, 3], [8, 8, 2, 41, 7], [5, 17, 99, 3], [300, 4]]
    ids, mask = _left_padded(rows, pad=0)
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape), with_kwargs=True)
    seeds = [11, 12, 13, 14, 15, 16]
    together = decode(model, ids, mask, max_new_tokens=8, eos=[], pick=row_sampler(seeds, 0.9, 1.0))
    hook.remove()
    assert forwards[0] == (3, ids.shape[1])  # three distinct prompts prefilled, not six
    for r, seed in enumerate(seeds):
        one_ids, one_mask = _left_padded([rows[r]], pad=0)
        assert decode(model, one_ids, one_mask, max_new_tokens=8, eos=[],
                      pick=row_sampler([seed], 0.9, 1.0))[0] == together[r]
    assert together[0] != together[2]  # same prompt, own seeds, own samples
    greedy = decode(model, ids, mask, max_new_tokens=8, eos=[])
    assert greedy == [_alone(model, r, 8, [model.config.vocab_size + 1]) for r in rows]


def test_the_head_sees_a_contiguous_last_position_also_under_a_frozen_adapter(tiny_llama_dir):
    # a strided [:, -1:] slice into a frozen head (every PeftModel's) made torch copy the head once per row
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4]]
    ids, mask = _left_padded(rows, pad=0)
    plain = decode(base, ids, mask, max_new_tokens=6, eos=[])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    seen = []
    model.get_output_embeddings().register_forward_hook(
        lambda _m, args, out: seen.append((args[0].is_contiguous(), tuple(out.shape))))
    assert decode(model, ids, mask, max_new_tokens=6, eos=[]) == plain  # B = 0: the adapter changes nothing
    assert seen[0] == (True, (3, 1, base.config.vocab_size))
    assert all(contiguous for contiguous, _ in seen)
