"""Triton kernel of rotary position embedding (the math and the launcher are in pluribus/kernels/rope.py)."""

import triton
import triton.language as tl


@triton.jit
def rope_kernel(src_ptr, dst_ptr, cos_ptr, sin_ptr, pos_ptr, H, HALF,
                BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: rotate all H heads of x (tokens, H, 2*HALF) by the angles of row pos[token].

    Forward:  o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2
    Backward: the transpose, g1 c1 + g2 s2 and g2 c2 - g1 s1 (the forward with the sine negated when s1 = s2).
    src and dst may be the same tensor (in place): each element is read before it is written, by one program.
    """
    tok = tl.program_id(0)
    d = 2 * HALF
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HALF
    mask = (offs_h < H)[:, None] & mask_d[None, :]
    c1 = tl.load(cos_ptr + pos * d + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + pos * d + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + pos * d + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + pos * d + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    base = tok.to(tl.int64) * H * d + offs_h[:, None] * d + offs_d[None, :]
    x1 = tl.load(src_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(dst_ptr + base, o1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_ptr + base + HALF, o2.to(dst_ptr.dtype.element_ty), mask=mask)
