"""RoomyLayer: a KV cache written in place holds what DynamicLayer holds, and decoding over it gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from pluribus.data import decoding, kv_cache
from pluribus.data.kv_cache import RoomyLayer, drop_columns


def _kv(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, cols, 4, generator=g), torch.randn(rows, 2, cols, 4, generator=g)


def _same(a, b) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_updates_selections_cuts_and_outside_writes_hold_what_a_dynamic_layer_holds():
    roomy, plain = RoomyLayer(room=3), DynamicLayer()
    handed = []  # every (keys, values) update returned, with a copy: later in-place writes must not touch them

    def update(rows: int, cols: int, seed: int) -> None:
        for layer in (roomy, plain):
            out = layer.update(*_kv(rows, cols, seed))
            if layer is roomy:
                handed.append((out, (out[0].clone(), out[1].clone())))
        _same(roomy, plain)

    update(4, 5, 0)  # a prefill
    buffer = roomy._buffers[0].data_ptr()
    for step in range(3):  # within the room: written in place, no new buffer
        update(4, 1, step + 1)
        assert roomy._buffers[0].data_ptr() == buffer
    update(4, 1, 9)  # the room has run out: a new buffer, the same numbers
    assert roomy._buffers[0].data_ptr() != buffer
    for index in (torch.tensor([3, 0]), torch.tensor([1, 1, 0])):  # rows leave (or repeat), their room with them
        for layer in (roomy, plain):
            layer.batch_select_indices(index)
            drop_columns(layer, 2)
        _same(roomy, plain)
        update(len(index), 1, 10)
    assert roomy.keys.shape == (3, 2, 7, 4) and roomy.get_seq_length() == 7
    for layer in (roomy, plain):  # set from outside (a join): the buffers go at once, the next step copies
        layer.keys = torch.cat([layer.keys, layer.keys])
        layer.values = torch.cat([layer.values, layer.values])
    assert roomy._buffers is None
    update(6, 2, 11)
    roomy.values = roomy.values.clone()  # values alone replaced: the buffers go too, nothing stale is written
    plain.values = plain.values.clone()
    assert roomy._buffers is None
    update(6, 1, 12)
    for (keys, values), (k0, v0) in handed:
        assert torch.equal(keys, k0) and torch.equal(values, v0)
    roomy.reset()
    assert roomy.keys is None and not roomy.is_initialized and roomy._buffers is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_over_roomy_layers_gives_dynamic_layers_tokens(tiny_llama_dir, monkeypatch, dtype):
    # joins (3 or 2 slots for 9 prompts), rows leaving, leading columns cut, a prefix six prompts share (prefilled
    # once: it saves 200 tokens), sampling, a room that runs out mid-decode: the same tokens to the bit, in float32
    # and in bf16 (a view and a copy hold the same numbers)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    head = list(range(40, 80))
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4], *[head + [k] * (k % 3 + 1) for k in range(1, 7)]]
    shared = []
    real_shared = decoding._shared_prefill
    monkeypatch.setattr(decoding, "_shared_prefill", lambda fwd, cache, prompts, n, pad: shared.append(max(n))
                        or real_shared(fwd, cache, prompts, n, pad))

    def run() -> tuple[list[list[int]], list[list[int]]]:
        greedy = decoding.decode_rows(model, rows, max_new_tokens=40, eos=[], slots=9)
        sampled = decoding.decode_rows(model, rows, max_new_tokens=40, eos=[7, 9], slots=2,
                                       pick=decoding.row_sampler(list(range(9)), 0.9, 1.0))
        return greedy, sampled

    roomy = run()
    assert 40 in shared  # the shared head was prefilled apart
    rooms = []
    real_new = decoding._Forward.new_cache
    monkeypatch.setattr(decoding._Forward, "new_cache", lambda self: rooms.append(self.room) or real_new(self))
    assert run() == roomy
    assert rooms and set(rooms) == {40}  # the room is the row's token budget (at most 128)
    monkeypatch.setattr(decoding._Forward, "new_cache", lambda self: kv_cache.roomy(
        DynamicCache(config=self.model.config), 2))  # two columns of room: renewed every other step
    assert run() == roomy
    monkeypatch.setattr(decoding._Forward, "new_cache", lambda self: DynamicCache(config=self.model.config))
    assert run() == roomy


def test_a_decode_cache_is_roomy_and_can_take_and_drop_rows(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    cache = decoding._Forward(model, model.device, room=8).new_cache()
    assert cache.layers and all(type(layer) is RoomyLayer and layer.room == 8 for layer in cache.layers)
    assert decoding._joinable(cache) and all(type(layer) in decoding._prunable() for layer in cache.layers)
