"""Fused LoRA linear: ``y = x W^T + b + s (x A^T) B^T`` forward and backward as one autograd Function.

Derivation (x (M, K), frozen W (N, K), trainable A (r, K), B (N, r), xa = x A^T (M, r), dy = dL/dy (M, N)):

    y  = x W^T + b + s xa B^T
    dB = s dy^T xa                      (N, r)   } both from one read of dy:
    ds = s dy B                         (M, r)   } ds is the gradient reaching xa
    dA = ds^T x                         (r, K)
    dx = dy W + ds A  =  dy (W + s B A) (M, K)   one GEMM: the rank-r term joins its accumulator

So the backward needs only x and the small xa: PEFT's eager layer also keeps the (M, N) branch output alive until
the add, writes dy * s, and adds two (M, K) input gradients. Several projections of the same x (q/k/v, gate/up)
share one Function (``projections``): xa is computed for all of them in one pass over x, and dx sums every
projection's ``dy_i W_i + ds_i A_i`` in one accumulator.

Backends: ``triton`` (kernels in ``triton_kernels/lora_linear.py``; dB and dA are reduced with float32 atomics,
so their last bits vary run to run on a GPU) and ``torch`` (the twin; on float32/float64 it folds ``s B A`` into W
when that moves fewer bytes than the (M, N) or (M, K) rank-r update, which it does whenever M > K or M > N).
Under autocast the projections compute in the autocast dtype, like ``F.linear``, while W, A, B are saved as the
parameters themselves (no cast copies held until backward). ``lora_dropout`` must be 0 on this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pluribus.kernels.dispatch import check_lora_shapes, choose_backend, interpreter_enabled, tensor_reason


@dataclass(frozen=True)
class Projection:
    """One LoRA projection: ``x -> x W^T + bias + scale (x A^T) B^T``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _blocks(dtype: torch.dtype) -> dict:
    if interpreter_enabled():  # larger blocks mean fewer Python-level programs in the interpreter
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


# ------------------------------------------------------------------------------------------ launchers


