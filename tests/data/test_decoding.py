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


def _forwards(model) -> tuple[list[tuple[int, int]], object]:
    seen: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    return seen, hook


def test_continuous_batching_keeps_each_rows_tokens_and_fills_freed_slots(tiny_llama_dir):
    # 7 prompts through 2 slots: a row that ends gives its slot to the next prompt, which joins rows that are
    # mid-way; every row's greedy tokens are still generate's alone, its max_new_tokens and stop token kept
    from pluribus.data.decoding import decode_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4], [11, 12, 13, 14, 15], [9] * 9, [77], [6, 5, 4]]
    never = model.config.vocab_size + 1
    free = [_alone(model, r, 12, [never]) for r in rows]
    eos = next([t] for r in free for k, t in enumerate(r[:4]) if t not in r[:k] and sum(t in o for o in free) < 4)
    expected = [_alone(model, r, 12, eos) for r in rows]
    assert min(map(len, expected)) < 5 and max(map(len, expected)) == 12
    seen, hook = _forwards(model)
    ended: dict[int, list[int]] = {}
    got = decode_rows(model, rows, max_new_tokens=12, eos=eos, slots=2,
                      on_finish=lambda done, tokens: ended.update(zip(done, tokens, strict=True)))
    hook.remove()
    assert got == expected
    assert ended == dict(enumerate(expected))  # each row reported once, when it ended
    assert max(b for b, _ in seen) <= 2
    # a prefill (more than one token) after a decode step (one token): a prompt joined running rows
    assert any(w > 1 and prev == 1 for (_, w), (_, prev) in zip(seen[1:], seen, strict=False))
    assert decode_rows(model, rows, max_new_tokens=3, eos=eos, slots=3) == [e[:3] for e in expected]


def test_a_sampled_row_does_not_depend_on_its_slot_neighbours_or_admission(tiny_llama_dir):
    from pluribus.data.decoding import decode_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4], [11, 12, 13, 14, 15], [9] * 9]
    seeds = [21, 22, 23, 24, 25]
    eos = [_alone(model, rows[0], 3, [model.config.vocab_size + 1])[2]]  # some rows end early, freeing slots
    alone = [decode_rows(model, [r], max_new_tokens=10, eos=eos, pick=row_sampler([s], 0.9, 0.95))[0]
             for r, s in zip(rows, seeds, strict=True)]
    for slots in (1, 2, None):
        got = decode_rows(model, rows, max_new_tokens=10, eos=eos, pick=row_sampler(seeds, 0.9, 0.95), slots=slots)
        assert got == alone
    # the same rows admitted in another order (row 4 first, row 0 last) draw the same tokens
    order = [4, 2, 3, 1, 0]
    got = decode_rows(model, [rows[i] for i in order], max_new_tokens=10, eos=eos, slots=2,
                      pick=row_sampler([seeds[i] for i in order], 0.9, 0.95))
    assert got == [alone[i] for i in order]


def test_a_long_shared_prefix_is_prefilled_once(tiny_llama_dir):
    # Monte-Carlo rollouts from one trace: prompts that share a long prefix prefill it once, then each its own
    # suffix (one row of a different prompt shares nothing); tokens stay generate's, samples each row's own
    from pluribus.data.decoding import SHARED_MIN_SAVED, decode_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    trace = [(7 * k) % 500 + 3 for k in range(48)]
    rows = [trace[:40] + [1 + k, 2 + k][: 1 + k % 2] for k in range(5)] + [trace[:40], [300, 4, 5]]
    assert SHARED_MIN_SAVED <= 5 * 40
    never = model.config.vocab_size + 1
    seen, hook = _forwards(model)
    got = decode_rows(model, rows, max_new_tokens=6, eos=[never])
    hook.remove()
    assert seen[0] == (1, 39)  # the prefix once (up to the shortest sharing prompt's last token)
    assert seen[1] == (len(rows), 3)  # then each row's own tokens, left-padded; the lone prompt whole
    assert got == [_alone(model, r, 6, [never]) for r in rows]
    seeds = list(range(31, 31 + len(rows)))
    together = decode_rows(model, rows, max_new_tokens=6, eos=[never], pick=row_sampler(seeds, 1.0, 1.0))
    for i, (r, s) in enumerate(zip(rows, seeds, strict=True)):
        assert decode_rows(model, [r], max_new_tokens=6, eos=[never], pick=row_sampler([s], 1.0, 1.0))[0] == together[i]


