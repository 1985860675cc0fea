"""Attention dispatch helpers (the varlen branches need CUDA; on the CPU the model's own SDPA runs)."""

import torch

from pluribus.kernels.attention import cu_seqlens_from_position_ids


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 6, 12]
    assert max_len == 6
    cu, max_len = cu_seqlens_from_position_ids(torch.tensor([[3, 4, 5], [7, 8, 9]]))  # rows always start one
    assert cu.tolist() == [0, 3, 6] and max_len == 3