def triton_forward(x: torch.Tensor, ws, biases, a_all: torch.Tensor, bs, ranks, scales
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Launch xa = x A^T and y_i = x W_i^T + b_i + s_i xa_i B_i^T. x (M, K) contiguous; returns (ys, xa)."""
    from pluribus.kernels.triton_kernels import lora_linear as tk

    m, k = x.shape
    rt = a_all.shape[0]
    blk = _blocks(x.dtype)
    prec = _precision(x.dtype)
    xa = torch.empty(m, rt, device=x.device, dtype=x.dtype)
    grid_m = -(-m // blk["BLOCK_M"])
    tk.xa_kernel[(grid_m,)](x, a_all, xa, m, k, rt, BLOCK_M=blk["BLOCK_M"], BLOCK_K=blk["BLOCK_K"],
                           BLOCK_R=_next_pow2(rt), PRECISION=prec)
    ys = [torch.empty(m, w.shape[0], device=x.device, dtype=x.dtype) for w in ws]
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    tiles = [-(-w.shape[0] // blk["BLOCK_N"]) for w in ws]
    segs = []
    for i in range(3):
        j = min(i, len(ws) - 1)  # unused slots repeat the last projection; the grid never reaches them
        bias = biases[j] if biases[j] is not None else ws[j]
        segs += [ws[j], bs[j], bias, ys[j], ws[j].shape[0], ranks[j], offsets[j], float(scales[j])]
    grid = (grid_m, sum(tiles))
    tk.fwd_kernel[grid](x, xa, m, k, rt, *segs, tiles[0], tiles[1] if len(tiles) > 1 else 0,
                        NSEG=len(ws), HAS_BIAS=biases[0] is not None, BLOCK_R=_next_pow2(max(ranks)),
                        PRECISION=prec, **blk)
    return ys, xa


def triton_backward(x: torch.Tensor, xa: torch.Tensor, dys, ws, a_all: torch.Tensor, bs, ranks, scales
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Launch ds_i, dB_i (one read of dy_i each), then dx and dA. Returns (dx, dA_all float32, [dB_i float32])."""
    from pluribus.kernels.triton_kernels import lora_linear as tk

    m, k = x.shape
    rt = a_all.shape[0]
    blk = _blocks(x.dtype)
    prec = _precision(x.dtype)
    grid_m = -(-m // blk["BLOCK_M"])
    ds = torch.empty(m, rt, device=x.device, dtype=torch.float32)
    dbs = []
    offset = 0
    for dy, b, r, s in zip(dys, bs, ranks, scales, strict=True):
        db = torch.zeros(b.shape, device=x.device, dtype=torch.float32)
        tk.ds_db_kernel[(grid_m,)](dy, b, xa, ds, db, m, dy.shape[1], r, rt, offset, float(s),
                                  BLOCK_M=blk["BLOCK_M"], BLOCK_N=blk["BLOCK_N"], BLOCK_R=_next_pow2(r),
                                  PRECISION=prec)
        dbs.append(db)
        offset += r
    dx = torch.empty_like(x)
    da = torch.zeros(rt, k, device=x.device, dtype=torch.float32)
    segs = []
    for i in range(3):
        j = min(i, len(ws) - 1)
        segs += [dys[j], ws[j], ws[j].shape[0]]
    grid = (grid_m, -(-k // blk["BLOCK_K"]))
    tk.dx_da_kernel[grid](x, ds, a_all, dx, da, m, k, rt, *segs, NSEG=len(ws), BLOCK_R=_next_pow2(rt),
                          PRECISION=prec, **blk)
    return dx, da, dbs


# ------------------------------------------------------------------------------------------ torch twin


def _merge_pays(tokens: int, other: int, dtype: torch.dtype) -> bool:
    # W + s B A costs an (N, K) pass; the separate rank-r update an (M, N) or (M, K) one. 16-bit types never
    # merge: rounding W + s B A to bf16 can erase a small LoRA update from the forward entirely.
    return dtype in (torch.float32, torch.float64) and tokens > other


def torch_forward(x, ws, biases, a_all, bs, ranks, scales) -> tuple[list[torch.Tensor], torch.Tensor]:
    xa = x @ a_all.t()
    ys = []
    offset = 0
    for w, bias, b, r, s in zip(ws, biases, bs, ranks, scales, strict=True):
        a = a_all[offset : offset + r]
        if _merge_pays(x.shape[0], x.shape[1], x.dtype):
            y = torch.nn.functional.linear(x, torch.addmm(w, b, a, alpha=s), bias)
        else:
            y = torch.nn.functional.linear(x, w, bias)
            y.addmm_(xa[:, offset : offset + r], b.t(), alpha=s)
        ys.append(y)
        offset += r
    return ys, xa


def torch_backward(x, xa, dys, ws, a_all, bs, ranks, scales) -> tuple[torch.Tensor, torch.Tensor, list]:
    dx = None
    ds_parts, dbs, a_parts = [], [], []
    offset = 0
    for dy, w, b, r, s in zip(dys, ws, bs, ranks, scales, strict=True):
        a = a_all[offset : offset + r]
        ds = (dy @ b).mul_(s)
        dbs.append((dy.t() @ xa[:, offset : offset + r]).mul_(s))
        ds_parts.append(ds)
        if _merge_pays(dy.shape[0], dy.shape[1], dy.dtype):
            term = dy @ torch.addmm(w, b, a, alpha=s)
        else:
            term = dy @ w
            a_parts.append((ds, a))
        dx = term if dx is None else dx.add_(term)
        offset += r
    for ds, a in a_parts:
        dx.addmm_(ds, a)
    ds_all = torch.cat(ds_parts, dim=1) if len(ds_parts) > 1 else ds_parts[0]
    return dx, ds_all.t() @ x, dbs


# ------------------------------------------------------------------------------------------ autograd


class LoRAProjectionsFunction(torch.autograd.Function):
    """``apply(x, backend, scales, compute_dtype, W_0, bias_0, A_0, B_0, W_1, ...)`` -> y_0[, y_1, ...] (M, N_i)."""

    @staticmethod
    def forward(ctx, x, backend, scales, cdt, *params):
        n = len(params) // 4
        ws = [params[4 * i].to(cdt).contiguous() for i in range(n)]
        biases = [None if params[4 * i + 1] is None else params[4 * i + 1].to(cdt) for i in range(n)]
        as_ = [params[4 * i + 2].to(cdt) for i in range(n)]
        bs = [params[4 * i + 3].to(cdt).contiguous() for i in range(n)]
        ranks = [a.shape[0] for a in as_]
        a_all = (torch.cat(as_) if n > 1 else as_[0]).contiguous()
        x2 = x.reshape(-1, x.shape[-1]).to(cdt).contiguous()
        if backend == "triton":
            ys, xa = triton_forward(x2, ws, biases, a_all, bs, ranks, scales)
        else:
            ys, xa = torch_forward(x2, ws, biases, a_all, bs, ranks, scales)
        # only x and the small xa are activations; the parameters are saved as they are (no copies)
        ctx.save_for_backward(x2, xa, *[params[4 * i + j] for i in range(n) for j in (0, 2, 3)])
        ctx.meta = (backend, tuple(scales), cdt, ranks, x.dtype, x.shape, [p is not None for p in biases])
        # 2-D outputs: the caller reshapes them outside, so that later in-place ops (RoPE) see autograd views
        return tuple(ys) if n > 1 else ys[0]

    @staticmethod
    def backward(ctx, *dys):
        backend, scales, cdt, ranks, x_dtype, x_shape, has_bias = ctx.meta
        x2, xa, *saved = ctx.saved_tensors
        n = len(ranks)
        ws = [saved[3 * i].to(cdt).contiguous() for i in range(n)]
        as_ = [saved[3 * i + 1].to(cdt) for i in range(n)]
        bs = [saved[3 * i + 2].to(cdt).contiguous() for i in range(n)]
        a_all = (torch.cat(as_) if n > 1 else as_[0]).contiguous()
        dy2 = [dy.to(cdt).contiguous() for dy in dys]
        if backend == "triton":
            dx, da, dbs = triton_backward(x2, xa, dy2, ws, a_all, bs, ranks, scales)
        else:
            dx, da, dbs = torch_backward(x2, xa, dy2, ws, a_all, bs, ranks, scales)
        grads = []
        offset = 0
        for i in range(n):
            w_param, a_param, b_param = saved[3 * i : 3 * i + 3]
            need_w, need_bias = ctx.needs_input_grad[4 + 4 * i], ctx.needs_input_grad[5 + 4 * i]
            dw = (dy2[i].t() @ x2).to(w_param.dtype) if need_w else None
            dbias = dy2[i].sum(0).to(w_param.dtype) if (need_bias and has_bias[i]) else None
            da_i = da[offset : offset + ranks[i]].to(a_param.dtype)
            grads += [dw, dbias, da_i, dbs[i].to(b_param.dtype)]
            offset += ranks[i]
        return (dx.to(x_dtype).view(x_shape), None, None, None, *grads)


def projections(x: torch.Tensor, projs: Sequence[Projection], mode: str = "auto", op: str = "lora_linear"
                ) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of one input, fused: ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T``.

    x (..., K); each projection W (N_i, K), A (r_i, K), B (N_i, r_i); at most three projections, all with a
    bias or all without. Raises PluribusError on mismatched shapes, rank 0, or an input Triton cannot take in
    mode ``triton``; in mode ``auto`` such inputs run on the twin (the reason is logged once).
    """
    if not 1 <= len(projs) <= 3:
        raise ValueError(f"{op}: 1 to 3 projections are fused, got {len(projs)}")
    for p in projs:
        check_lora_shapes(x, p.weight, p.bias, p.lora_a, p.lora_b, op)
    if len({p.bias is None for p in projs}) > 1:
        raise ValueError(f"{op}: the fused projections must all have a bias or all have none")
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    cdt = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    tensors = [x] + [t for p in projs for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    backend = choose_backend(mode, tensor_reason(tensors, cdt), op)
    params = [t for p in projs for t in (p.weight, p.bias, p.lora_a, p.lora_b)]
    scales = tuple(float(p.scale) for p in projs)
    with torch.autocast(device_type, enabled=False):
        out = LoRAProjectionsFunction.apply(x, backend, scales, cdt, *params)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in out)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, bias: torch.Tensor | None = None, mode: str = "auto") -> torch.Tensor:
    """``x W^T + bias + scale (x A^T) B^T`` with the fused forward and the memory-saving backward.

    x (..., K), W (N, K), A (r, K), B (N, r) -> (..., N). ``mode``: auto | triton | torch (see dispatch).
    """
    return projections(x, [Projection(weight, bias, lora_a, lora_b, scale)], mode, "lora_linear")[0]
