"""Rotary position embedding of q and k, in place, read at ``position_ids`` so packed sequences work.

Derivation: with x = (x1, x2) the two halves of a head and per-position tables c = (c1, c2), s = (s1, s2)
(Hugging Face: c1 = c2 = cos(p f), s1 = s2 = sin(p f)), ``x cos + rotate_half(x) sin`` is

    o1 = x1 c1 - x2 s1,     o2 = x2 c2 + x1 s2

a linear map R(p) of x, so the input gradient is R(p)^T g:

    g1 c1 + g2 s2,          g2 c2 - g1 s1       (= the forward with the sine negated, since s1 = s2)

Nothing but the tables is saved for backward, and q, k are rotated in place: no new (tokens, heads, D) tensors.
Backends: ``triton`` (``triton_kernels/rope.py``, one program per token) and ``torch`` (the twin, same formulas).
"""

from __future__ import annotations

import torch

from pluribus.errors import PluribusError
from pluribus.kernels.dispatch import choose_backend, tensor_reason
from pluribus.kernels.reference import rotate_half


def _rotate_half_t(x: torch.Tensor) -> torch.Tensor:
    """Transpose of ``rotate_half``: (y1, y2) -> (y2, -y1)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], -x[..., :half]), dim=-1)


def _launch(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
            backward: bool) -> None:
    from pluribus.kernels.triton_kernels import rope as tk

    tokens, heads, d = src.shape
    tk.rope_kernel[(tokens,)](src, dst, cos, sin, pos, heads, d // 2, BACKWARD=backward,
                              BLOCK_H=triton_next_pow2(heads), BLOCK_D=triton_next_pow2(d // 2))


def triton_next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _torch_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, backward: bool
                  ) -> torch.Tensor:
    shape = (*x.shape[:2], 1, x.shape[-1])  # (B, T, 1, D): broadcast over heads
    c, s = cos[pos].view(shape), sin[pos].view(shape)
    if backward:
        return x * c + _rotate_half_t(x * s)
    return x * c + rotate_half(x) * s


class RoPEFunction(torch.autograd.Function):
    """``apply(x (B, T, H, D), cos_table (P, D), sin_table (P, D), pos (B*T,), backend)``: rotates x in place.

    One tensor per call: autograd supports an in-place Function on a view (q and k usually are views of the
    projection output) only when it returns that one tensor.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, pos, backend):
        if backend == "triton":
            flat = x.view(-1, x.shape[-2], x.shape[-1])
            _launch(flat, flat, cos, sin, pos, backward=False)
        else:
            x.copy_(_torch_rotate(x, cos, sin, pos, backward=False))
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, pos)
        ctx.backend = backend
        return x

    @staticmethod
    def backward(ctx, g):
        cos, sin, pos = ctx.saved_tensors
        if ctx.backend == "triton":
            flat = g.reshape(-1, g.shape[-2], g.shape[-1]).contiguous()
            out = torch.empty_like(flat)
            _launch(flat, out, cos, sin, pos, backward=True)
            return out.view(g.shape), None, None, None, None
        return _torch_rotate(g, cos, sin, pos, backward=True), None, None, None, None


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          position_ids: torch.Tensor | None = None, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) in place; returns them. Same math as ``reference.rope_ref``.

    Either ``cos``/``sin`` are per token, (B or 1, T, D), as a Hugging Face rotary module returns them, or they are
    tables (P, D) and ``position_ids`` (B or 1, T) says which row each token reads (restarting at 0 for each packed
    sequence). Raises PluribusError when the shapes do not fit.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise PluribusError(f"rope: q and k must be (B, T, heads, D) with equal B, T, D; got {tuple(q.shape)} "
                            f"and {tuple(k.shape)}")
    b, t, _, d = q.shape
    if d % 2 or cos.shape != sin.shape or cos.shape[-1] != d:
        raise PluribusError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both end in the head "
                            f"dim {d}, which must be even")
    if position_ids is not None:
        if cos.dim() != 2 or position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
            raise PluribusError(f"rope: with position_ids {tuple(position_ids.shape)}, cos/sin must be tables (P, D) "
                                f"and position_ids (B or 1, T) for q {tuple(q.shape)}")
        pos = position_ids.expand(b, t).reshape(-1)
        cos_t, sin_t = cos, sin
    else:
        if cos.dim() != 3 or cos.shape[1] != t or cos.shape[0] not in (1, b):
            raise PluribusError(f"rope: cos/sin {tuple(cos.shape)} must be (B or 1, T, D) for q {tuple(q.shape)}")
        steps = torch.arange(t, device=q.device)
        per_row = cos.shape[0] == b and b > 1
        offsets = torch.arange(b, device=q.device)[:, None] * t if per_row else torch.zeros(b, 1, device=q.device)
        pos = (offsets + steps).reshape(-1)
        cos_t, sin_t = cos.reshape(-1, d), sin.reshape(-1, d)
    pos = pos.to(torch.int64).contiguous()
    backend = choose_backend(mode, tensor_reason([q, k, cos_t, sin_t], q.dtype), "rope")
    if backend == "triton":
        cos_t, sin_t = cos_t.contiguous(), sin_t.contiguous()
    return RoPEFunction.apply(q, cos_t, sin_t, pos, backend), RoPEFunction.apply(k, cos_t, sin_t, pos, backend)
