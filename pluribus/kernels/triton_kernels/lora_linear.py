"""Triton kernels of the fused LoRA projections (the math and the launchers are in pluribus/kernels/lora_linear.py).

Layouts (all contiguous, row-major): x (M, K); per projection i: W_i (N_i, K), B_i (N_i, r_i), y_i (M, N_i);
A stacked over projections (RT, K) with RT = sum r_i; xa (M, RT); ds (M, RT) float32.
Ranks are padded to BLOCK_R >= 16 by masked loads (zeros), which is what tl.dot needs on the hardware.
"""

import triton
import triton.language as tl


@triton.jit
def xa_kernel(x_ptr, a_ptr, xa_ptr, M, K, RT,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """xa = x A^T for all projections at once: one pass over x."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < RT
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    tl.store(xa_ptr + offs_m[:, None] * RT + offs_r[None, :], acc.to(xa_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _fwd_tile(x_ptr, xa_ptr, M, K, RT, w_ptr, b_ptr, bias_ptr, y_ptr, N, R, r_off, scale, pid_m, pid_n,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    # the rank-r term joins the base GEMM's accumulator: no (M, N) intermediate ever reaches memory
    xa = tl.load(xa_ptr + offs_m[:, None] * RT + r_off + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                 other=0.0)
    b = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc += scale * tl.dot(xa, b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def fwd_kernel(x_ptr, xa_ptr, M, K, RT,
               w0, b0, c0, y0, N0, R0, o0, s0,
               w1, b1, c1, y1, N1, R1, o1, s1,
               w2, b2, c2, y2, N2, R2, o2, s2,
               T0, T1,
               NSEG: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """y_i = x W_i^T + bias_i + s_i xa_i B_i^T for up to three projections in one launch.

    Axis 1 enumerates the N-tiles of projection 0 (T0 of them), then of 1 (T1), then of 2.
    """
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    if pid < T0:
        _fwd_tile(x_ptr, xa_ptr, M, K, RT, w0, b0, c0, y0, N0, R0, o0, s0, pid_m, pid,
                  HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)
    else:
        if NSEG >= 2:
            if pid < T0 + T1:
                _fwd_tile(x_ptr, xa_ptr, M, K, RT, w1, b1, c1, y1, N1, R1, o1, s1, pid_m, pid - T0,
                          HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)
            else:
                if NSEG >= 3:
                    _fwd_tile(x_ptr, xa_ptr, M, K, RT, w2, b2, c2, y2, N2, R2, o2, s2, pid_m, pid - T0 - T1,
                              HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)


@triton.jit
def ds_db_kernel(dy_ptr, b_ptr, xa_ptr, ds_ptr, db_ptr, M, N, R, RT, r_off, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """One read of dy per projection: ds = s dy B (rows of this program) and dB += s dy^T xa (atomic over rows)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    xa = tl.load(xa_ptr + offs_m[:, None] * RT + r_off + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                 other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy), xa, input_precision=PRECISION)
        tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db * scale,
                      mask=mask_n[:, None] & mask_r[None, :])
    tl.store(ds_ptr + offs_m[:, None] * RT + r_off + offs_r[None, :], ds * scale,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _dx_accumulate(acc, dy_ptr, w_ptr, N, K, offs_m, offs_k, mask_m, mask_k,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dx_da_kernel(x_ptr, ds_ptr, a_ptr, dx_ptr, da_ptr, M, K, RT,
                 dy0, w0, N0, dy1, w1, N1, dy2, w2, N2,
                 NSEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """dx = sum_i dy_i W_i + ds A (one accumulator), and dA += ds^T x (atomic over rows)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < RT
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = _dx_accumulate(acc, dy0, w0, N0, K, offs_m, offs_k, mask_m, mask_k, BLOCK_N, PRECISION)
    if NSEG >= 2:
        acc = _dx_accumulate(acc, dy1, w1, N1, K, offs_m, offs_k, mask_m, mask_k, BLOCK_N, PRECISION)
    if NSEG >= 3:
        acc = _dx_accumulate(acc, dy2, w2, N2, K, offs_m, offs_k, mask_m, mask_k, BLOCK_N, PRECISION)
    ds = tl.load(ds_ptr + offs_m[:, None] * RT + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    acc = tl.dot(ds.to(a.dtype), a, acc, input_precision=PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    da = tl.dot(tl.trans(ds.to(x.dtype)), x, input_precision=PRECISION)
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da, mask=mask_r[:, None] & mask_k[None, :])