def test_a_prompt_of_no_tokens_is_refused(tiny_llama_dir):
    from pluribus.data.decoding import decode_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="a prompt of no tokens"):
        decode_rows(model, [[5, 6], []], max_new_tokens=2, eos=[])


def test_a_next_rounds_prompt_reuses_the_stored_cache_of_its_own_last_exchange(tiny_llama_dir):
    # round 1 starts with round 0's prompt and answer: the store lends their keys and values and only the new
    # tokens are prefilled; tokens stay what a fresh prefill gives (generate's), also where the re-tokenised
    # answer differs from the generated tokens after a point (the common head is used)
    from pluribus.data.decoding import decode_rows
    from pluribus.data.prefix_store import PrefixStore

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    never = model.config.vocab_size + 1
    round0 = [[(5 * k + j) % 400 + 3 for k in range(30)] for j in range(4)]
    store = PrefixStore()
    answers = decode_rows(model, round0, max_new_tokens=8, eos=[never], store=store, slots=2)
    assert len(store) == 4
    follow = [700, 701, 702, 703, 704]
    round1 = [p + a + follow for p, a in zip(round0, answers, strict=True)]
    round1[3] = round0[3] + answers[3][:3] + [9, 9] + follow  # diverges after 3 of its answer's tokens
    seen, hook = _forwards(model)
    got = decode_rows(model, round1, max_new_tokens=6, eos=[never], store=store)
    hook.remove()
    # only the new tokens: rows 0-2 their answer's last token (never fed, so not stored) and what follows; row 3
    # what follows its answer's third token
    assert seen[0] == (4, 2 + len(follow))
    assert got == [_alone(model, r, 6, [never]) for r in round1]
    assert got == decode_rows(model, round1, max_new_tokens=6, eos=[never])  # without a store
    # a prompt that only starts like a stored one (round 0's head, not its answer) is prefilled afresh
    seen, hook = _forwards(model)
    decode_rows(model, [p[:25] + follow for p in round0], max_new_tokens=2, eos=[never], store=store)
    hook.remove()
    assert seen[0] == (4, 30)


def test_the_prefix_store_keeps_to_its_budget_oldest_first():
    from pluribus.data.prefix_store import PrefixStore

    kv = [(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))]  # 512 bytes per entry
    store = PrefixStore(budget_bytes=1200)
    for k in range(4):
        store.put([k, 1, 2, 3], 2, kv)  # a prompt of 2 tokens, an answer of 2
    assert len(store) == 2 and store.bytes == 1024
    store.put([3, 1, 2, 3], 2, kv)  # the same row again (greedy agents alike): stored once
    assert len(store) == 2 and store.bytes == 1024
    assert store.longest([3, 1, 2, 9])[0] == 3 and store.longest([0, 1, 2, 3])[0] == 0  # 0 and 1 evicted
    # lent only to a prompt that goes on into the entry's answer, not to one that merely starts alike
    assert store.longest([3, 1, 5])[0] == 0
    store.put([7] * 40, 20, [(torch.zeros(2, 40, 8), torch.zeros(2, 40, 8))])  # over the budget: not kept
    assert len(store) == 2


def test_a_sliding_window_cache_decodes_batch_after_batch_and_equals_generate():
    # a sliding-window layer counts the tokens it has seen: rows cannot join it, so slots=2 decodes batches of
    # two, one after the other (finished rows still leave), and each row is generate's alone
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from pluribus.data.decoding import decode_rows
    from tests.tiny import tiny_causal_lm

    model = tiny_causal_lm("mistral", hidden_size=32, intermediate_size=64, vocab_size=512, head_dim=8,
                           sliding_window=4).eval()
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in DynamicCache(config=model.config).layers)
    rows = [[5, 17, 99, 3, 9, 9, 10], [8, 8, 2, 41, 7], [300, 4], [11, 12, 13]]
    free = _alone(model, rows[0], 8, [model.config.vocab_size + 1])
    eos = [free[2]] if free[2] not in free[:2] else [free[0]]
    seen, hook = _forwards(model)
    got = decode_rows(model, rows, max_new_tokens=8, eos=eos, slots=2)
    hook.remove()
    assert got == [_alone(model, r, 8, eos) for r in rows]
    assert [s for s in seen if s[1] > 1] == [(2, 7), (2, 3)]  # two prefills of two rows, none joined mid-way


