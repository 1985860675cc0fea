"""RoomyLayer: a KV cache written in place holds what DynamicLayer holds, and decoding over it gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicLayer

from pluribus.data import decoding
from pluribus.data.kv_cache import RoomyLayer, drop_columns


def _kv(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, cols, 4, generator=g), torch.randn(rows, 2, cols, 4, generator=g)


def _same(a, b) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_updates_selections_cuts_and_outside_writes_hold_what_a_dynamic_layer_holds():
    roomy, plain = RoomyLayer(room=3), DynamicLayer()
    for layer in (roomy, plain):
        layer.update(*_kv(4, 5, 0))  # a prefill
    _same(roomy, plain)
    buffer = roomy._buffers[0].data_ptr()
    for step in range(3):  # within the room: written in place, no new buffer
        for layer in (roomy, plain):
            out = layer.update(*_kv(4, 1, step + 1))
        _same(roomy, plain)
        assert torch.equal(out[0], plain.keys)
        assert roomy._buffers[0].data_ptr() == buffer
    for layer in (roomy, plain):
        layer.update(*_kv(4, 1, 9))  # the room has run out: a new buffer, the same numbers
    _same(roomy, plain)
    assert roomy._buffers[0].data_ptr() != buffer
    index = torch.tensor([3, 0])
    for layer in (roomy, plain):  # rows leave, their room with them
        layer.batch_select_indices(index)
        drop_columns(layer, 2)
        layer.update(*_kv(2, 1, 10))
    _same(roomy, plain)
    assert roomy.keys.shape == (2, 2, 8, 4) and roomy.get_seq_length() == 8
    for layer in (roomy, plain):  # set from outside (a join): the next step copies it into a buffer of its own
        layer.keys = torch.cat([layer.keys, layer.keys])
        layer.values = torch.cat([layer.values, layer.values])
        layer.update(*_kv(4, 2, 11))
    _same(roomy, plain)
    roomy.reset()
    assert roomy.keys is None and not roomy.is_initialized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_over_roomy_layers_gives_dynamic_layers_tokens(tiny_llama_dir, monkeypatch, dtype):
    # joins (2 slots for 7 prompts), rows leaving, leading columns cut, a shared prefix, sampling: the same tokens,
    # to the bit, in float32 and in bf16 (a view and a copy hold the same numbers)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    head = list(range(40, 60))
    rows = [[5, 17, 99, 3], [8, 8, 2, 41, 7, 7, 120], [300, 4], head + [1, 2], head + [3], [77], head + [6, 5, 4]]

    def run() -> tuple[list[list[int]], list[list[int]]]:
        greedy = decoding.decode_rows(model, rows, max_new_tokens=40, eos=[], slots=3)
        sampled = decoding.decode_rows(model, rows, max_new_tokens=40, eos=[7, 9], slots=2,
                                       pick=decoding.row_sampler(list(range(7)), 0.9, 1.0))
        return greedy, sampled

    roomy = run()
    seen = []
    real_new = decoding._Forward.new_cache
    monkeypatch.setattr(decoding._Forward, "new_cache", lambda self: seen.append(self.room) or real_new(self))
    assert run() == roomy
    assert seen and set(seen) == {40}  # the room is the row's token budget (at most 128)
    monkeypatch.setattr("pluribus.data.kv_cache.roomy", lambda cache, room: cache)
    assert run() == roomy


def test_a_decode_cache_is_roomy_and_can_take_and_drop_rows(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    cache = decoding._Forward(model, model.device, room=8).new_cache()
    assert cache.layers and all(type(layer) is RoomyLayer and layer.room == 8 for layer in cache.layers)
    assert decoding._joinable(cache) and all(type(layer) in decoding._prunable() for layer in cache.layers)