def test_attention_on_the_kv_heads_gives_sdpas_tokens(monkeypatch):
    # grouped query heads packed onto their key/value heads for one-token steps, a masked prefill's on the KV
    # heads through enable_gqa: the same tokens as sdpa's
    import pluribus.data.attention as attention
    from pluribus.data.decoding import decode_rows
    from tests.tiny import tiny_causal_lm

    model = tiny_causal_lm("llama", hidden_size=96, intermediate_size=128, vocab_size=512, num_attention_heads=6,
                           num_key_value_heads=2).eval()
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4], [11, 12, 13, 14, 15]]
    plain = decode_rows(model, rows, max_new_tokens=10, eos=[], slots=2)
    packed_steps, masked_prefills = [], []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        packed_steps.append(query.shape[2] == 3)  # 6 query heads on 2 KV heads: 3 rows per KV head
        if query.shape[2] > 1 and query.shape[1] == 6 and kwargs.get("attn_mask") is not None:
            masked_prefills.append(key.shape[1] == 2 and kwargs.get("enable_gqa") is True)
        return real(query, key, *args, **kwargs)

    assert attention.kv_head_attention(model) and model.config._attn_implementation == attention.NAME
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert decode_rows(model, rows, max_new_tokens=10, eos=[], slots=2) == plain
    assert any(packed_steps)
    # every left-padded prefill on the KV heads (transformers' sdpa repeats them per query head once masked)
    assert masked_prefills and all(masked_prefills)


class _Heads(torch.nn.Module):
    """What transformers' attention functions read of a layer."""

    def __init__(self, groups: int, causal: bool | None) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        if causal is not None:
            self.is_causal = causal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "bool-batch-1"])
@pytest.mark.parametrize("is_causal", [None, True, False])
@pytest.mark.parametrize("module_causal", [None, True, False])
@pytest.mark.parametrize("length", [1, 5])
def test_pluribus_sdpa_is_sdpa_to_the_bit(dtype, mask, is_causal, module_causal, length):
    # against transformers' own sdpa_attention_forward: masks of every kind it builds, the causal flag from the
    # call or the layer, a longer cache than the query (a static cache's cut), one-token steps and prefills
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pluribus.data.attention import _attention

    g = torch.Generator().manual_seed(length * 7 + len(mask))
    batch, kv_heads, groups, dim = 3, 2, 3, 16
    for kv_len in (length, length + 4):
        q = torch.randn(batch, kv_heads * groups, length, dim, generator=g).to(dtype)
        k, v = (torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype) for _ in range(2))
        allowed = torch.rand(batch, 1, length, kv_len, generator=g) > 0.3
        allowed[..., -1] = True  # every query row sees something
        attn_mask = {"none": None, "bool": allowed, "bool-batch-1": allowed[:1],
                     "float": torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)}[mask]
        module = _Heads(groups, module_causal)
        want, _ = sdpa_attention_forward(module, q, k, v, attn_mask, scaling=dim ** -0.5, is_causal=is_causal)
        got, _ = _attention(module, q, k, v, attn_mask, scaling=dim ** -0.5, is_causal=is_causal)
        assert got.shape == want.shape and torch.equal(got, want), (kv_len, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_on_the_kv_heads_gives_sdpas_logits_to_the_bit(dtype, monkeypatch):
    # left-padded rows (a mask), one unpadded row alone (no mask: the causal flag), and a prefill on top of a
    # cache (a mask over more columns than the query): sdpa's logits to the bit, the masked ones on the KV heads
    import inspect

    from transformers import DynamicCache

    import pluribus.data.attention as attention
    from tests.tiny import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm("llama", hidden_size=96, intermediate_size=128, vocab_size=512, num_attention_heads=6,
                           num_key_value_heads=2).to(dtype).eval()
    ids = torch.randint(1, 512, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    # the KV cache is `cache` from transformers 5.24, `past_key_values` before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run() -> list:
        with torch.inference_mode():
            padded = model(input_ids=ids, attention_mask=mask).logits
            alone = model(input_ids=ids[1:2]).logits
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :5], attention_mask=mask[:, :5], **{name: cache})
            on_top = model(input_ids=ids[:, 5:], attention_mask=mask, **{name: cache}).logits
        return [padded, alone, on_top]

    before = run()
    assert attention.kv_head_attention(model)
    on_kv_heads = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        if kwargs.get("attn_mask") is not None:
            on_kv_heads.append(key.shape[1] == 2 and kwargs.get("enable_gqa") is True)
        return real(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    after = run()
    assert on_kv_heads and all(on_kv_heads)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b, a)
